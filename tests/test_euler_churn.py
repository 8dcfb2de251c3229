"""FusedEulerDiscreteScheduler's churn (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``)
against diffusers' EulerDiscreteScheduler, step by step (``run_pair`` of
test_diffusers_adapter.py: same configs, same model outputs, same generator, the same
tolerance), on both backends; the noise draws (diffusers draws only where gamma > 0) are
checked through the generators' states; bad churn options; no host sync."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("diffusers")

from conftest import TOLERANCES  # noqa: E402
from diffusers import EulerDiscreteScheduler  # noqa: E402
from diffusers_cases import BACKENDS, DEVICE  # noqa: E402
from test_diffusers_adapter import (  # noqa: E402
    SHAPE,
    assert_step_close,
    denoise,
    device_timesteps,  # noqa: F401 (a fixture)
    randn,
    random_case,
    run_pair,
)

from fastdiff import philox, reference, tables  # noqa: E402
from fastdiff.diffusers import FusedEulerDiscreteScheduler  # noqa: E402
from fastdiff.kernels.fused_step import fused_step  # noqa: E402


@pytest.fixture
def seed():
    return random.randrange(2**31)


def random_churn(rng: random.Random) -> dict:
    """Churn options: every step, a sigma window (some steps), gamma at its sqrt(2) - 1 cap."""
    kwargs = {"s_churn": rng.choice([rng.uniform(0.05, 3.0), 100.0])}
    if rng.random() < 0.5:
        kwargs["s_tmin"] = rng.uniform(0.0, 1.0)
        kwargs["s_tmax"] = rng.choice([float("inf"), rng.uniform(2.0, 12.0)])
    if rng.random() < 0.5:
        kwargs["s_noise"] = rng.uniform(0.9, 1.1)
    return kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_churn_table_in_one_launch_is_the_reference(prediction_type, dtype, device):
    """``tables.euler_churn_table`` applied by one kernel launch (``x0_noise``: the x0
    written is that of the churned sample) against ``reference.euler_churn_step`` in
    float64, rows with and without churn, into outputs poisoned with NaN; odd shapes; the
    noise a tensor z, or made in the kernel (Philox seeds; the reference gets the same
    stream from ``fastdiff.philox``)."""
    g = torch.Generator().manual_seed(random.randrange(2**31))
    sigma = torch.tensor([14.6, 3.0, 0.4], dtype=torch.float64)
    hat = sigma * torch.tensor([1.4142135623730951, 1.0, 1.2], dtype=torch.float64)
    sigma_next = torch.tensor([3.0, 0.4, 0.0], dtype=torch.float64)
    table = tables.euler_churn_table(sigma, hat, sigma_next, prediction_type, 1.003)
    table = table.float().to(device)
    shape = (3, 5, 7, 9)
    seeds = torch.randint(0, 2**62, (shape[0],), generator=g).to(device)
    for i, philox_noise in [(0, False), (1, False), (2, False), (0, True), (2, True)]:
        x, m, z = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
        x = x * sigma[i].item()
        out, x0 = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        rows = torch.tensor([i], device=device)
        if philox_noise:
            fused_step(x, m, table, rows, seeds=seeds, out=out, x0_out=x0, x0_noise=True)
            z = philox.randn(seeds, rows.reshape(()), shape)
        else:
            fused_step(x, m, table, rows, noise=z, out=out, x0_out=x0, x0_noise=True)
        want, want_x0 = reference.euler_churn_step(
            x.double(),
            m.double(),
            sigma[i],
            hat[i],
            sigma_next[i],
            prediction_type=prediction_type,
            s_noise=1.003,
            noise=z.double(),
        )
        tol = TOLERANCES[dtype]
        scale = 1 + x.double().abs().max().item()
        atol = tol["atol"] * scale
        torch.testing.assert_close(out.double(), want, rtol=tol["rtol"], atol=atol)
        torch.testing.assert_close(x0.double(), want_x0, rtol=tol["rtol"], atol=atol)


def test_x0_noise_needs_noise_and_no_history(device):
    """``x0_noise`` without the step's noise (nothing to add) is refused, naming it."""
    x = torch.randn(2, 3, 4, device=device)
    table = torch.zeros(1, len(tables.COLUMNS), device=device)
    rows = torch.zeros(1, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="x0_noise needs the step's noise"):
        fused_step(x, x, table, rows, x0_noise=True)


def test_x0_noise_gradients_are_the_reference(device):
    """The backward of a churn step (``x0_noise``): the noise's gradient carries the x0's
    ``x0_z`` term, as autograd through ``reference.euler_churn_step`` gives in float64."""
    g = torch.Generator().manual_seed(random.randrange(2**31))
    sigma, hat, nxt = (torch.tensor([v], dtype=torch.float64) for v in (3.0, 4.2, 0.4))
    table = tables.euler_churn_table(sigma, hat, nxt, "epsilon", 1.0).float().to(device)
    rows = torch.zeros(1, dtype=torch.long, device=device)
    x, m, z, gy, gx0 = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) for _ in range(5))
    inputs = [t.to(device, torch.float32).requires_grad_() for t in (x, m, z)]
    out, x0 = fused_step(*inputs[:2], table, rows, noise=inputs[2], x0_noise=True)
    got = torch.autograd.grad((out * gy.to(out)).sum() + (x0 * gx0.to(x0)).sum(), inputs)
    ref = [t.clone().requires_grad_() for t in (x, m, z)]
    want_out, want_x0 = reference.euler_churn_step(
        ref[0], ref[1], sigma[0], hat[0], nxt[0], prediction_type="epsilon", noise=ref[2]
    )
    want = torch.autograd.grad((want_out * gy).sum() + (want_x0 * gx0).sum(), ref)
    for name, a, b in zip(("x", "model_output", "noise"), got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("draw", range(3))
def test_philox_churn_backends_agree(draw, seed):
    """``noise="philox"``: the kernel makes the churn noise (and adds it to the x0 it
    writes); the reference backend takes the same stream from ``fastdiff.philox``: the same
    samples and x0 at every step of random churn configs, to the dtype's tolerance."""
    rng = random.Random(seed)
    case = random_case("euler", rng)
    churn = {"s_churn": rng.uniform(0.5, 3.0), "s_noise": rng.uniform(0.9, 1.1)}
    results = []
    for backend in ("triton", "reference"):
        f = FusedEulerDiscreteScheduler(**case["config"], backend=backend, noise="philox")
        f.set_timesteps(5, device=DEVICE)
        f.set_begin_index(0)  # (a plan whose first timestep repeats would start at step 1)
        torch.manual_seed(seed)  # the Philox seeds come from the global RNG
        gen = torch.Generator().manual_seed(seed + 1)
        x = randn(SHAPE, generator=gen) * f.init_noise_sigma
        steps = []
        for t in f.timesteps:
            out = f.step(randn(SHAPE, generator=gen), t, f.scale_model_input(x, t), **churn)
            x = out.prev_sample
            steps.append((out.prev_sample, out.pred_original_sample))
        results.append(steps)
    for k, ((xt, x0t), (xr, x0r)) in enumerate(zip(*results)):
        scale = 1 + xr.abs().max().item()
        assert_step_close(xt, xr, f"step {k} prev_sample", scale)
        assert_step_close(x0t, x0r, f"step {k} pred_original_sample", scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise_mode", ["generator", "global"])
@pytest.mark.parametrize("draw", range(5))
def test_random_churn_configs_match_diffusers(backend, noise_mode, draw, seed):
    """Random Euler configs (prediction types, Karras / exponential / beta sigmas, custom
    plans) with random churn; "global": no generator, the global RNG in the same state after
    every step (the same draws, on the same steps)."""
    rng = random.Random(seed)
    case = random_case("euler", rng)
    case["step"] = random_churn(rng)
    # a window that churns some steps only needs host-known timesteps with torch's noise
    # (``FusedEulerDiscreteScheduler._churn_noise``): the plan's own, as a pipeline passes
    run_pair("euler", case, backend, seed, noise_mode=noise_mode, own_timesteps=True)


def _pair(backend, **config):
    d = EulerDiscreteScheduler(**config)
    f = FusedEulerDiscreteScheduler.from_config(d.config, backend=backend)
    d.set_timesteps(6, device=DEVICE)
    f.set_timesteps(6, device=DEVICE)
    return d, f


def _loop(d, f, seed, **kwargs):
    """Both schedulers over the plan with the same generator seed; compares every step and
    the generators' final states."""
    inputs = torch.Generator().manual_seed(seed + 1)
    x = randn(SHAPE, generator=inputs) * d.init_noise_sigma
    xd, xf = x.clone(), x.clone()
    gd, gf = torch.Generator(DEVICE).manual_seed(seed), torch.Generator(DEVICE).manual_seed(seed)
    scale = 0.0
    for k, (td, tf) in enumerate(zip(d.timesteps, f.timesteps)):
        m = randn(SHAPE, generator=inputs)
        scale = max(scale, xd.abs().max().item())
        xd = denoise(d, m, td, xd, generator=gd, **kwargs)
        xf = denoise(f, m, tf, xf, generator=gf, **kwargs)
        assert_step_close(xf, xd, f"step {k} {kwargs}", scale)
    assert torch.equal(gd.get_state(), gf.get_state()), "not the draws diffusers makes"
    return xf


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_compares_float32_sigmas_as_diffusers(backend, seed):
    """diffusers compares its float32 sigmas with s_tmin / s_tmax in float32: a bound just
    above a sigma in float64 but equal to it in float32 still churns that step."""
    d, f = _pair(backend)
    sigma = d.sigmas[2]
    above = float(sigma) * (1 + 2**-27)  # rounds to sigma in float32
    assert above > float(sigma) and torch.tensor(above, dtype=torch.float32) == sigma
    _loop(d, f, seed, s_churn=1.0, s_tmin=above, s_tmax=above)
    d, f = _pair(backend)
    _loop(d, f, seed, s_churn=1.0, s_tmin=float(sigma), s_tmax=float(sigma))


@pytest.mark.parametrize("backend", BACKENDS)
def test_churn_outside_the_window_is_the_plain_step(backend, seed):
    """No step in the window: diffusers draws nothing and steps as without churn."""
    d, f = _pair(backend, prediction_type="v_prediction")
    got = _loop(d, f, seed, s_churn=2.0, s_tmin=1e4)
    d, f = _pair(backend, prediction_type="v_prediction")
    torch.testing.assert_close(got, _loop(d, f, seed), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"s_churn": -1.0}, ValueError, "s_churn"),
        ({"s_churn": float("nan")}, ValueError, "s_churn"),
        ({"s_churn": "1"}, TypeError, "s_churn"),
        ({"s_churn": 1.0, "s_noise": float("nan")}, ValueError, "s_noise"),
        ({"s_churn": 1.0, "s_noise": float("inf")}, ValueError, "s_noise"),
        ({"s_churn": 1.0, "s_tmin": float("nan")}, ValueError, "s_tmin"),
        ({"s_churn": 1.0, "s_tmax": None}, ValueError, "s_tmax"),
    ],
)
def test_bad_churn_options_name_the_argument(kwargs, error, match):
    """What diffusers would step with silently (a negative gamma lowers sigma_hat below
    sigma; NaN) is refused, naming the option."""
    f = FusedEulerDiscreteScheduler(backend="reference")
    f.set_timesteps(3)
    x = randn(SHAPE)
    with pytest.raises(error, match=match):
        f.step(x, f.timesteps[0], x, **kwargs)
    assert f.step_index is None  # refused before any state changed


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_step_index_no_host_reads(backend, device_timesteps, seed):  # noqa: F811
    """Timesteps on the device (a device step index): every step of the plan churns, so the
    draws are diffusers' without reading the step index; nothing is read on the host."""
    d, f = _pair(backend, prediction_type="epsilon", use_karras_sigmas=True)
    zeros = torch.zeros(SHAPE, device=DEVICE)
    f.step(zeros, f.timesteps[0], zeros, s_churn=1.0)  # build the tables once
    f.set_timesteps(6, device=DEVICE)
    x = randn(SHAPE) * d.init_noise_sigma
    xd, xf = x.clone(), x.clone()
    gd, gf = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    scale = 0.0
    for k, t in enumerate(d.timesteps):
        m = randn(SHAPE)
        scale = max(scale, xd.abs().max().item())
        xd = denoise(d, m, t, xd, generator=gd, s_churn=1.0)
        device_timesteps.active = True
        try:
            xf = denoise(f, m, t.clone(), xf, generator=gf, s_churn=1.0)
        finally:
            device_timesteps.active = False
        assert isinstance(f.step_index, torch.Tensor)
        assert_step_close(xf, xd, f"step {k}", scale)
    assert torch.equal(gd.get_state(), gf.get_state())


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_step_index_with_a_window(backend, device_timesteps):  # noqa: F811
    """A window that churns some steps: with torch's noise, whether diffusers draws at a
    device step index is unknown without a sync (refused, naming the options); with Philox
    noise every step draws, and the result is the host-index loop's, bitwise."""
    window = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 5.0}
    d, f = _pair(backend)
    x = randn(SHAPE)
    with pytest.raises(ValueError, match="s_tmin"):
        f.step(x, f.timesteps[0].clone(), x, **window)

    def run(device_index):
        f = FusedEulerDiscreteScheduler(backend=backend, noise="philox")
        f.set_timesteps(6, device=DEVICE)
        torch.manual_seed(7)  # the Philox seed is drawn from the global RNG
        gen = torch.Generator().manual_seed(3)
        xf = randn(SHAPE, generator=gen) * f.init_noise_sigma
        for k, t in enumerate(f.timesteps):
            device_timesteps.active = device_index and k > 0  # (the seed is read at step 0)
            try:
                xf = denoise(
                    f, randn(SHAPE, generator=gen), t.clone() if device_index else t, xf, **window
                )
            finally:
                device_timesteps.active = False
        return xf

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=0)


# -- GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("device_index", [False, True])
def test_gpu_churn_loop_has_no_host_sync(device_index):
    """The churned loop on the card with the step index on the host (the plan's own
    timesteps) or on the device (copies), a CUDA generator: no sync, diffusers' latents."""
    device = torch.device("cuda")
    d = EulerDiscreteScheduler(use_karras_sigmas=True)
    f = FusedEulerDiscreteScheduler.from_config(d.config, backend="triton")
    shape = (2, 4, 16, 16)
    churn = {"s_churn": 1.5, "s_noise": 1.003}
    for s in (f, d):
        s.set_timesteps(6, device=device)
    zeros = torch.zeros(shape, device=device)
    f.step(zeros, f.timesteps[0], zeros, **churn)  # build and upload the tables once
    f.set_timesteps(6, device=device)
    x = torch.randn(shape, device=device) * float(d.init_noise_sigma)
    ms = [torch.randn(shape, device=device) for _ in f.timesteps]
    ts = [t.clone() if device_index else t for t in f.timesteps]
    gen_f = torch.Generator(device).manual_seed(0)
    gen_d = torch.Generator(device).manual_seed(0)
    xf = x.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t, m in zip(ts, ms):
            xf = denoise(f, m, t, xf, generator=gen_f, **churn)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    xd, scale = x.clone(), 0.0
    for t, m in zip(d.timesteps, ms):
        scale = max(scale, xd.abs().max().item())
        xd = denoise(d, m, t, xd, generator=gen_d, **churn)
    assert_step_close(xf, xd, "churn", scale)
    assert torch.equal(gen_f.get_state(), gen_d.get_state())


@pytest.mark.gpu
def test_gpu_churn_captured_loop_equals_eager_bitwise():
    """capture_denoising_loop with churn and Philox noise (a device step index: every step
    draws, the unchurned ones with coefficient 0): bitwise the eager loop's latents."""
    from fastdiff.diffusers import capture_denoising_loop

    device = torch.device("cuda")
    f = FusedEulerDiscreteScheduler(backend="triton", noise="philox")
    shape = (2, 4, 16, 16)
    weight = torch.randn(shape, device=device)
    churn = {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 5.0}

    def step_fn(x, t):
        m = torch.tanh(f.scale_model_input(x, t) * weight)
        return f.step(m, t, x, **churn).prev_sample

    x0 = torch.randn(shape, device=device) * float(f.init_noise_sigma)
    f.set_timesteps(6, device=device)
    torch.manual_seed(1)
    eager = x0.clone()
    for t in f.timesteps:
        eager = step_fn(eager, t)
    f.set_timesteps(6, device=device)
    torch.manual_seed(1)
    loop = capture_denoising_loop(step_fn, x0, scheduler=f)
    assert torch.equal(loop.run(x0), eager)
