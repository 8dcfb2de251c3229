"""The flow drop-ins against diffusers: FusedFlowMatchEulerDiscreteScheduler and
FusedDPMSolverMultistepScheduler with flow sigmas, step by step over random configs of every
option, both backends; the flow plans of fastdiff.flow against diffusers' own; the contract
(signatures, config round trip, scale_noise, begin index, noise, no host reads); bad input.

Tolerance as in test_diffusers_adapter.py (float32: rtol 1e-4 and atol 1e-4 times the largest
value the loop has seen). The flow Euler step is ``x + (s' - s) v`` in both, so the kernel's
float32 result is diffusers' own to an ulp; DPM-Solver++ folds its schedule values into
float64 coefficients and differs by a few float32 ulps of its largest term.
"""

from __future__ import annotations

import inspect
import math
import random

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers_cases import BACKENDS, DEVICE  # noqa: E402
from test_diffusers_adapter import assert_step_close, device_timesteps, randn  # noqa: E402, F401
from test_distribution import GMM, _mismatches  # noqa: E402

from fastdiff.diffusers import FusedDDIMScheduler  # noqa: E402
from fastdiff.diffusers.dpm import FusedDPMSolverMultistepScheduler  # noqa: E402
from fastdiff.diffusers.flow_match import FusedFlowMatchEulerDiscreteScheduler  # noqa: E402
from fastdiff.flow import flow_sigmas, mixture_velocity  # noqa: E402

SHAPE = (2, 3, 5, 7)
FLOW = (FlowMatchEulerDiscreteScheduler, FusedFlowMatchEulerDiscreteScheduler)
DPM = (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler)
SANA = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}
# the two drop-ins, each with a typical config (SD3's shift, Sana's flow sigmas)
BOTH = pytest.mark.parametrize(
    "classes, config", [(FLOW, {"shift": 3.0}), (DPM, SANA)], ids=["fm", "dpm"]
)


@pytest.fixture
def seed():
    return random.randrange(2**31)


# -- random configs ---------------------------------------------------------------------------


def flow_case(rng: random.Random) -> dict:
    """A FlowMatchEulerDiscreteScheduler config with set_timesteps arguments."""
    cfg = {"shift": rng.choice([1.0, 3.0, rng.uniform(0.5, 6.0)])}
    steps = rng.randint(1, 8)
    set_kwargs = {"num_inference_steps": steps}
    if rng.random() < 0.4:
        cfg["use_dynamic_shifting"] = True
        cfg["time_shift_type"] = rng.choice(["exponential", "linear"])
        set_kwargs["mu"] = rng.uniform(0.2, 2.0)
    if rng.random() < 0.3 and steps > 1:
        cfg["shift_terminal"] = rng.uniform(0.02, 0.3)
    spacing = rng.choice(["plain", "plain", "karras", "exponential", "beta"])
    if spacing != "plain" and steps > 1:
        cfg[f"use_{spacing}_sigmas"] = True
    cfg["invert_sigmas"] = rng.random() < 0.15
    cfg["stochastic_sampling"] = rng.random() < 0.3
    custom = rng.random()
    levels = sorted(rng.sample(range(1, 1000), steps), reverse=True)
    if custom < 0.2:
        set_kwargs["sigmas"] = [t / 1000 for t in levels]
    elif custom < 0.3:
        set_kwargs["timesteps"] = [float(t) for t in levels]
    elif custom < 0.35:  # CogView4 passes both
        set_kwargs["sigmas"] = [t / 1000 for t in levels]
        set_kwargs["timesteps"] = [float(t) for t in levels]
    return {"config": cfg, "set": set_kwargs}


def dpm_case(rng: random.Random) -> dict:
    """A DPMSolverMultistepScheduler config on flow sigmas (Sana) with set_timesteps arguments."""
    cfg = {
        "use_flow_sigmas": True,
        "flow_shift": rng.choice([1.0, 3.0, rng.uniform(0.5, 6.0)]),
        "prediction_type": rng.choice(["flow_prediction", "flow_prediction", "sample", "epsilon"]),
        "solver_order": rng.choice([1, 2]),
        "lower_order_final": rng.random() < 0.6,
        "euler_at_final": rng.random() < 0.2,
        "final_sigmas_type": rng.choice(["zero", "sigma_min"]),
    }
    if rng.random() < 0.2:
        cfg.update(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    steps = rng.choice([rng.randint(1, 8), rng.randint(15, 17)])
    set_kwargs = {"num_inference_steps": steps}
    if rng.random() < 0.3:
        cfg["use_dynamic_shifting"] = True
        set_kwargs["mu"] = rng.uniform(0.2, 1.5)
    return {"config": cfg, "set": set_kwargs}


def run_flow_pair(classes, case, backend, seed, *, shape=SHAPE, dtype=torch.float32, fmt=None):
    """diffusers' scheduler and the fused one side by side over a whole loop (same model
    outputs, same generator draws); every step compared."""
    d_cls, f_cls = classes
    d = d_cls(**case["config"])
    f = f_cls.from_config(d.config, backend=backend)
    d.set_timesteps(**case["set"], device=DEVICE)
    f.set_timesteps(**case["set"], device=DEVICE)
    assert torch.equal(d.timesteps, f.timesteps) and torch.equal(d.sigmas, f.sigmas)
    gen = torch.Generator().manual_seed(seed)
    fmt = fmt or torch.contiguous_format
    x = randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    xd, xf = x, x.clone()
    gen_d, gen_f = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    kw_d = {"generator": gen_d} if d_cls is FLOW[0] else {}
    kw_f = {"generator": gen_f} if d_cls is FLOW[0] else {}
    scale = 0.0
    for k, t in enumerate(d.timesteps):
        m = randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
        out_d = d.step(m, t, xd, **kw_d)
        out_f = f.step(m, t, xf, **kw_f)
        what = f"{f_cls.__name__}[{backend}] step {k}, seed={seed}, case={case}"
        assert type(out_f) is type(out_d)
        scale = max(scale, xd.abs().max().item(), out_d.prev_sample.abs().max().item())
        if dtype == torch.float32:
            assert_step_close(out_f.prev_sample, out_d.prev_sample, what, scale)
        else:  # diffusers rounds intermediates to the half dtype: compare at its rounding
            assert out_f.prev_sample.dtype == out_d.prev_sample.dtype, what
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(
                out_f.prev_sample.float(),
                out_d.prev_sample.float(),
                rtol=4 * eps,
                atol=4 * eps * scale,
                msg=lambda msg, what=what: f"{what}: {msg}",
            )
        if fmt is torch.channels_last:
            assert out_f.prev_sample.is_contiguous(memory_format=fmt)
        xd, xf = out_d.prev_sample, out_f.prev_sample
    if d_cls is FLOW[0]:
        assert torch.equal(gen_d.get_state(), gen_f.get_state()), "noise drawn differently"
    return d, f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draw", range(8))
def test_flow_match_random_configs_match_diffusers(backend, draw, seed):
    run_flow_pair(FLOW, flow_case(random.Random(seed)), backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draw", range(8))
def test_dpm_flow_random_configs_match_diffusers(backend, draw, seed):
    run_flow_pair(DPM, dpm_case(random.Random(seed)), backend, seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("classes, case", [(FLOW, {"shift": 3.0}), (DPM, SANA)], ids=["fm", "dpm"])
def test_half_precision_and_channels_last(classes, case, dtype, seed):
    case = {"config": case, "set": {"num_inference_steps": 4}}
    run_flow_pair(classes, case, "triton", seed, dtype=dtype, fmt=torch.channels_last)


# -- the plans --------------------------------------------------------------------------------


def test_flow_sigmas_match_diffusers_plans(seed):
    rng = random.Random(seed)
    for _ in range(40):
        case = flow_case(rng)
        cfg, kw = case["config"], case["set"]
        d = FlowMatchEulerDiscreteScheduler(**cfg)
        d.set_timesteps(**kw)
        spacing = next(
            (s for s in ("karras", "exponential", "beta") if cfg.get(f"use_{s}_sigmas")), None
        )
        got = flow_sigmas(
            kw.get("num_inference_steps"),
            sigmas=kw.get("sigmas"),
            timesteps=kw.get("timesteps") if "sigmas" not in kw else None,
            shift=cfg["shift"],
            mu=kw.get("mu"),
            time_shift_type=cfg.get("time_shift_type", "exponential"),
            shift_terminal=cfg.get("shift_terminal"),
            spacing=spacing,
            invert=cfg["invert_sigmas"],
        )
        torch.testing.assert_close(got.float(), d.sigmas, rtol=0, atol=1e-6, msg=str(case))
    for _ in range(10):
        n, shift = rng.randint(1, 30), rng.uniform(0.5, 8.0)
        for cls, grid in ((DPMSolverMultistepScheduler, "dpm"), (UniPCMultistepScheduler, "unipc")):
            d = cls(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
            d.set_timesteps(n)
            got = flow_sigmas(n, grid=grid, shift=shift)
            torch.testing.assert_close(got.float(), d.sigmas, rtol=0, atol=1e-6)


# -- the contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [FLOW, DPM], ids=["fm", "dpm"])
def test_signatures_match_diffusers(classes):
    """Pipelines inspect set_timesteps (sigmas= / mu= / timesteps=) and step (generator)."""
    d_cls, f_cls = classes
    for method in ("set_timesteps", "step", "scale_noise" if d_cls is FLOW[0] else "add_noise"):
        want = list(inspect.signature(getattr(d_cls, method)).parameters)
        assert list(inspect.signature(getattr(f_cls, method)).parameters) == want, method
    init = set(inspect.signature(f_cls.__init__).parameters)
    assert init == set(inspect.signature(d_cls.__init__).parameters) | {"backend", "noise"}


@pytest.mark.parametrize(
    "classes, config", [(FLOW, {"shift": 3.0}), (DPM, SANA)], ids=["fm", "dpm"]
)
def test_attributes_and_config_roundtrip(classes, config, tmp_path):
    d_cls, f_cls = classes
    d = d_cls(**config)
    f = f_cls.from_config(d.config)
    assert isinstance(f, d_cls) and f.order == d.order and len(f) == len(d)
    d.set_timesteps(5)
    f.set_timesteps(5)
    assert torch.equal(f.timesteps, d.timesteps) and torch.equal(f.sigmas, d.sigmas)
    assert f.init_noise_sigma == 1.0
    assert f.step_index is None and f.begin_index is None
    f.set_begin_index(2)
    assert f.begin_index == 2
    x = randn(SHAPE)
    assert f.scale_model_input(x, f.timesteps[0]) is x
    f.save_pretrained(tmp_path)
    g = f_cls.from_pretrained(tmp_path, backend="reference")
    assert g.backend == "reference" and "backend" not in g.config

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(g.config) == public(f.config)
    assert public(d_cls.from_pretrained(tmp_path).config) == public(d.config)


def test_from_config_of_an_sd3_and_a_flux_config():
    for config in (
        {"shift": 3.0},
        {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
    ):
        stock = FlowMatchEulerDiscreteScheduler(**config)
        fused = FusedFlowMatchEulerDiscreteScheduler.from_config(stock.config)
        assert dict(fused.config) == dict(stock.config)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_noise_and_img2img_match_diffusers(backend, seed):
    """The flow img2img loop: scale_noise at the begin index, then the steps from there."""
    d = FlowMatchEulerDiscreteScheduler(shift=3.0)
    f = FusedFlowMatchEulerDiscreteScheduler.from_config(d.config, backend=backend)
    x0, noise = randn(SHAPE).clamp(-1, 1), randn(SHAPE)
    for s in (d, f):
        s.set_timesteps(6, device=DEVICE)
    t = d.timesteps[torch.tensor([1, 4])]  # no begin index: looked up per sample
    torch.testing.assert_close(f.scale_noise(x0, t, noise), d.scale_noise(x0, t, noise))
    start = 2
    for s in (d, f):
        s.set_begin_index(start)
    t0 = d.timesteps[start : start + 1].repeat(SHAPE[0])
    xd, xf = d.scale_noise(x0, t0, noise), f.scale_noise(x0, t0, noise)
    assert torch.equal(xd, xf)
    scale = 0.0
    for t in d.timesteps[start:]:
        m = randn(SHAPE)
        scale = max(scale, xd.abs().max().item())
        xd = d.step(m, t, xd).prev_sample
        xf = f.step(m, t, xf).prev_sample
        assert_step_close(xf, xd, f"t={t.item()}", scale)
    # inpainting re-noises the original after each step: scale_noise at the step index
    assert torch.equal(f.scale_noise(x0, t0, noise), d.scale_noise(x0, t0, noise))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpm_flow_add_noise_and_begin_index(backend, seed):
    d = DPMSolverMultistepScheduler(**SANA)
    f = FusedDPMSolverMultistepScheduler.from_config(d.config, backend=backend)
    for s in (d, f):
        s.set_timesteps(8)
        s.set_begin_index(3)
    x0, noise = randn(SHAPE), randn(SHAPE)
    t = d.timesteps[3:4].repeat(SHAPE[0])
    xd, xf = d.add_noise(x0, noise, t), f.add_noise(x0, noise, t)
    assert_step_close(xf, xd, "add_noise")
    scale = 0.0
    for t in d.timesteps[3:]:
        m = randn(SHAPE)
        scale = max(scale, xd.abs().max().item())
        xd, xf = d.step(m, t, xd).prev_sample, f.step(m, t, xf).prev_sample
        assert_step_close(xf, xd, f"t={t.item()}", scale)


@pytest.mark.parametrize(
    "classes, config", [(FLOW, {"shift": 3.0}), (DPM, SANA)], ids=["fm", "dpm"]
)
def test_return_dict_false(classes, config):
    f = classes[1](backend="reference", **config)
    f.set_timesteps(3)
    x = randn(SHAPE)
    out = f.step(x, f.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "classes, config", [(FLOW, {"shift": 3.0}), (DPM, SANA)], ids=["fm", "dpm"]
)
def test_device_timesteps_no_host_reads(classes, config, backend, device_timesteps, seed):  # noqa: F811
    """Timesteps on the device: the step index is found and advanced on the device, and no
    tensor value is read on the host during the steps."""
    d_cls, f_cls = classes
    d = d_cls(**config)
    f = f_cls.from_config(d.config, backend=backend)
    d.set_timesteps(5, device=DEVICE)
    f.set_timesteps(5, device=DEVICE)
    zeros = torch.zeros(SHAPE, device=DEVICE)
    f.step(zeros, f.timesteps[0], zeros)  # build and upload the tables once
    f.set_timesteps(5, device=DEVICE)
    xd = xf = randn(SHAPE)
    scale = 0.0
    for k, t in enumerate(d.timesteps):
        m = randn(SHAPE)
        scale = max(scale, xd.abs().max().item())
        xd = d.step(m, t, xd).prev_sample
        device_timesteps.active = True
        try:
            xf = f.step(m, t.clone(), xf).prev_sample
        finally:
            device_timesteps.active = False
        assert_step_close(xf, xd, f"step {k}", scale)
        assert isinstance(f.step_index, torch.Tensor)


# -- noise ------------------------------------------------------------------------------------


def _stochastic_loop(f, seed, **step_kwargs):
    f.set_timesteps(4)
    x = torch.linspace(-2, 2, math.prod(SHAPE)).reshape(SHAPE).to(DEVICE)
    torch.manual_seed(seed)
    for t in f.timesteps:
        x = f.step(torch.cos(3 * x), t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_generator_draws_what_diffusers_draws(backend, seed):
    """Without a generator the stochastic step draws from torch's global stream exactly as
    diffusers does (same samples for the same torch.manual_seed, stream left in step)."""
    config = {"stochastic_sampling": True, "shift": 2.0}
    d = FlowMatchEulerDiscreteScheduler(**config)
    f = FusedFlowMatchEulerDiscreteScheduler.from_config(d.config, backend=backend)
    want = _stochastic_loop(d, seed)
    state = torch.get_rng_state()
    got = _stochastic_loop(f, seed)
    assert torch.equal(torch.get_rng_state(), state)
    assert_step_close(got, want, "no generator")


def test_philox_noise_opt_in(seed):
    config = {"stochastic_sampling": True, "shift": 2.0}
    runs = []
    for backend in ("triton", "reference", "triton"):
        f = FusedFlowMatchEulerDiscreteScheduler(backend=backend, **config)
        f.noise = "philox"
        runs.append(_stochastic_loop(f, seed if len(runs) < 2 else seed + 1))
    assert_step_close(runs[0], runs[1], "philox on both backends")
    assert not torch.allclose(runs[0], runs[2]), "a new global seed must give new noise"
    diffusers_run = _stochastic_loop(FlowMatchEulerDiscreteScheduler(**config), seed)
    assert not torch.allclose(runs[0], diffusers_run)
    with pytest.raises(ValueError, match="noise"):  # refused when set, not at the next step
        f.noise = "numpy"


@pytest.mark.parametrize(
    "classes, config", [(FLOW, {"shift": 3.0}), (DPM, SANA)], ids=["fm", "dpm"]
)
def test_deterministic_steps_leave_the_global_rng_alone(classes, config, seed):
    f = classes[1](backend="triton", **config)
    f.set_timesteps(3)
    x = randn(SHAPE)
    before = torch.get_rng_state()
    for t in f.timesteps:
        x = f.step(x, t, x).prev_sample
    assert torch.equal(torch.get_rng_state(), before)


# -- bad input --------------------------------------------------------------------------------


def _unchanged_after(error_match, scheduler, **kwargs):
    timesteps, sigmas = scheduler.timesteps.clone(), scheduler.sigmas.clone()
    with pytest.raises(ValueError, match=error_match):
        scheduler.set_timesteps(**kwargs)
    assert torch.equal(scheduler.timesteps, timesteps) and torch.equal(scheduler.sigmas, sigmas)


def test_set_timesteps_bad_input_leaves_the_scheduler_alone():
    f = FusedFlowMatchEulerDiscreteScheduler(shift=3.0)
    f.set_timesteps(4)
    _unchanged_after("strictly decreasing", f, sigmas=[0.5, 0.8])
    _unchanged_after(r"in \[0, 1\]", f, sigmas=[1.5, 0.8])
    _unchanged_after(r"in \[0, 1000\]", f, timesteps=[1500.0, 800.0])
    _unchanged_after("same length", f, sigmas=[0.9, 0.5], timesteps=[900.0])
    dynamic = FusedFlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    dynamic.set_timesteps(4, mu=1.0)
    _unchanged_after("mu must be passed", dynamic, num_inference_steps=4)
    dpm = FusedDPMSolverMultistepScheduler(use_dynamic_shifting=True, **SANA)
    dpm.set_timesteps(4, mu=1.0)
    shift = dpm.config.flow_shift
    _unchanged_after("mu must be passed", dpm, num_inference_steps=4)
    _unchanged_after("custom timesteps", dpm, timesteps=[900, 500], mu=1.0)
    assert dpm.config.flow_shift == shift
    static = FusedDPMSolverMultistepScheduler(**SANA)
    static.set_timesteps(4)
    _unchanged_after("use_dynamic_shifting", static, num_inference_steps=4, mu=0.5)


UNSUPPORTED = [
    (DPM, {"prediction_type": "flow_prediction"}, "prediction_type"),
    (DPM, {"use_flow_sigmas": True, "prediction_type": "v_prediction"}, "prediction_type"),
    (DPM, {**SANA, "use_karras_sigmas": True}, "use_karras_sigmas"),
    (DPM, {**SANA, "use_lu_lambdas": True}, "use_lu_lambdas"),
    (DPM, {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    # order 3 on flow sigmas is supported now (tests/test_dpm_ext.py); diffusers takes 4
    (DPM, {**SANA, "solver_order": 4}, "solver_order"),
]


@pytest.mark.parametrize("classes, options, option", UNSUPPORTED)
def test_unsupported_options_raise_at_construction(classes, options, option):
    d_cls, f_cls = classes
    with pytest.raises(ValueError, match=option):
        f_cls(**options)
    with pytest.raises(ValueError, match=option):
        f_cls.from_config(d_cls(**options).config)


def test_step_bad_input():
    f = FusedFlowMatchEulerDiscreteScheduler()
    f.set_timesteps(2)
    x = randn(SHAPE)
    with pytest.raises(ValueError, match="integer"):
        f.step(x, 3, x)
    with pytest.raises(ValueError, match="per_token_timesteps"):
        f.step(x, f.timesteps[0], x, per_token_timesteps=torch.ones(SHAPE[0], 35))
    for t in f.timesteps:
        f.step(x, t, x)
    with pytest.raises(ValueError, match="more often"):
        f.step(x, f.timesteps[0], x)
    with pytest.raises(ValueError, match="not in the scheduler's timesteps"):
        FusedFlowMatchEulerDiscreteScheduler().step(x, torch.tensor(0.5), x)


def test_flow_prediction_on_vp_drop_ins_is_refused():
    """A flow model on a VP schedule: refused at construction (above), and when a config is
    patched to it after construction (read again at set_timesteps and step)."""
    f = FusedDPMSolverMultistepScheduler()
    f.set_timesteps(4)
    f.register_to_config(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        f.set_timesteps(4)
    x = randn(SHAPE)
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        f.step(x, f.timesteps[0], x)
    with pytest.raises(ValueError, match="prediction_type"):
        FusedDDIMScheduler(prediction_type="flow_prediction")


# -- the mixture: as well as diffusers at the same step count ---------------------------------


def _mixture_run(scheduler, noise, generator=None):
    """A diffusers-style loop of the exact mixture velocity, conditioned on t = s T."""
    model = mixture_velocity(GMM)
    x = noise.clone()
    for t in scheduler.timesteps:
        v = model(x, t.to(torch.float64).expand(x.shape[0]))
        x = scheduler.step(v, t, x, **({"generator": generator} if generator else {})).prev_sample
    return x


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "classes, config, steps, n",
    [
        (FLOW, {"shift": 3.0}, 50, 1000),
        (DPM, SANA, 20, 2000),
        (FLOW, {"shift": 3.0, "stochastic_sampling": True}, 28, 1000),
    ],
    ids=["euler-50", "dpm-20", "stochastic-28"],
)
def test_mixture_as_well_as_diffusers(classes, config, steps, n):
    """Same noise, same plan: the fused loop's fit equals diffusers' (the deterministic ones
    also reproduce the mixture; the stochastic form re-noises the posterior mean, which
    collapses the variances in both: it is judged against diffusers alone)."""
    runs = []
    for cls in classes:
        scheduler = cls(**config)
        scheduler.set_timesteps(steps)
        noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        gen = torch.Generator().manual_seed(8) if config.get("stochastic_sampling") else None
        runs.append(_mixture_run(scheduler, noise.float(), gen))
    want, got = (GMM.fit(x).sliced_w2 for x in runs)
    assert got == pytest.approx(want, abs=2e-3)
    if not config.get("stochastic_sampling"):
        assert _mismatches(GMM, runs[0]) == [] and _mismatches(GMM, runs[1]) == []


# -- GPU: no host sync at all, and the loop captured in a CUDA graph ---------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "classes, config",
    [(FLOW, {"shift": 3.0}), (FLOW, {"stochastic_sampling": True}), (DPM, SANA)],
    ids=["fm", "fm-stochastic", "dpm"],
)
def test_gpu_loop_has_no_host_sync(classes, config):
    device = torch.device("cuda")
    d_cls, f_cls = classes
    f, d = f_cls(backend="triton", **config), d_cls(**config)
    shape = (2, 16, 16, 16)
    gen_f, gen_d = (torch.Generator(device).manual_seed(0) for _ in range(2))
    for s in (f, d):
        s.set_timesteps(6, device=device)
    zeros = torch.zeros(shape, device=device, dtype=torch.bfloat16)
    f.step(zeros, f.timesteps[0], zeros)
    f.set_timesteps(6, device=device)  # same plan: the tables built above are kept
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    ms = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in f.timesteps]
    kw_f = {"generator": gen_f} if d_cls is FLOW[0] else {}
    kw_d = {"generator": gen_d} if d_cls is FLOW[0] else {}
    inputs, xf = [], x
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t, m in zip(f.timesteps, ms):
            inputs.append(xf)
            xf = f.step(f.scale_model_input(m, t), t, xf, **kw_f).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Step by step from the same input (the generators advance in lockstep). Ours computes
    # in float32 and rounds once; diffusers also rounds intermediate terms to bfloat16 (a 0-d
    # float32 sigma times a bfloat16 tensor stays bfloat16: dt * v, sigma * v, s' * z). Each
    # rounding is at most 2**-9 of its term. Every term is a coefficient times |x|, |m| (this
    # step's or, for DPM's second order, the previous step's) or the result: flow
    # coefficients are in [0, 1], DPM's second-order ones up to 1 + 1 / (2 r) <= 2 on this
    # plan, so the steps agree to 2**-7 (2**-6 for DPM) of those magnitudes. Over a whole
    # loop the differences would propagate; hence per step.
    gain = 2.0 if d_cls is DPM[0] else 1.0
    outputs = inputs[1:] + [xf]
    previous = torch.zeros_like(x, dtype=torch.float32)
    for t, m, x_in, x_out in zip(d.timesteps, ms, inputs, outputs):
        xd = d.step(m, t, x_in, **kw_d).prev_sample
        here = x_in.float().abs() + m.float().abs()
        bound = gain * 2**-7 * (here + previous + xd.float().abs()) + 1e-6
        excess = (x_out.float() - xd.float()).abs() - bound
        assert excess.max() <= 0, f"step at t={t.item()}: off by {excess.max().item()} over"
        previous = here


@pytest.mark.gpu
def test_gpu_flow_match_loop_captured_in_cuda_graph():
    from fastdiff.graph import capture_denoising_loop

    device = torch.device("cuda")
    f = FusedFlowMatchEulerDiscreteScheduler(backend="triton", shift=3.0)
    f.set_timesteps(6, device=device)
    shape = (1, 16, 32, 32)
    weight = torch.randn(shape, device=device)

    def step_fn(latents, t):
        v = torch.tanh(latents * weight) * (t / 1000)
        return f.step(v, t, latents).prev_sample

    x = torch.randn(shape, device=device)
    eager = x
    for t in f.timesteps:
        eager = step_fn(eager, t)
    f.set_timesteps(6, device=device)
    loop = capture_denoising_loop(step_fn, x, scheduler=f)
    assert torch.equal(loop.run(x), eager)
    assert torch.equal(loop.run(x), eager)  # replayed


@pytest.mark.parametrize("stochastic", [False, True])
def test_capturable_only_without_torch_noise(stochastic):
    """The stochastic step draws fresh noise every step: a graph is refused with torch's
    generator (a replay would not redraw it) and accepted with in-kernel Philox noise."""
    for noise in ("torch", "philox"):
        f = FusedFlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic, noise=noise)
        f.set_timesteps(4)
        if stochastic and noise == "torch":
            with pytest.raises(ValueError, match='noise="philox"'):
                f.check_capturable()
        else:
            f.check_capturable()
