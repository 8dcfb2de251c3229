"""Flow matching: the plans, the reference math against closed forms, the kernel against the
reference (every dtype and layout), the native samplers, and the exact mixture velocity.

The flow path ``x_s = (1 - s) x0 + s eps`` is straight, so a model that knows the one data
point x0 (velocity ``(x - x0) / s``) is integrated exactly by one Euler step, and DPM-Solver++
on the path is exact too: these are the closed forms. The general (alpha, sigma) rules are
also checked against the VP ones (the flow state is a VP state scaled by
``c = sqrt((1 - s)^2 + s^2)``, and DPM-Solver++ is invariant to that scaling).

Distribution tests (same rules as tests/test_distribution.py: Z = 5 standard errors of n
exact samples). Biases measured once with n = 100000 (seed 0, float64), in standard errors
of n = 1000 samples (weights, means, covariances):

    FlowMatchEuler (28, shift 3)       0.2  2.3  1.6
    FlowMatchEuler (50, shift 3)       0.1  1.2  1.0
    FlowMatchEuler (50, shift 1)       0.2  2.2  0.4   (the coarse last steps near s = 0)
    FlowDPM++2M (20, shift 3)          0.0  0.3  0.5
    FlowDPM++2M (20, shift 1)          0.3  2.1  0.8
    FlowMatchEuler stochastic (28, 3)  4.9  0.1  9.3   (re-noising the posterior mean: the
                                                        variances collapse, diffusers' too)

So Euler (50, shift 3) is checked at n = 1000 (1.2 SE of bias) and DPM (20, shift 3) at
n = 2000 (0.7 SE); the stochastic form is compared with diffusers' in
test_flow_diffusers.py.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import TOLERANCES
from test_distribution import GMM, _mismatches
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from fastdiff import flow_tables, reference, tables
from fastdiff.flow import (
    FlowSchedule,
    calculate_shift,
    check_flow_sigmas,
    flow_sigmas,
    karras_sigmas,
    mixture_velocity,
    shift_sigmas,
    stretch_to_terminal,
    time_shift,
)
from fastdiff.flow_samplers import (
    FlowDPMSolverPP2MSampler,
    FlowMatchEulerSampler,
    FlowUniPCSampler,
)
from fastdiff.sampling import guidance_pair
from fastdiff.sampling import sample as _sample
from fastdiff.schedules import NoiseSchedule

F64 = torch.float64
sample = functools.partial(_sample, device="cpu", progress=False)
SCHEDULE = FlowSchedule()
SHAPE = (3, 4, 5, 7)  # odd sizes: not a multiple of any block

pytestmark = pytest.mark.usefixtures("one_thread")


def _f64(*values):
    return torch.tensor(values, dtype=F64)


# -- plans ------------------------------------------------------------------------------------


def test_shift_and_time_shift_closed_forms():
    s = _f64(1.0, 0.5, 0.25, 0.0)
    torch.testing.assert_close(shift_sigmas(s, 3.0), _f64(1.0, 0.75, 0.5, 0.0))
    # exponent 1: the dynamic shift is the static one with shift = e^mu (or mu, linear)
    torch.testing.assert_close(time_shift(s, 0.7), shift_sigmas(s, math.exp(0.7)))
    torch.testing.assert_close(time_shift(s, 2.5, "linear"), shift_sigmas(s, 2.5))
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)
    assert calculate_shift(2176) == pytest.approx(0.825)
    stretched = stretch_to_terminal(_f64(1.0, 0.6, 0.3), 0.1)
    torch.testing.assert_close(stretched, _f64(1.0, 1 - 0.4 * 0.9 / 0.7, 0.1))
    k = karras_sigmas(1.0, 0.01, 5)
    assert k[0] == pytest.approx(1.0) and k[-1] == pytest.approx(0.01)


def test_flow_sigmas_grids():
    for grid, first, last in (
        ("flow_match", 1.0, 0.001),
        ("dpm", 0.999, 0.999 / 4),
        ("unipc", 1.0 - 1e-6, 1 - 3 * 0.999 / 4),
    ):
        s = flow_sigmas(4, grid=grid)
        assert s.dtype == F64 and s.shape == (5,) and s[-1] == 0
        assert s[0] == pytest.approx(first) and s[-2] == pytest.approx(last)
        assert (s[1:] < s[:-1]).all()
    # SD3's flow_match grid ends at shift(1/T), shifted twice (as diffusers does)
    once = float(shift_sigmas(_f64(1e-3), 3.0))
    assert flow_sigmas(2, shift=3.0)[1] == pytest.approx(float(shift_sigmas(_f64(once), 3.0)))
    assert flow_sigmas(3, grid="unipc", shift=2.0)[0] == pytest.approx(1 - 1e-6)
    inverted = flow_sigmas(3, shift=3.0, invert=True)
    torch.testing.assert_close(inverted, torch.cat([1 - flow_sigmas(3, shift=3.0)[:-1], _f64(1)]))
    custom = flow_sigmas(sigmas=[1.0, 0.5], mu=0.0)  # e^0 = 1: unshifted
    torch.testing.assert_close(custom, _f64(1.0, 0.5, 0.0))
    torch.testing.assert_close(flow_sigmas(timesteps=[1000.0, 500.0]), custom)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": 3, "sigmas": [1.0, 0.5], "timesteps": [900.0, 500.0]}, "not both"),
        ({"sigmas": [0.5, 0.7]}, "strictly decreasing"),
        ({"sigmas": [1.2, 0.5]}, r"in \[0, 1\]"),
        ({"sigmas": [1.0, float("nan")]}, "finite"),
        ({"timesteps": [1200.0, 10.0]}, r"in \[0, 1000\]"),
        ({"num_steps": 3, "sigmas": [1.0, 0.5]}, "num_steps=3"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 3, "grid": "vp"}, "grid"),
        ({"num_steps": 3, "spacing": "cosine"}, "spacing"),
        ({"num_steps": 3, "grid": "dpm", "spacing": "karras"}, "flow_match"),
        ({"num_steps": 3, "shift": 0.0}, "shift"),
        ({"num_steps": 3, "mu": 0.5, "time_shift_type": "cubic"}, "time_shift_type"),
        ({"num_steps": 3, "mu": -0.5, "time_shift_type": "linear"}, "mu"),
        ({"num_steps": 3, "shift_terminal": 1.5}, "shift_terminal"),
        ({"num_steps": 1, "shift_terminal": 0.1}, "shift_terminal"),
    ],
)
def test_flow_sigmas_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flow_sigmas(**kwargs)


def test_check_flow_sigmas_leaves_input_alone():
    given = torch.tensor([1.0, 0.4, 0.6])
    with pytest.raises(ValueError, match="decreasing"):
        check_flow_sigmas(given)
    assert given.tolist() == pytest.approx([1.0, 0.4, 0.6])
    with pytest.raises(TypeError, match="sigmas"):
        check_flow_sigmas("abc")


# -- reference against closed forms ------------------------------------------------------------


def _path(seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)


@pytest.mark.parametrize("s", [1.0, 0.7, 0.05])
def test_flow_conversions_invert_the_path(s):
    x0, eps = _path()
    x = reference.flow_forward(x0, eps, s)
    torch.testing.assert_close(x, (1 - s) * x0 + s * eps)
    v = eps - x0
    torch.testing.assert_close(reference.flow_x0(x, v, s), x0)
    torch.testing.assert_close(reference.flow_eps(x, v, s), eps)
    torch.testing.assert_close(reference.flow_eps(x, x0, s, "sample"), eps)
    if s < 1:
        torch.testing.assert_close(reference.flow_x0(x, eps, s, "epsilon"), x0)
    per_sample = torch.tensor([s, 0.5, 0.2], dtype=F64)
    xb = reference.flow_forward(x0, eps, per_sample)
    torch.testing.assert_close(xb[1], 0.5 * x0[1] + 0.5 * eps[1])


@pytest.mark.parametrize("s, s_next", [(1.0, 0.6), (0.6, 0.25), (0.25, 0.0)])
def test_steps_are_exact_on_the_straight_path(s, s_next):
    """With the exact velocity of one data point, Euler, the stochastic step (noise eps) and
    DPM-Solver++ land on the path: x' = (1 - s') x0 + s' eps."""
    x0, eps = _path(1)
    x, v = reference.flow_forward(x0, eps, s), eps - x0
    want = reference.flow_forward(x0, eps, s_next)
    for prediction_type, m in (("flow_prediction", v), ("sample", x0)):
        kw = {"prediction_type": prediction_type}
        got, got_x0 = reference.flow_euler_step(x, m, s, s_next, **kw)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_x0, x0)
        got, _ = reference.flow_stochastic_step(x, m, s, s_next, eps, **kw)
        torch.testing.assert_close(got, want)
        if s < 1:
            dpm = functools.partial(reference.dpmpp_multistep_step, space="flow", **kw)
            got, _ = dpm(x, m, s, s_next)
            torch.testing.assert_close(got, want)
            got, _ = dpm(x, m, s, s_next, history=[(x0, 0.9)])
            torch.testing.assert_close(got, want)


def test_flow_dpm_is_vp_dpm_on_the_scaled_state():
    """x_s / c is a VP state with ab = (1 - s)^2 / c^2; DPM-Solver++ is invariant to the scale,
    so the flow step is c' times the VP step (first and second order)."""
    x, x0 = _path(2)
    m_prev = torch.randn_like(x0)
    s_prev, s, s_next = 0.9, 0.6, 0.3

    def c2(v):
        return (1 - v) ** 2 + v**2

    def ab(v):
        return (1 - v) ** 2 / c2(v)

    dpm = functools.partial(reference.dpmpp_multistep_step, prediction_type="sample")
    for x0_prev in (None, m_prev):
        flow_history = () if x0_prev is None else [(x0_prev, s_prev)]
        got, _ = dpm(x, x0, s, s_next, history=flow_history, space="flow")
        vp_history = () if x0_prev is None else [(x0_prev, ab(s_prev))]
        want, _ = dpm(x / math.sqrt(c2(s)), x0, ab(s), ab(s_next), history=vp_history)
        torch.testing.assert_close(got, want * math.sqrt(c2(s_next)))


def test_alpha_sigma_tables_generalize_the_vp_tables():
    ab = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=F64)
    ab_next = torch.tensor([0.3, 0.6, 0.9, 1.0], dtype=F64)
    ab_prev = torch.tensor([0.5, 0.05, 0.3, 0.6], dtype=F64)
    first = torch.tensor([True, False, False, True])
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        want = tables.dpmpp_2m_table(ab, ab_next, ab_prev, prediction_type, first)
        pairs = [t for a in (ab, ab_next, ab_prev) for t in (a.sqrt(), (1 - a).sqrt())]
        got = flow_tables.dpmpp_2m_table_as(*pairs, prediction_type, first)
        torch.testing.assert_close(got, want)


# -- the kernel against the reference ----------------------------------------------------------


def _x_and_output(dtype, layout, seed=3, count=2, device="cpu"):
    """``count`` random tensors of SHAPE (x, the model output, ...) in dtype and layout."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    draws = [torch.randn(SHAPE, generator=g) for _ in range(count)]
    return [t.to(device, dtype).contiguous(memory_format=fmt) for t in draws]


def _both(sampler_cls, **kwargs):
    return [sampler_cls(SCHEDULE, backend=b, **kwargs) for b in ("triton", "reference")]


CASES = [
    (FlowMatchEulerSampler, {"steps": 5, "shift": 3.0}),
    (FlowMatchEulerSampler, {"steps": 5, "mu": 0.9, "prediction_type": "sample"}),
    (FlowMatchEulerSampler, {"steps": 5, "stochastic": True, "clip_sample_range": 1.5}),
    (FlowMatchEulerSampler, {"steps": [0.9, 0.5, 0.2], "prediction_type": "epsilon"}),
    (FlowMatchEulerSampler, {"steps": 4, "thresholding": (0.9, 2.0)}),
    (FlowDPMSolverPP2MSampler, {"steps": 5, "shift": 3.0}),
    (FlowDPMSolverPP2MSampler, {"steps": 5, "prediction_type": "epsilon", "clip_sample_range": 2}),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda k: CASES[k][0].__name__ + str(k))
def test_kernel_matches_reference(case, dtype, layout, device):
    cls, kwargs = CASES[case]
    fused, ref = _both(cls, **kwargs)
    x, m, noise, x0_prev = _x_and_output(dtype, layout, count=4, device=device)
    x0_prev = x0_prev if cls.multistep else None
    for i in (0, 1, fused.num_steps - 1, torch.tensor([2, 0, 1], device=device)):
        kw = {"noise": noise, "x0_prev": x0_prev}
        out = torch.full_like(x, float("nan"))  # poisoned: an unwritten element fails
        got = fused.step(x, m, i, out=out, **kw)
        want = ref.step(x.double(), m.double(), i, **kw)
        pairs = [(got.prev_sample, want.prev_sample)]
        pairs.append((got.pred_original_sample, want.pred_original_sample))
        for g, w in pairs:
            assert g.dtype == dtype
            if layout == "channels_last":
                assert g.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(g.double(), w, **TOLERANCES[dtype])


def test_guided_step_matches_reference(device):
    fused, ref = _both(FlowMatchEulerSampler, steps=4, shift=2.0)
    x, _ = _x_and_output(torch.float32, "contiguous", device=device)
    m = torch.randn(2 * x.shape[0], *x.shape[1:], device=device)
    got = fused.step(x, m, 1, guidance_scale=4.0, guidance_rescale=0.5)
    want = ref.step(x.double(), m.double(), 1, guidance_scale=4.0, guidance_rescale=0.5)
    torch.testing.assert_close(got.prev_sample.double(), want.prev_sample, **TOLERANCES[x.dtype])


# -- the samplers ------------------------------------------------------------------------------


def test_sampler_plan_and_conditioning():
    sampler = FlowMatchEulerSampler(SCHEDULE, 4, shift=3.0)
    torch.testing.assert_close(sampler.sigmas, flow_sigmas(4, shift=3.0))
    assert sampler.num_steps == 4 and not sampler.stochastic and not sampler.multistep
    t = sampler.model_condition(1, 2, "cpu")
    assert t.dtype == torch.float32 and t.shape == (2,)
    torch.testing.assert_close(t, (sampler.sigmas[1] * 1000).float().expand(2))
    by_sigma = FlowMatchEulerSampler(SCHEDULE, 4, shift=3.0, conditioning="sigma")
    per_sample = by_sigma.model_condition(torch.tensor([0, 3]), 2, "cpu")
    torch.testing.assert_close(per_sample, sampler.sigmas[[0, 3]].float())
    dpm = FlowDPMSolverPP2MSampler(SCHEDULE, 6, shift=3.0)
    torch.testing.assert_close(dpm.sigmas, flow_sigmas(6, grid="dpm", shift=3.0))
    assert dpm.multistep
    assert "FlowMatchEulerSampler(steps=4" in repr(sampler)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (FlowMatchEulerSampler, {"prediction_type": "v_prediction"}, "VP velocity"),
        (FlowMatchEulerSampler, {"prediction_type": "score"}, "prediction_type"),
        (FlowMatchEulerSampler, {"prediction_type": "epsilon"}, "epsilon"),
        (FlowMatchEulerSampler, {"conditioning": "log_snr"}, "conditioning"),
        (FlowMatchEulerSampler, {"steps": [0.5, 0.6]}, "decreasing"),
        (FlowMatchEulerSampler, {"steps": [1.5, 0.6]}, r"\[0, 1\]"),
        (FlowMatchEulerSampler, {"clip_sample_range": 1, "thresholding": (0.9, 1)}, "exclusive"),
        (FlowMatchEulerSampler, {"backend": "cuda"}, "backend"),
        (FlowDPMSolverPP2MSampler, {"grid": "flow_match"}, "below 1"),
    ],
)
def test_sampler_bad_input(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(SCHEDULE, **kwargs)


def test_vp_schedule_is_refused():
    with pytest.raises(TypeError, match="FlowSchedule"):
        FlowMatchEulerSampler(NoiseSchedule.create("linear", 1000), 10)


def test_flow_schedule():
    x0, eps = _path(5)
    got = SCHEDULE.add_noise(x0, eps, torch.tensor([250.0, 500.0, 1000.0]))
    torch.testing.assert_close(got[1], reference.flow_forward(x0[1], eps[1], 0.5))
    torch.testing.assert_close(got[2], eps[2])
    assert SCHEDULE.conditioning(torch.tensor(250.0), "sigma").item() == 0.25
    with pytest.raises(ValueError, match="num_train_timesteps"):
        FlowSchedule(0)


# -- the exact mixture velocity and the distribution ------------------------------------------


def _tweedie_velocity(x, s):
    """v = (x - E[x0 | x_s]) / s with E from the score of the flow-noised mixture (Tweedie:
    x_s = a x0 + b eps gives E[x0 | x] = (x + b^2 grad log p(x)) / a), by autograd through
    torch.distributions: independent of fastdiff.gmm."""
    a, b = 1 - s, s
    covs = a**2 * GMM.covariances + b**2 * torch.eye(2, dtype=F64)
    p = MixtureSameFamily(Categorical(probs=GMM.weights), MultivariateNormal(a * GMM.means, covs))
    x = x.detach().clone().requires_grad_(True)
    (score,) = torch.autograd.grad(p.log_prob(x).sum(), x)
    return (x - (x + b**2 * score) / a).detach() / s


@pytest.mark.parametrize("conditioning", ["timestep", "sigma"])
def test_mixture_velocity_matches_tweedie(conditioning):
    model = mixture_velocity(GMM, conditioning=conditioning)
    x = torch.randn(6, 2, dtype=F64) * 4
    for s in (0.9, 0.5, 0.1):
        cond = torch.full((6,), s * 1000 if conditioning == "timestep" else s, dtype=F64)
        torch.testing.assert_close(model(x, cond), _tweedie_velocity(x, s), rtol=1e-8, atol=1e-8)
    # at s = 1 the state says nothing: x0 = E[x0], v = x - E[x0]
    v = model(x, torch.tensor(1000.0 if conditioning == "timestep" else 1.0))
    torch.testing.assert_close(v, x - GMM.mean, rtol=1e-10, atol=1e-10)
    assert model(x.float(), torch.tensor(500.0 if conditioning == "timestep" else 0.5)).dtype == (
        torch.float32
    )


@pytest.mark.parametrize(
    "cls, kwargs, n",
    [
        (FlowMatchEulerSampler, {"steps": 50, "shift": 3.0}, 1000),
        (FlowDPMSolverPP2MSampler, {"steps": 20, "shift": 3.0}, 2000),
        (FlowUniPCSampler, {"steps": 20, "shift": 3.0}, 2000),
    ],
    ids=["euler-50", "dpmpp_2m-20", "unipc-20"],
)
def test_sampler_reproduces_the_mixture(cls, kwargs, n):
    sampler = cls(SCHEDULE, backend="reference", **kwargs)
    x = sample(mixture_velocity(GMM), sampler, shape=(n, 2), seed=1)
    assert _mismatches(GMM, x) == []


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize(
    "order, solver_type, predict_x0", [(1, "bh2", True), (2, "bh1", True), (3, "bh2", True)]
)
def test_unipc_matches_diffusers_in_flow_mode(order, solver_type, predict_x0, backend, device):
    """FlowUniPCSampler against diffusers' UniPCMultistepScheduler with use_flow_sigmas (Wan).
    The default plans agree to float32 rounding; the solver is compared on diffusers' own
    (float32) plan, given as custom sigmas: near s = 1, ``1 - s`` keeps only ~4 digits in
    float32, which moves log-SNR steps by ~1e-3 (bh1's step 1 by 2e-3)."""
    diffusers = pytest.importorskip("diffusers")
    options = dict(solver_order=order, solver_type=solver_type, predict_x0=predict_x0)
    d = diffusers.UniPCMultistepScheduler(
        use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", **options
    )
    d.set_timesteps(7)
    default = FlowUniPCSampler(SCHEDULE, 7, shift=3.0, backend=backend, **options)
    torch.testing.assert_close(default.sigmas.float(), d.sigmas, rtol=1e-6, atol=1e-6)
    s = FlowUniPCSampler(SCHEDULE, d.sigmas[:-1].double(), backend=backend, **options)
    g = torch.Generator().manual_seed(order)
    x = torch.randn(2, 3, 4, 5, generator=g)
    xs = x.to(device)
    for k, t in enumerate(d.timesteps):
        m = torch.randn(2, 3, 4, 5, generator=g)
        x = d.step(m, t, x).prev_sample
        xs = s.step(xs, m.to(device), k, return_x0=False).prev_sample
        if not torch.isfinite(x).all():
            # bh1 on the step to s = 0: diffusers' float32 gives 0 * inf; ours the limit
            assert solver_type == "bh1" and k == len(d.timesteps) - 1
            assert torch.isfinite(xs).all()
            break
        scale = max(1.0, x.abs().max().item())
        torch.testing.assert_close(xs.cpu(), x, rtol=1e-5, atol=1e-5 * scale)


def test_wrong_shift_fails_the_check():
    # the plan visits levels 10x too low: the model is told s where the state is at ~10 s
    model = mixture_velocity(GMM)

    def wrong(x, t):
        return model(x, t / 10)

    x = sample(wrong, FlowMatchEulerSampler(SCHEDULE, 20, backend="reference"), shape=(1000, 2))
    assert len(_mismatches(GMM, x)) >= 3


def test_guidance_samples_one_class():
    component = 1
    model = guidance_pair(mixture_velocity(GMM), mixture_velocity(GMM, component=component))
    sampler = FlowDPMSolverPP2MSampler(SCHEDULE, 20, shift=3.0, backend="reference")
    x = sample(model, sampler, shape=(500, 2), guidance_scale=1.0, seed=2)
    assert (GMM.responsibilities(x).argmax(1) == component).all()


# -- GPU: no host sync in a step, and the native loop in a CUDA graph --------------------------


def _velocity_net(dtype):
    """A capturable stand-in for a flow transformer: v = tanh(conv(x)) * (1 + t / T)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).to("cuda", dtype).eval()

    def model(x, t):
        return torch.tanh(conv(x)) * (1 + t.to(x.dtype)[:, None, None, None] / 1000)

    return model


GPU_SAMPLERS = [
    (FlowMatchEulerSampler, {"shift": 3.0}),
    (FlowMatchEulerSampler, {"shift": 3.0, "stochastic": True}),
    (FlowDPMSolverPP2MSampler, {"shift": 3.0}),
    (FlowUniPCSampler, {"shift": 3.0}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(GPU_SAMPLERS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_steps_have_no_host_sync_and_graph_equals_eager(case, dtype):
    cls, kwargs = GPU_SAMPLERS[case]
    sampler = cls(SCHEDULE, 8, backend="triton", **kwargs)
    model = _velocity_net(dtype)
    shape = (3, 4, 16, 16)
    x = torch.randn(shape, device="cuda", dtype=dtype)
    seeds = torch.arange(3, device="cuda")
    index = torch.zeros((), dtype=torch.int64, device="cuda")
    sampler.step(x, x, 0, seeds=seeds)  # compile and upload outside the checked region
    sampler.device_tables(x.device)  # (UniPC's int-indexed step reads only its own tables)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x0 = None
        for _ in range(sampler.num_steps):
            cond = sampler.model_condition(index, 3, "cuda")
            with torch.no_grad():  # (UniPC's step is not differentiable)
                out = sampler.step(x, model(x, cond), index, x0_prev=x0, seeds=seeds)
            x, x0 = out.prev_sample, out.pred_original_sample if sampler.multistep else None
            index = index + 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.no_grad():
        run = functools.partial(sample, model, sampler, shape=shape, seed=1, dtype=dtype)
        eager = run(device="cuda")
        graphed = run(device="cuda", cuda_graph=True)
    assert torch.isfinite(eager).all() and torch.equal(graphed, eager)
