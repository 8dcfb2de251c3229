"""FusedHeunDiscreteScheduler: the reference against Heun's method in closed form, the table
against the reference, the kernel against the reference, and the drop-in against diffusers'
HeunDiscreteScheduler step by step (both halves), in pipelines and on a Gaussian mixture.

Tolerances as in test_diffusers_adapter.py (float32: rtol 1e-4 relative to the largest value
the loop has seen) and conftest.py (kernel vs float64 reference, by dtype). The loops compare
values with diffusers' Heun run in float64 on the same plan: its float32 second half computes
``(x - x0) / sigma_next`` from its own rounded Euler prediction x, which a clipped x0 does not
cancel, so with few steps (sigma 97 -> 0.028) diffusers' float32 result is 4e-2 off its float64
one where the fused step is 4e-4 off.
"""

from __future__ import annotations

import inspect
import math
import random

import pytest
import torch
from conftest import TOLERANCES
from torch.utils._python_dispatch import TorchDispatchMode

diffusers = pytest.importorskip("diffusers")

from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler  # noqa: E402
from diffusers_cases import BACKENDS, DEVICE  # noqa: E402
from test_diffusers_adapter import SHAPE, assert_step_close, device_timesteps, randn  # noqa: E402

from fastdiff import tables  # noqa: E402
from fastdiff.diffusers import FusedHeunDiscreteScheduler, capture_denoising_loop  # noqa: E402
from fastdiff.gmm import GaussianMixture  # noqa: E402
from fastdiff.kernels.fused_step import fused_step  # noqa: E402
from fastdiff.reference.vp import euler_step, heun_correction_step  # noqa: E402

__all__ = ["device_timesteps"]  # the fixture, imported for this file's tests

F64 = torch.float64
PREDICTIONS = ["epsilon", "v_prediction", "sample"]


@pytest.fixture
def seed():
    return random.randrange(2**31)


# -- the reference and the table ------------------------------------------------------------


def test_reference_is_heuns_method_in_closed_form():
    """Data N(0, c^2): the denoiser is D(x; s) = c^2 / (c^2 + s^2) x, so d = k(s) x with
    k(s) = s / (c^2 + s^2), and one Heun step is x (1 + h/2 (k + k' (1 + h k))), h = s' - s
    (Karras et al. 2022 Alg. 1). The exact ODE solution is x sqrt((c^2 + s'^2) / (c^2 + s^2));
    halving h divides Heun's error by ~4 (second order), Euler's by ~2."""
    c = 0.7
    x = torch.linspace(-3, 3, 11, dtype=F64)

    def denoise(x, s):
        return c**2 / (c**2 + s**2) * x

    def heun(x, s, s_next):
        eps = (x - denoise(x, s)) / s
        x1, d0 = euler_step(x, eps, s, s_next)
        eps1 = (x1 - denoise(x1, s_next)) / s_next
        return heun_correction_step(x1, eps1, s, s_next, x_start=x, x0_start=d0)

    def k(s):
        return s / (c**2 + s**2)

    for s, s_next in [(10.0, 4.0), (2.0, 1.5), (0.5, 0.1)]:
        h = s_next - s
        x_next, x0 = heun(x, s, s_next)
        want = x * (1 + h / 2 * (k(s) + k(s_next) * (1 + h * k(s))))
        torch.testing.assert_close(x_next, want, rtol=1e-14, atol=1e-14)
        x1 = x * (1 + h * k(s))
        torch.testing.assert_close(x0, denoise(x1, s_next), rtol=1e-14, atol=1e-14)

    def error(steps, method):
        sig = torch.linspace(2.0, 0.5, steps + 1, dtype=F64)
        y = x.clone()
        for s, s_next in zip(sig[:-1], sig[1:]):
            if method == "heun":
                y = heun(y, s, s_next)[0]
            else:
                y = euler_step(y, (y - denoise(y, s)) / s, s, s_next)[0]
        exact = x * math.sqrt((c**2 + 0.25) / (c**2 + 4.0))
        return (y - exact).abs().max().item()

    assert 3.5 < error(8, "heun") / error(16, "heun") < 4.5
    assert 1.7 < error(8, "euler") / error(16, "euler") < 2.3


@pytest.mark.parametrize("midpoint, processed", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_correction_table_is_the_reference(prediction_type, midpoint, processed):
    """The kernel row (x_next = X x + X0 x0 + X0_PREV x0_prev, x0 = x0_x x + x0_m m) equals the
    reference's two-derivative form in float64: x the first half's result and x0_prev its x0
    D, or (midpoint) any x and x0_prev the midpoint x_s + (s' - s) d / 2."""
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([14.6, 3.0, 0.9, 0.2], dtype=F64)
    s_next = torch.tensor([9.0, 1.1, 0.3, 0.03], dtype=F64)
    table = tables.heun_correction_table(s, s_next, prediction_type, midpoint, processed)
    col = tables.COL
    for i in range(len(s)):
        x_start = torch.randn(50, generator=g, dtype=F64) * (s[i] + 1)
        d0 = torch.randn(50, generator=g, dtype=F64)
        h = s_next[i] - s[i]
        x = x_start + h * (x_start - d0) / s[i]
        if midpoint:
            x = x + torch.randn(50, generator=g, dtype=F64)  # changed between the halves
        m = torch.randn(50, generator=g, dtype=F64)
        want, want_x0 = heun_correction_step(
            x, m, s[i], s_next[i], x_start=x_start, x0_start=d0, prediction_type=prediction_type
        )
        x0_prev = x_start + h / 2 * (x_start - d0) / s[i] if midpoint else d0
        row = table[i]
        x0 = row[col["x0_x"]] * x + row[col["x0_m"]] * m
        got = row[col["x"]] * x + row[col["x0"]] * x0 + row[col["x0_prev"]] * x0_prev
        got = got + row[col["m"]] * m
        assert row[col["std"]] == 0
        torch.testing.assert_close(x0, want_x0, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("midpoint", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (257, 2), (1, 4099)])
def test_kernel_correction_matches_reference(dtype, shape, midpoint, device):
    """One launch of the second half (x0_prev = the first half's x0, or the midpoint P in
    float32 for any x; clip on or off) against the float64 reference, into outputs poisoned
    with NaN before the launch."""
    g = torch.Generator().manual_seed(1)
    s = torch.tensor([5.0, 0.8], dtype=F64)
    s_next = torch.tensor([2.0, 0.1], dtype=F64)
    for prediction_type in PREDICTIONS:
        for i, clip in ((0, None), (1, 1.5)):
            table = tables.heun_correction_table(
                s, s_next, prediction_type, midpoint, clip is not None
            )
            table = table.float().to(device)
            x_start = torch.randn(shape, generator=g) * 3
            d0 = torch.randn(shape, generator=g)
            x = (x_start + (s_next[i] - s[i]) * (x_start - d0) / s[i]).float()
            if midpoint:
                x = x + torch.randn(shape, generator=g)  # changed between the halves
            m = torch.randn(shape, generator=g)
            x, m, d0, x_start = (t.to(device, dtype) for t in (x, m, d0, x_start))
            if midpoint:  # P in float32, as the scheduler makes it
                w = ((s[i] - s_next[i]) / (2 * s[i])).item()
                x0_prev = torch.lerp(x_start.float(), d0.float(), w)
                x_s = x_start.double()
            else:  # x_start as the kernel sees it
                x0_prev = d0
                x_s = (s[i] * x.double() + (s_next[i] - s[i]) * d0.double()) / s_next[i]
            out, x0 = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
            rows = torch.tensor([i], device=device)
            fused_step(x, m, table, rows, x0_prev=x0_prev, clip_range=clip, out=out, x0_out=x0)
            want, want_x0 = heun_correction_step(
                x.double(),
                m.double(),
                s[i],
                s_next[i],
                x_start=x_s,
                x0_start=d0.double(),
                prediction_type=prediction_type,
                clip_range=clip,
            )
            assert out.dtype == x0.dtype == dtype
            tol = TOLERANCES[dtype]
            scale = 1 + x.double().abs().max().item()
            torch.testing.assert_close(
                out.double(), want, rtol=tol["rtol"], atol=tol["atol"] * scale
            )
            torch.testing.assert_close(x0.double(), want_x0, **tol, check_dtype=False)


# -- the drop-in against diffusers ----------------------------------------------------------


def random_heun_case(rng: random.Random) -> dict:
    """A HeunDiscreteScheduler config and the set_timesteps arguments of one loop."""
    cfg = {"num_train_timesteps": rng.choice([100, 1000])}
    if rng.random() < 0.15:
        cfg["trained_betas"] = torch.linspace(2e-4, 0.03, cfg["num_train_timesteps"]).tolist()
    else:
        cfg["beta_schedule"] = rng.choice(["linear", "scaled_linear", "squaredcos_cap_v2"])
        cfg["beta_start"] = rng.uniform(5e-5, 1.5e-3)
        cfg["beta_end"] = rng.uniform(0.01, 0.03)
    cfg["timestep_spacing"] = rng.choice(["leading", "trailing", "linspace"])
    cfg["steps_offset"] = rng.choice([0, 1])
    cfg["prediction_type"] = rng.choice(PREDICTIONS)
    cfg["clip_sample"] = rng.random() < 0.3
    cfg["clip_sample_range"] = rng.uniform(0.5, 3.0)
    sigmas = rng.choice(["plain", "karras", "exponential", "beta"])
    if sigmas != "plain":
        cfg[f"use_{sigmas}_sigmas"] = True
    steps = rng.randint(1, 6)
    set_kwargs = {"num_inference_steps": steps}
    if sigmas == "plain" and rng.random() < 0.3:
        t = cfg["num_train_timesteps"]
        set_kwargs = {"timesteps": sorted(rng.sample(range(t), steps), reverse=True)}
    return {"config": cfg, "set": set_kwargs}


def run_heun_pair(case, backend, seed, *, clone_timesteps=False, guard=None, between=None):
    """diffusers' Heun and the fused one side by side over a whole plan, both halves of every
    step compared: state_in_first_order, the model input (bitwise), the output types and
    dtypes with diffusers in float32, the values with diffusers in float64 (module docstring).
    ``clone_timesteps``: pass copies of the plan's timesteps (found on the device);
    ``guard``: the ``device_timesteps`` fixture, active inside the fused calls; ``between``:
    ``between(x, k)`` changes the sample after step k (as an inpainting loop), in place or
    not, on all three runs alike."""
    d = HeunDiscreteScheduler(**case["config"])
    d64 = HeunDiscreteScheduler(**case["config"])
    f = FusedHeunDiscreteScheduler.from_config(d.config, backend=backend)
    for s in (d, d64, f):
        s.set_timesteps(**case["set"], device=DEVICE)
    d64.sigmas = d64.sigmas.double()  # the same values, float64 arithmetic
    assert torch.equal(d.timesteps, f.timesteps) and torch.equal(d.sigmas, f.sigmas)
    if guard is not None:  # build the tables before the host reads are forbidden
        zeros = torch.zeros(SHAPE, device=DEVICE)
        f.step(zeros, f.timesteps[0], zeros)
        f.set_timesteps(**case["set"], device=DEVICE)
    gen = torch.Generator().manual_seed(seed)
    x = randn(SHAPE, generator=gen) * d.init_noise_sigma
    xd, xf, x64 = x.clone(), x.clone(), x.double()
    scale = 0.0
    for k, t in enumerate(d.timesteps):
        m = randn(SHAPE, generator=gen)
        what = f"[{backend}] step {k} (t={t.item()}), seed={seed}, case={case}"
        assert f.state_in_first_order == d.state_in_first_order, what
        t_f = t.clone() if clone_timesteps else f.timesteps[k]
        if guard is not None:
            guard.active = True
        try:
            mf = f.scale_model_input(xd, t_f)
            out_f = f.step(m, t_f, xf)
        finally:
            if guard is not None:
                guard.active = False
        md = d.scale_model_input(xd, t)
        d64.scale_model_input(x64, t)
        out_d = d.step(m, t, xd)
        out_64 = d64.step(m.double(), t, x64)
        assert torch.equal(mf, md), "scale_model_input " + what
        assert type(out_f) is type(out_d)
        assert out_f.prev_sample.dtype == out_d.prev_sample.dtype
        assert out_f.pred_original_sample.dtype == out_d.pred_original_sample.dtype
        scale = max(scale, x64.abs().max().item(), out_64.prev_sample.abs().max().item())
        for field in ("prev_sample", "pred_original_sample"):
            got, want = getattr(out_f, field).double(), getattr(out_64, field)
            assert_step_close(got, want, f"{field} {what}", scale)
        xd, xf, x64 = out_d.prev_sample, out_f.prev_sample, out_64.prev_sample
        if between is not None:
            xd, xf, x64 = between(xd, k), between(xf, k), between(x64, k)
    assert f.state_in_first_order == d.state_in_first_order
    return d, f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draw", range(6))
def test_random_configs_match_diffusers(backend, draw, seed):
    run_heun_pair(random_heun_case(random.Random(seed)), backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("sigmas", ["plain", "karras", "exponential", "beta"])
def test_each_prediction_and_sigma_kind_matches_diffusers(prediction_type, sigmas, backend, seed):
    cfg = {"prediction_type": prediction_type, "beta_schedule": "scaled_linear"}
    if sigmas != "plain":
        cfg[f"use_{sigmas}_sigmas"] = True
    run_heun_pair({"config": cfg, "set": {"num_inference_steps": 3}}, backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_place", [False, True])
def test_sample_changed_between_halves_as_diffusers(backend, in_place, seed):
    """An inpainting loop blends the known region into the latents after every step, the
    first half's too: the second half then starts from the step's start, as diffusers'
    (not from the changed prediction)."""
    known = randn(SHAPE, generator=torch.Generator().manual_seed(seed + 7))
    mask = (torch.arange(SHAPE[-1], device=DEVICE) < 3).to(known.dtype)

    def between(x, k):
        if in_place:
            return x.mul_(1 - mask).add_(mask * known.to(x.dtype))
        return (1 - mask) * x + mask * known.to(x.dtype)

    for prediction_type in PREDICTIONS:
        cfg = {"prediction_type": prediction_type, "clip_sample": prediction_type == "sample"}
        case = {"config": cfg, "set": {"num_inference_steps": 3}}
        run_heun_pair(case, backend, seed, between=between)


def test_scale_model_input_is_diffusers_bits():
    d, f = HeunDiscreteScheduler(), FusedHeunDiscreteScheduler()
    for s in (d, f):
        s.set_timesteps(4, device=DEVICE)
    x = randn(SHAPE) * 10
    for k, t in enumerate(d.timesteps):
        assert torch.equal(f.scale_model_input(x, f.timesteps[k]), d.scale_model_input(x, t))
        for s in (d, f):
            s.step(x, t, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_timesteps_no_host_reads(backend, device_timesteps, seed):
    """Timesteps that live on the device: no tensor value read on the host in the steps (the
    step index and the stale-state guard are device tensors) and diffusers' results."""
    case = {"config": {"prediction_type": "v_prediction"}, "set": {"num_inference_steps": 4}}
    _, f = run_heun_pair(case, backend, seed, clone_timesteps=True, guard=device_timesteps)
    assert isinstance(f.step_index, torch.Tensor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_img2img_begin_index_and_add_noise(backend, seed):
    """As diffusers' img2img pipelines: timesteps[t_start * order:], set_begin_index."""
    d = HeunDiscreteScheduler(beta_schedule="scaled_linear")
    f = FusedHeunDiscreteScheduler.from_config(d.config, backend=backend)
    start = 2 * d.order
    x0, noise = randn(SHAPE).clamp(-1, 1), randn(SHAPE)
    for s in (d, f):
        s.set_timesteps(5, device=DEVICE)
        s.set_begin_index(start)
    t0 = d.timesteps[start : start + 1].repeat(SHAPE[0])
    xd, xf = d.add_noise(x0, noise, t0), f.add_noise(x0, noise, t0)
    assert_step_close(xf, xd, "add_noise")
    scale = 0.0
    for t_d, t_f in zip(d.timesteps[start:], f.timesteps[start:]):
        m = randn(SHAPE)
        scale = max(scale, xd.abs().max().item())
        d.scale_model_input(xd, t_d)
        f.scale_model_input(xf, t_f)
        xd, xf = d.step(m, t_d, xd).prev_sample, f.step(m, t_f, xf).prev_sample
        assert_step_close(xf, xd, f"t={t_d.item()}", scale)


@pytest.mark.parametrize(
    "sample_dtype, output_dtype",
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
)
def test_half_precision_dtypes_and_values(sample_dtype, output_dtype):
    """Output dtypes as diffusers' (its arithmetic runs in the promoted dtype; x0 of "sample"
    is the model output's); values within one rounding of diffusers in float64 on the same
    inputs, both halves. The second half's inputs are the rounded Euler prediction x and
    first-half x0 D that the scheduler keeps; the start they imply, ``(s x + (s' - s) D) / s'``
    (the kernel's row eliminates it), differs from the first half's sample by their rounding
    times ``s / s'``, so the float64 run continues from that start."""
    for prediction_type in PREDICTIONS:
        d, d64 = (HeunDiscreteScheduler(prediction_type=prediction_type) for _ in range(2))
        f = FusedHeunDiscreteScheduler(prediction_type=prediction_type, backend="triton")
        for s in (d, d64, f):
            s.set_timesteps(3)
        sigma, sigma_next = d64.sigmas[0].double(), d64.sigmas[1].double()
        x = randn(SHAPE).to(sample_dtype)
        for k, t in enumerate(d.timesteps[:2]):
            m = randn(SHAPE).to(output_dtype)
            want, exact, got = d.step(m, t, x), d64.step(m.double(), t, x.double()), f.step(m, t, x)
            atol = 4e-5 * (x.abs().max().item() + m.abs().max().item())
            for field in ("prev_sample", "pred_original_sample"):
                w, g, e = getattr(want, field), getattr(got, field), getattr(exact, field)
                assert g.dtype == w.dtype, (prediction_type, field)
                eps = torch.finfo(g.dtype).eps
                torch.testing.assert_close(g.double(), e, rtol=eps, atol=atol)
            x = got.prev_sample.to(sample_dtype)
            long = sigma - sigma_next > 2 * sigma_next  # the midpoint form (heun.py)
            if k == 0:  # the float64 run continues from the kept (rounded) x0, and from the
                # start the kept state implies in the one-launch form (a converted x is a
                # changed sample: the midpoint form, from the true start)
                d0 = got.pred_original_sample.double()
                start = d64.sample
                if x is got.prev_sample and not long:
                    start = (sigma * x.double() + (sigma_next - sigma) * d0) / sigma_next
                d64.sample = start
                d64.prev_derivative = (start - d0) / sigma


# -- stale state ----------------------------------------------------------------------------


def test_stale_state_is_refused_on_the_host():
    f = FusedHeunDiscreteScheduler(backend="reference")
    f.set_timesteps(4)
    x = randn(SHAPE)
    t = f.timesteps
    f.step(x, t[0], x)
    assert not f.state_in_first_order
    # the second half with the first half's timestep again (a loop over unique timesteps)
    with pytest.raises(ValueError, match="state_in_first_order"):
        f.step(x, t[0], x)
    with pytest.raises(ValueError, match="sample has shape"):
        f.step(x[:1], t[1], x[:1])
    f._step_index = None  # e.g. a pipeline that resets the index: found again from t[1] = t[2]
    with pytest.raises(ValueError, match="stale state_in_first_order"):
        f.step(x, t[1], x)
    f.set_timesteps(4)  # as diffusers: back in the first half
    assert f.state_in_first_order and f.sample is None
    f.step(x, t[0], x)
    f.step(x, t[1], x)
    assert f.state_in_first_order
    g = FusedHeunDiscreteScheduler()
    g.set_timesteps(3)
    with pytest.raises(ValueError, match="not in the scheduler's timesteps"):
        g.step(x, 123.5, x)


def test_stale_state_on_the_device_gives_nan(device_timesteps):
    f = FusedHeunDiscreteScheduler(backend="reference")
    f.set_timesteps(4, device=DEVICE)
    x = randn(SHAPE)
    t = f.timesteps
    device_timesteps.active = True
    f.step(x, t[0].clone(), x)
    out = f.step(x, t[0].clone(), x)  # the second half at the wrong timestep
    device_timesteps.active = False
    assert out.prev_sample.isnan().all() and out.pred_original_sample.isnan().all()
    assert f.state_in_first_order
    good = FusedHeunDiscreteScheduler(backend="reference")
    good.set_timesteps(4, device=DEVICE)
    good.step(x, t[0].clone(), x)
    assert torch.isfinite(good.step(x, t[1].clone(), x).prev_sample).all()


def test_set_timesteps_between_halves_matches_diffusers(seed):
    d, f = HeunDiscreteScheduler(), FusedHeunDiscreteScheduler()
    x = randn(SHAPE) * 14
    m = randn(SHAPE)
    for s in (d, f):
        s.set_timesteps(5)
        s.step(m, s.timesteps[0], x)
        s.set_timesteps(3)
        assert s.state_in_first_order
    for k, t in enumerate(d.timesteps[:3]):
        xd, xf = d.step(m, t, x).prev_sample, f.step(m, f.timesteps[k], x).prev_sample
        assert_step_close(xf, xd, f"step {k}", 14.0)


# -- configuration --------------------------------------------------------------------------


def test_contract_config_roundtrip_and_signatures(tmp_path):
    d = HeunDiscreteScheduler(beta_schedule="scaled_linear", use_karras_sigmas=True)
    f = FusedHeunDiscreteScheduler.from_config(d.config)
    assert isinstance(f, HeunDiscreteScheduler) and f.order == d.order == 2
    for method in ("set_timesteps", "step", "scale_model_input", "add_noise"):
        want = list(inspect.signature(getattr(HeunDiscreteScheduler, method)).parameters)
        assert list(inspect.signature(getattr(type(f), method)).parameters) == want, method
    init = set(inspect.signature(FusedHeunDiscreteScheduler.__init__).parameters)
    assert init == set(inspect.signature(HeunDiscreteScheduler.__init__).parameters) | {
        "backend",
        "noise",
    }
    for n in (2, 7):
        d.set_timesteps(n)
        f.set_timesteps(n)
        assert torch.equal(torch.as_tensor(f.init_noise_sigma), torch.as_tensor(d.init_noise_sigma))
    f.save_pretrained(tmp_path)
    g = FusedHeunDiscreteScheduler.from_pretrained(tmp_path, backend="reference")
    assert g.backend == "reference" and "backend" not in g.config
    assert {k: v for k, v in g.config.items() if not k.startswith("_")} == {
        k: v for k, v in f.config.items() if not k.startswith("_")
    }
    assert HeunDiscreteScheduler.from_pretrained(tmp_path).config.use_karras_sigmas
    other = EulerDiscreteScheduler(num_train_timesteps=300, prediction_type="v_prediction")
    got = FusedHeunDiscreteScheduler.from_config(other.config)
    want = HeunDiscreteScheduler.from_config(other.config)
    assert {k: v for k, v in got.config.items() if k != "_class_name"} == {
        k: v for k, v in want.config.items() if k != "_class_name"
    }
    g.set_timesteps(2)
    x = randn(SHAPE)
    out = g.step(x, g.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2


@pytest.mark.parametrize(
    "options, option",
    [
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"clip_sample": True, "clip_sample_range": 0.0}, "clip_sample_range"),
    ],
)
def test_unsupported_options_raise_at_construction(options, option):
    with pytest.raises(ValueError, match=option):
        FusedHeunDiscreteScheduler(**options)
    with pytest.raises(ValueError, match=option):
        FusedHeunDiscreteScheduler.from_config(HeunDiscreteScheduler(**options).config)


# -- graphed loops (capture_denoising_loop) ------------------------------------------------


def _graph_loop(f, weight, blend=None):
    """One iteration of a pipeline's loop: scale, a model of the input and t, the half step;
    ``blend``: an inpainting loop's known region put back after every half."""

    def step_fn(latents, t):
        m = torch.tanh(f.scale_model_input(latents, t) * weight) * (t.float() / 1000 + 0.5)
        x = f.step(m.to(latents.dtype), t, latents).prev_sample
        return x if blend is None else blend(x)

    return step_fn


def _eager_loop(f, step_fn, x, device_index=False):
    """The eager loop over the plan (host step index), or every iteration as a graphed one
    (``prepare_graph_step`` and a fresh timestep tensor)."""
    indices = torch.arange(len(f.timesteps), device=f.timesteps.device)
    for k in range(len(f.timesteps)):
        if device_index:
            f.prepare_graph_step()
            t = torch.take(f.timesteps, indices[k])
        else:
            t = f.timesteps[k]
        x = step_fn(x, t)
    return x


GRAPH_CASES = {
    "eps": ({"beta_schedule": "scaled_linear"}, 4, False),
    "v-karras": ({"prediction_type": "v_prediction", "use_karras_sigmas": True}, 5, False),
    "sample-clip": ({"prediction_type": "sample", "clip_sample": True}, 3, False),
    "long-steps": ({"beta_schedule": "squaredcos_cap_v2"}, 3, False),  # the midpoint form
    "inpainting": ({}, 4, True),  # the sample changed between the halves: the midpoint form
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(GRAPH_CASES))
def test_graphed_loop_is_the_eager_loop_bitwise(case, backend, as_device):
    """capture_denoising_loop replays one half step for every timestep: the half, the step
    index and the form of the second half come from device state, and the result is the
    eager (host state) loop's, bit for bit; the eager loop with every iteration run as a
    graphed one too; a second run (replays only) again."""
    config, steps, inpainting = GRAPH_CASES[case]
    f = FusedHeunDiscreteScheduler(**config, backend=backend)
    f.check_capturable()
    g = torch.Generator().manual_seed(0)
    weight, x, known = (torch.randn(SHAPE, generator=g).to(DEVICE) for _ in range(3))
    mask = (torch.arange(SHAPE[-1], device=DEVICE) < 3).float()
    blend = (lambda x: (1 - mask) * x + mask * known) if inpainting else None
    step_fn = _graph_loop(f, weight, blend)
    f.set_timesteps(steps, device=DEVICE)
    x = x * f.init_noise_sigma
    eager = _eager_loop(f, step_fn, x)
    f.set_timesteps(steps, device=DEVICE)
    assert torch.equal(_eager_loop(f, step_fn, x, device_index=True), eager)
    f.set_timesteps(steps, device=DEVICE)
    loop = capture_denoising_loop(step_fn, x, scheduler=f)
    assert torch.equal(loop.run(x), eager)
    assert loop.captured
    assert torch.equal(loop.run(x), eager)  # replays only: the device flag ended at 0


def test_graph_hooks_and_refusals(as_device):
    f = FusedHeunDiscreteScheduler()
    f.set_timesteps(3, device=DEVICE)
    f.check_capturable()
    x = torch.zeros(SHAPE, device=DEVICE)
    state = f.graph_state(x)
    assert [b.dtype for b in state] == [torch.int64, x.dtype, x.dtype, x.dtype]
    assert all(a is b for a, b in zip(f.graph_state(x), state))  # kept per layout
    # a graphed half, then a host-state half: refused (the state is on the device)
    f.prepare_graph_step()
    f.step(x, torch.take(f.timesteps, torch.tensor(0, device=DEVICE)), x)
    assert state[0].item() == 2  # the second half, at step index 1, next
    with pytest.raises(ValueError, match="set_timesteps"):
        f.step(x, f.timesteps[1], x)
    # a timestep that is not the plan's at the device index: the poison row
    f.prepare_graph_step()
    out = f.step(x, torch.take(f.timesteps, torch.tensor(3, device=DEVICE)), x).prev_sample
    assert out.isnan().all()
    f.set_timesteps(3, device=DEVICE)
    assert state[0].item() == 0  # back to the first half
    f.set_begin_index(2)
    with pytest.raises(ValueError, match="begin_index"):
        capture_denoising_loop(lambda x, t: x, x, scheduler=f)


# -- traffic: the tensor-sized passes of each half -------------------------------------------


class _Traffic(TorchDispatchMode):
    """What runs inside, as ``(name, passes read, passes written)`` per aten op and per
    ``fused_step`` launch (recorded by ``count_launches``): the bytes of the tensors of at
    least the sample's ``numel`` it reads and writes, over the sample's bytes. Views and
    small tensors (rows, tables) are left out; an argument an op writes (``out=``, in place)
    counts as written, and as read too when the op updates it in place (not ``copy_``,
    ``fill_``, ``zero_``); a factory (``*_like``) reads nothing.

    Example: ``where(c, a, b, out=a)`` of float32 ``a`` and bfloat16 ``b`` and a bfloat16
    sample reads 2 + 1 and writes 2."""

    def __init__(self, sample: torch.Tensor) -> None:
        super().__init__()
        self.numel = sample.numel()
        self.unit = sample.numel() * sample.element_size()
        self.ops: list[tuple[str, float, float]] = []

    def passes(self, tensors) -> float:
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors if t.numel() >= self.numel)
        return nbytes / self.unit

    def total(self) -> float:
        return sum(read + written for _, read, written in self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        schema = func._schema
        values = [*args, *(kwargs.get(a.name) for a in schema.arguments[len(args) :])]
        overwrites = schema.name.endswith("_like") or schema.name in OVERWRITES
        read = []
        for argument, value in zip(schema.arguments, values):
            written = argument.alias_info is not None and argument.alias_info.is_write
            if not overwrites and (not written or not argument.kwarg_only):
                read += value if isinstance(value, (list, tuple)) else [value]
        returned = out if isinstance(out, (list, tuple)) else [out]
        entry = (schema.name, self.passes(read), self.passes(returned))
        if entry[1] or entry[2]:
            self.ops.append(entry)
        return out


OVERWRITES = ("aten::copy_", "aten::fill_", "aten::zero_")  # write their first argument only
KERNEL_READS = ("x0_prev", "noise", "grad", "history", "last_sample")  # besides x and m


@pytest.fixture
def count_launches(monkeypatch):
    """``fused_step`` launches recorded by the active ``_Traffic``: x, the model output and
    the tensors of ``KERNEL_READS`` read, the sample and x0 written (the kernel itself runs
    outside the mode: under the interpreter its own torch calls are not the step's)."""
    import inspect

    from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

    from fastdiff.kernels import fused_step as fs

    # every launch goes through step_with_config (fused_step's, and the drop-ins' cached one)
    launch = fs.step_with_config
    signature = inspect.signature(launch)

    def counted(*args, **kwargs):
        traffic = _get_current_dispatch_mode()
        with _disable_current_modes():
            prev, x0 = launch(*args, **kwargs)
        if isinstance(traffic, _Traffic):
            options = signature.bind(*args, **kwargs).arguments
            read = [options["x"], options["model_output"]]
            read += [options.get(name) for name in KERNEL_READS]
            traffic.ops.append(("fused_step", traffic.passes(read), traffic.passes([prev, x0])))
        return prev, x0

    monkeypatch.setattr(fs, "step_with_config", counted)


def _traffic_of_a_step(device_index, dtype, changed=False):
    """The ``_Traffic`` of both halves of a mid-plan step (a Karras plan of 10 steps: short
    steps, the one-launch form) on the triton backend, the second half given the first
    half's ``prev_sample`` (``changed``: a copy, as an inpainting loop's blend), with the
    step index on the host or (``device_index``: a graphed iteration's hooks) the device
    (every sample a copy of the prediction, as the graph's latents buffer)."""
    f = FusedHeunDiscreteScheduler(use_karras_sigmas=True, backend="triton")
    f.set_timesteps(10, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    x, m = (randn(SHAPE, generator=g).to(dtype) for _ in range(2))
    x = x * 5
    plan = f.timesteps
    indices = torch.arange(len(plan), device=DEVICE)
    halves = []
    for k in range(8):  # the tables and the graph buffers made, then step 3 measured
        if device_index:
            f.prepare_graph_step()
            t = torch.take(plan, indices[k])
        else:
            t = plan[k]
        with _Traffic(x) as traffic:
            out = f.step(m, t, x)
        x = out.prev_sample
        if device_index or (changed and k % 2 == 0):  # a graph's latents: a copy of it
            x = x.clone()
        halves.append(traffic)
    return halves[6:]


LAUNCH = "fused_step"
# (first half, second half): (name, passes read, written) of every tensor-sized op
HOST_TRAFFIC = {
    (torch.float32, False): ([(LAUNCH, 2, 2)], [(LAUNCH, 3, 2)]),
    (torch.bfloat16, False): ([(LAUNCH, 2, 2)], [(LAUNCH, 3, 2)]),
    # the sample changed between the halves: the midpoint lerp, in float32
    (torch.float32, True): ([(LAUNCH, 2, 2)], [("aten::lerp", 2, 1), (LAUNCH, 3, 2)]),
    (torch.bfloat16, True): (
        [(LAUNCH, 2, 2)],
        [("aten::_to_copy", 1, 2), ("aten::_to_copy", 1, 2), ("aten::lerp", 4, 2), (LAUNCH, 4, 2)],
    ),
}
# both halves alike: the compare with the first half's prediction (a bool tensor and its
# all()), the start kept (where, into the float32 start buffer), x0_prev = lerp(start, D, w)
# in float32 (D widened first for 16-bit samples) and the launch reading x0_prev
DEVICE_TRAFFIC = {
    torch.float32: [
        ("aten::eq", 2, 0.25),
        ("aten::all", 0.25, 0),
        ("aten::where", 2, 1),
        ("aten::lerp", 2, 1),
        (LAUNCH, 3, 2),
    ],
    torch.bfloat16: [
        ("aten::eq", 2, 0.5),
        ("aten::all", 0.5, 0),
        ("aten::where", 3, 2),
        ("aten::_to_copy", 1, 2),
        ("aten::lerp", 4, 2),
        (LAUNCH, 4, 2),
    ],
}


@pytest.mark.parametrize("changed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_path_traffic_per_half(dtype, changed, count_launches):
    """With the step index on the host each half is its contract's traffic, one launch and
    no other tensor-sized op (no copy of the start or of x0, no compare: the second half
    recognises the first half's prediction by identity and version): 4 passes (x, m read;
    x_next, x0 written), then 5 (x, m and the first half's x0 read); a sample changed
    between the halves adds the midpoint lerp (float32: 16-bit operands widened first)."""
    first, second = _traffic_of_a_step(False, dtype, changed)
    want_first, want_second = HOST_TRAFFIC[dtype, changed]
    assert first.ops == want_first and first.total() == 4
    assert second.ops == want_second
    assert second.total() == {False: 5, True: 8 if dtype == torch.float32 else 18}[changed]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_path_traffic_per_half(dtype, count_launches, as_device):
    """A graphed iteration's half (the half, its form and the step index on the device):
    the same ops in both halves, 13.5 passes in float32 and 23 in bfloat16."""
    for half in _traffic_of_a_step(True, dtype):
        assert half.ops == DEVICE_TRAFFIC[dtype]
        assert half.total() == {torch.float32: 13.5, torch.bfloat16: 23}[dtype]


@pytest.mark.parametrize("case", ["eps", "long-steps", "inpainting"])
def test_device_path_is_the_host_path_bitwise_in_bfloat16(case, as_device):
    """bfloat16 latents (the start kept in a float32 buffer on the device path): every
    iteration run as a graphed one gives the host-state loop's bits, both forms of the
    second half."""
    config, steps, inpainting = GRAPH_CASES[case]
    f = FusedHeunDiscreteScheduler(**config, backend="triton")
    g = torch.Generator().manual_seed(0)
    weight, x, known = (torch.randn(SHAPE, generator=g).to(DEVICE, torch.bfloat16) for _ in "wxk")
    mask = (torch.arange(SHAPE[-1], device=DEVICE) < 3).to(torch.bfloat16)
    blend = (lambda x: (1 - mask) * x + mask * known) if inpainting else None
    step_fn = _graph_loop(f, weight, blend)
    f.set_timesteps(steps, device=DEVICE)
    x = x * f.init_noise_sigma
    eager = _eager_loop(f, step_fn, x)
    f.set_timesteps(steps, device=DEVICE)
    graphed = _eager_loop(f, step_fn, x, device_index=True)
    assert graphed.dtype == torch.bfloat16 and torch.equal(graphed, eager)
    assert f.graph_state(x)[1].dtype == torch.float32


# -- pipelines and the mixture --------------------------------------------------------------


@pytest.mark.parametrize("backend, strength", [("triton", None), ("reference", 0.6)])
def test_stable_diffusion_style_loop_gives_stock_latents(backend, strength, seed):
    from test_diffusers_pipelines import stable_diffusion_loop, tiny_conditional_unet

    unet = tiny_conditional_unet()
    embeddings = torch.randn(4, 5, 8).to(DEVICE)
    original = HeunDiscreteScheduler(beta_schedule="scaled_linear")
    want = stable_diffusion_loop(unet, original, embeddings, seed, steps=3, strength=strength)
    fused = FusedHeunDiscreteScheduler.from_config(original.config, backend=backend)
    got = stable_diffusion_loop(unet, fused, embeddings, seed, steps=3, strength=strength)
    assert torch.isfinite(want).all()
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * scale)


def test_stable_diffusion_pipeline_swap(seed):
    from test_diffusers_pipelines import tiny_stable_diffusion

    pipe = tiny_stable_diffusion(HeunDiscreteScheduler(beta_schedule="scaled_linear"))
    embeds = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(seed))

    def latents():
        generator = torch.Generator().manual_seed(seed)
        kwargs = {"num_inference_steps": 2, "height": 8, "width": 8, "output_type": "latent"}
        return pipe(prompt_embeds=embeds, generator=generator, **kwargs).images

    want = latents()
    pipe.scheduler = FusedHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    got = latents()
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixture_reproduced_as_diffusers_does(backend, one_thread):
    """The exact denoiser of a 2-d three-component mixture, 10 Heun steps (19 evaluations),
    n = 2000: within 5 standard errors of the mixture (the odds of test_distribution.py) and
    a fit (sliced W2) within 10% of diffusers' Heun from the same initial noise."""
    from test_unipc_diffusers import _mismatches

    angles = torch.tensor([math.pi, math.pi / 3, -math.pi / 3], dtype=F64)
    means = 4.0 * torch.stack([angles.cos(), angles.sin()], 1)
    covs = torch.stack([torch.diag(torch.tensor([0.8, 0.5], dtype=F64))] * 3)
    gmm = GaussianMixture([0.5, 0.3, 0.2], means, covs)
    n = 2000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    results = []
    config = {"beta_schedule": "scaled_linear", "use_karras_sigmas": True}
    for s in (
        HeunDiscreteScheduler(**config),
        FusedHeunDiscreteScheduler(**config, backend=backend),
    ):
        s.set_timesteps(10, device=DEVICE)
        x = noise * s.init_noise_sigma
        for t in s.timesteps:
            x_in = s.scale_model_input(x, t)  # the VP point x / sqrt(1 + sigma^2)
            sigma = s.sigmas[s.step_index].double()
            x0 = gmm.posterior_mean(x_in.double().cpu(), 1.0 / (1.0 + sigma**2))
            eps = ((x.double().cpu() - x0) / sigma).float().to(DEVICE)
            x = s.step(eps, t, x).prev_sample
        results.append(x.cpu())
    theirs, ours = results
    assert _mismatches(gmm, ours) == []
    ours_w2, theirs_w2 = gmm.fit(ours).sliced_w2, gmm.fit(theirs).sliced_w2
    assert ours_w2 <= 1.1 * theirs_w2 + 1e-3, (ours_w2, theirs_w2)


# -- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("clone", [False, True])
def test_gpu_loop_has_no_host_sync(clone):
    """Both halves of every step with no host sync: timesteps from the plan (host index) or
    copies of them (device index and device stale-state guard)."""
    device = torch.device("cuda")
    f = FusedHeunDiscreteScheduler(backend="triton", use_karras_sigmas=True)
    d = HeunDiscreteScheduler(use_karras_sigmas=True)
    shape = (2, 4, 16, 16)
    for s in (f, d):
        s.set_timesteps(6, device=device)
    zeros = torch.zeros(shape, device=device)
    for t in (f.timesteps[0], f.timesteps[0].clone()):  # host and device index paths
        f.scale_model_input(zeros, t)
        f.step(zeros, t, zeros)
        f.set_timesteps(6, device=device)  # same plan: the tables built above are kept
    x = torch.randn(shape, device=device) * float(d.init_noise_sigma)
    ms = [torch.randn(shape, device=device) for _ in f.timesteps]
    xf = x.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t, m in zip(f.timesteps, ms):
            t = t.clone() if clone else t
            f.scale_model_input(xf, t)
            xf = f.step(m, t, xf).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    xd, scale = x.clone(), 0.0
    for t, m in zip(d.timesteps, ms):
        scale = max(scale, xd.abs().max().item())
        d.scale_model_input(xd, t)
        xd = d.step(m, t, xd).prev_sample
    assert_step_close(xf, xd, "heun", scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_captured_loop_is_bitwise_eager_and_never_syncs(dtype):
    """A real CUDA graph of one half step, replayed for every timestep: bitwise the eager
    loop's latents; the graphed iterations run eagerly have no host sync."""
    device = torch.device("cuda")
    f = FusedHeunDiscreteScheduler(backend="triton", use_karras_sigmas=True)
    shape = (2, 4, 16, 16)
    g = torch.Generator().manual_seed(0)
    weight, x = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    step_fn = _graph_loop(f, weight)
    f.set_timesteps(6, device=device)
    x = x * f.init_noise_sigma
    eager = _eager_loop(f, step_fn, x)  # tables built and uploaded, kernels compiled
    f.set_timesteps(6, device=device)
    assert torch.equal(_eager_loop(f, step_fn, x, device_index=True), eager)
    f.set_timesteps(6, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = _eager_loop(f, step_fn, x, device_index=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(again, eager)
    f.set_timesteps(6, device=device)
    loop = capture_denoising_loop(step_fn, x, scheduler=f)
    graphed, replayed = loop.run(x), loop.run(x)
    torch.cuda.synchronize()
    assert loop.captured
    assert torch.equal(graphed, eager) and torch.equal(replayed, eager)
