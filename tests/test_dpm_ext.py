"""FusedDPMSolverMultistepScheduler beyond DPM-Solver++(2M) midpoint: the SDE solver
(``sde-dpmsolver++``, "DPM++ 2M SDE"), the "heun" form and order 3, on VP and flow sigmas.

1. ``reference.dpmpp_multistep_step`` against diffusers' own update functions in float64
   (diffusers' ``step`` casts the sample to float32, so the test calls its
   ``convert_model_output`` and ``*_update`` functions with the sigmas upcast), step by step
   through whole plans of random configs with the same noise: to 1e-9 of the loop's scale.
2. The drop-in against diffusers' ``step`` on both backends (the loop of
   tests/test_diffusers_adapter.py: same generator, same ``variance_noise`` or the global RNG),
   float32 tolerance as there (diffusers chains float32 operations on float32 schedule scalars,
   the fused step rounds float64 coefficients once to float32).
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("diffusers")

from diffusers import DPMSolverMultistepScheduler  # noqa: E402
from diffusers_cases import BACKENDS, DEVICE  # noqa: E402
from test_diffusers_adapter import random_case, run_pair  # noqa: E402
from test_diffusers_pipelines import (  # noqa: E402
    stable_diffusion_loop,
    tiny_conditional_unet,
    tiny_stable_diffusion,
)
from test_dpm_graph import _eager, _loop, _randn  # noqa: E402
from test_flow_diffusers import dpm_case  # noqa: E402

import fastdiff.kernels.fused_step as fs  # noqa: E402
from fastdiff import reference  # noqa: E402
from fastdiff.diffusers import FusedDPMSolverMultistepScheduler  # noqa: E402
from fastdiff.diffusers.graph import capture_denoising_loop  # noqa: E402

SHAPE = (2, 3, 5, 7)
ORDERS = [1, 2, 3]
# (algorithm_type, solver_type): every combination the fused step now takes besides the
# ODE midpoint at orders 1 and 2 of tests/test_diffusers_adapter.py
MODES = [("sde-dpmsolver++", "midpoint"), ("sde-dpmsolver++", "heun"), ("dpmsolver++", "heun")]
ODE = ("dpmsolver++", "midpoint")


@pytest.fixture
def seed():
    return random.randrange(2**31)


def ext_case(rng: random.Random, flow: bool) -> dict:
    """A random config of the adapter tests (VP) or of the flow tests (Sana), with a random
    algorithm, solver type and order."""
    if flow:
        case = {**dpm_case(rng), "step": {}, "learned": False}
    else:
        case = random_case("dpm", rng)
    order = rng.choice(ORDERS)
    algorithm, solver_type = rng.choice(MODES + ([ODE] if order == 3 else []))
    case["config"].update(algorithm_type=algorithm, solver_type=solver_type, solver_order=order)
    return case


# -- 1. the reference against diffusers' update functions, float64 ----------------------------


def _diffusers_step64(d, m, x, z):
    """diffusers' ``step`` without its float32 cast: its conversion, history and order rule."""
    config, n, i = d.config, len(d.timesteps), d.step_index
    small = config.lower_order_final and n < 15
    final = i == n - 1 and (config.euler_at_final or small or config.final_sigmas_type == "zero")
    second = i == n - 2 and small
    x0 = d.convert_model_output(m, sample=x)
    d.model_outputs = [*d.model_outputs[1:], x0]
    order = config.solver_order
    if order == 1 or d.lower_order_nums < 1 or final:
        out = d.dpm_solver_first_order_update(x0, sample=x, noise=z)
        used = 1
    elif order == 2 or d.lower_order_nums < 2 or second:
        out = d.multistep_dpm_solver_second_order_update(d.model_outputs, sample=x, noise=z)
        used = 2
    else:
        out = d.multistep_dpm_solver_third_order_update(d.model_outputs, sample=x, noise=z)
        used = 3
    d.lower_order_nums = min(d.lower_order_nums + 1, order)
    d._step_index += 1
    return out, x0, used


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("draw", range(6))
def test_reference_matches_diffusers_float64(flow, draw, seed):
    rng = random.Random(seed)
    case = ext_case(rng, flow)
    case["config"].pop("variance_type", None)  # the channel split is the drop-in's
    d = DPMSolverMultistepScheduler(**case["config"])
    d.set_timesteps(**case["set"])
    d.sigmas = d.sigmas.double()
    config = d.config
    space = "flow" if config.use_flow_sigmas else "vp"
    levels = d.sigmas if flow else 1 / (1 + d.sigmas**2)  # s, or alpha bar
    thresholding = None
    if config.thresholding:
        thresholding = (config.dynamic_thresholding_ratio, config.sample_max_value)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    d._step_index = 0
    history: list = []  # (x0, level), newest first
    scale = 1.0
    for i in range(len(d.timesteps)):
        m = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        z = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        try:
            want, want_x0, order = _diffusers_step64(d, m, x, z)
        except IndexError:  # a repeated-timestep plan diffusers runs off (see the adapter)
            return
        got, got_x0 = reference.dpmpp_multistep_step(
            x,
            m,
            levels[i],
            levels[i + 1],
            history=history[: order - 1],
            space=space,
            prediction_type=config.prediction_type,
            sde=config.algorithm_type == "sde-dpmsolver++",
            solver_type=config.solver_type,
            noise=z,
            thresholding=thresholding,
        )
        what = f"step {i} (order {order}), seed={seed}, case={case}"
        if want.isnan().any():  # h <= 0 at the end of a plan (see the reference's docstring)
            assert torch.isfinite(got).all(), what
            return
        scale = max(scale, x.abs().max().item(), want.abs().max().item())
        torch.testing.assert_close(got_x0, want_x0, rtol=1e-9, atol=1e-9 * scale, msg=what)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * scale, msg=what)
        history = [(got_x0, levels[i]), *history][:2]
        x = want


# -- 2. the drop-in against diffusers' step --------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("draw", range(5))
def test_random_configs_match_diffusers(backend, flow, draw, seed):
    rng = random.Random(seed)
    run_pair("dpm", ext_case(rng, flow), backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise_mode", ["variance_noise", "global"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_sde_noise_sources_match_diffusers(backend, noise_mode, solver_type, seed):
    """DPM++ 2M SDE Karras (the SDXL UI sampler), noise given or from the global RNG."""
    case = {
        "config": {
            "algorithm_type": "sde-dpmsolver++",
            "solver_type": solver_type,
            "use_karras_sigmas": True,
            "beta_schedule": "scaled_linear",
        },
        "set": {"num_inference_steps": 6},
        "step": {},
        "learned": False,
    }
    run_pair("dpm", case, backend, seed, noise_mode=noise_mode)


def test_sde_draws_as_diffusers_draws():
    """The same draws from the generator (shape, dtype float32, one per step, the last too)."""
    d = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    f = FusedDPMSolverMultistepScheduler.from_config(d.config, backend="reference")
    gd, gf = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for s in (d, f):
        s.set_timesteps(4)
    x = torch.randn(SHAPE, dtype=torch.float64)
    for t in d.timesteps:
        m = torch.randn(SHAPE, dtype=torch.float64)
        d.step(m, t, x, generator=gd)
        f.step(m, t, x, generator=gf)
        assert torch.equal(gd.get_state(), gf.get_state())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", [*MODES, ODE], ids=["sde", "sde-heun", "heun", "ode"])
def test_step_contract_as_diffusers(mode, order, backend):
    """model_outputs (the x0 history), lower_order_nums, step_index and return_dict=False as
    diffusers keeps them, and a model_outputs list the caller replaced is read."""
    algorithm, solver_type = mode
    config = dict(algorithm_type=algorithm, solver_type=solver_type, solver_order=order)
    d = DPMSolverMultistepScheduler(**config)
    f = FusedDPMSolverMultistepScheduler.from_config(d.config, backend=backend)
    for s in (d, f):
        s.set_timesteps(6, device=DEVICE)
    g = torch.Generator().manual_seed(0)  # drawn on the CPU: the same values on any device
    x = torch.randn(SHAPE, generator=g).to(DEVICE)
    xd = xf = x
    for k, t in enumerate(d.timesteps):
        m = torch.randn(SHAPE, generator=g).to(DEVICE)
        z = torch.randn(SHAPE, generator=g).to(DEVICE)
        if k == 3:  # the caller edits the history (as LEdits-style pipelines do)
            edited = [None if o is None else o * 0.5 for o in d.model_outputs]
            d.model_outputs, f.model_outputs = list(edited), list(edited)
        (xd,) = d.step(m, t, xd, variance_noise=z, return_dict=False)
        # its own plan's element: the host step index, whose history is diffusers' list (with a
        # device index it lives in device buffers: test_third_order_device_index_...)
        out = f.step(m, f.timesteps[k], xf, variance_noise=z, return_dict=False)
        assert isinstance(out, tuple) and len(out) == 1
        (xf,) = out
        what = f"step {k}"
        torch.testing.assert_close(xf, xd, rtol=1e-4, atol=1e-4 * max(1, xd.abs().max()))
        assert f.lower_order_nums == d.lower_order_nums and f.step_index == d.step_index, what
        assert len(f.model_outputs) == len(d.model_outputs) == order, what
        for got, want in zip(f.model_outputs, d.model_outputs):
            assert (got is None) == (want is None), what
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max())


# -- pipeline swaps (the loops and tiny models of tests/test_diffusers_pipelines.py) ----------

SDXL_SDE_KARRAS = {  # "DPM++ 2M SDE Karras" as UIs set it on an SDXL / SD scheduler config
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "algorithm_type": "sde-dpmsolver++",
    "use_karras_sigmas": True,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options, strength",
    [({}, None), ({"solver_type": "heun", "solver_order": 3}, 0.6)],
    ids=["sde", "sde-heun-3-img2img"],
)
def test_stable_diffusion_style_loop(options, strength, backend, seed):
    """The StableDiffusion(Img2Img)Pipeline loop (CFG, img2img's set_begin_index and
    add_noise, the pipeline's generator passed to step): the stock scheduler's latents."""
    unet = tiny_conditional_unet()
    embeddings = torch.randn(4, 5, 8).to(unet.device)
    original = DPMSolverMultistepScheduler(**{**SDXL_SDE_KARRAS, **options})
    want = stable_diffusion_loop(unet, original, embeddings, seed, strength=strength, steps=5)
    fused = FusedDPMSolverMultistepScheduler.from_config(original.config, backend=backend)
    got = stable_diffusion_loop(unet, fused, embeddings, seed, strength=strength, steps=5)
    assert torch.isfinite(want).all()
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * scale)


def test_stable_diffusion_pipeline_swap_sde_karras(seed):
    """``pipe.scheduler = Fused...from_config(pipe.scheduler.config)`` in a tiny
    StableDiffusionPipeline with DPM++ 2M SDE Karras: the same images for the same generator."""
    pipe = tiny_stable_diffusion(DPMSolverMultistepScheduler(**SDXL_SDE_KARRAS))

    def images():
        generator = torch.Generator().manual_seed(seed)
        kwargs = {"num_inference_steps": 5, "height": 8, "width": 8, "output_type": "pt"}
        return pipe("a cat", generator=generator, **kwargs).images

    want = images()
    pipe.scheduler = FusedDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    got = images()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


UNSUPPORTED = [
    ({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, "algorithm_type"),
    ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, "algorithm_type"),
    ({"solver_order": 4}, "solver_order"),
]


@pytest.mark.parametrize("options, option", UNSUPPORTED)
def test_still_unsupported_options_are_refused(options, option):
    with pytest.raises(ValueError, match=option):
        FusedDPMSolverMultistepScheduler(**options)
    with pytest.raises(ValueError, match=option):
        FusedDPMSolverMultistepScheduler.from_config(DPMSolverMultistepScheduler(**options).config)


# -- CUDA graphs: the SDE draws noise, so a graph needs noise="philox" -------------------------


@pytest.mark.parametrize("mode", [ODE, MODES[1]], ids=["ode", "sde-heun"])
def test_third_order_device_index_is_the_host_index(mode, as_device, device):
    """Order 3 with a device step index (the ring slot from the row, the chain's first two
    rows marked at its first step) against the host index: a whole plan, a chain started
    mid-plan, a loop switching from the host to the device index and back, and a
    model_outputs list edited between steps."""
    algorithm, solver_type = mode
    f = FusedDPMSolverMultistepScheduler(
        algorithm_type=algorithm, solver_type=solver_type, solver_order=3, noise="philox"
    )
    f.backend = "triton"
    f.set_timesteps(8, device=device)
    step_fn = _loop(f, _randn(1, device))
    x = _randn(0, device)

    def run(timesteps, device_index):
        f.set_timesteps(8, device=device)
        f._seed = 3
        return _eager(f, step_fn, x, timesteps, device_index=device_index)

    whole = run(None, False)
    assert torch.equal(run(None, True), whole)  # (the chain marks index 0 and 1)
    f.set_timesteps(8, device=device)
    f._seed = 3
    part = _eager(f, step_fn, x, f.timesteps[:3])
    part = _eager(f, step_fn, part, f.timesteps[3:5], device_index=True)
    assert f.model_outputs[-2:] == [None, None]  # the history of device steps: the ring
    assert torch.equal(_eager(f, step_fn, part, f.timesteps[5:]), whole)

    def edited(device_index):
        f.set_timesteps(8, device=device)
        f._seed = 3
        y = _eager(f, step_fn, x, f.timesteps[:4])
        f.model_outputs = [o * 0.5 for o in f.model_outputs]
        return _eager(f, step_fn, y, f.timesteps[4:], device_index=device_index)

    assert torch.equal(edited(True), edited(False))
    start = f.timesteps[3:]  # a chain started mid-plan (its first two rows marked there)
    assert torch.equal(run(start, True), run(start, False))


class _StepTraffic(TorchDispatchMode):
    """What a step moves over sample-sized tensors: the aten ops with a sample-sized output
    (outside the fused kernel's launches) and, per launch, the passes its flags make (reads:
    x, m, the ring's slots but the one written, the last sample, x0_prev, a noise tensor, a
    classifier gradient, variance channels, the guided half; writes: x_next, x0, the ring's
    slot, the corrected sample)."""

    def __init__(self, monkeypatch, numel: int):
        super().__init__()
        self.numel, self.ops, self.launches, self.paused = numel, [], [], False
        launch = fs._launch

        def counted(config, values, device, flags, extra=()):
            v = {**config.statics, **dict(extra), **dict(zip(fs._FLAG_NAMES, flags))}
            slots = v["HIST_SLOTS"]
            corrector = slots > 0 and v.get("HIST_CORRECTOR", True)  # (UniPC's pair)
            reads = 2 + max(slots - 1, 0) + corrector + v["HAS_PREV"] + (v["NOISE"] == 1)
            reads += v["HAS_GRAD"] + (v["VAR_MODE"] != 0) + v["CFG"]
            writes = v["WRITE_OUT"] + v["WRITE_X0"] + (slots > 0) + corrector
            self.launches.append(int(reads + writes))
            self.paused = True
            try:
                return launch(config, values, device, flags, extra)
            finally:
                self.paused = False

        monkeypatch.setattr(fs, "_launch", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        if not self.paused and any(
            isinstance(o, torch.Tensor) and o.numel() >= self.numel for o in outs
        ):
            self.ops.append(str(func.overloadpacket.__name__))
        return out


_ALLOCATIONS = {"empty_like", "empty", "empty_strided"}  # no pass over memory


def _third_order_scheduler(device, **config):
    f = FusedDPMSolverMultistepScheduler(solver_order=3, backend="triton", **config)
    f.set_timesteps(20, device=device)
    return f


@pytest.mark.parametrize("taken", ["once", "again"])
def test_third_order_step_moves_the_contract_bytes(taken, monkeypatch, device):
    """One mid-plan 3M step (a host step index; "again": the step index set back and the
    step taken twice more, as benchmarks/bench_dropin_step.py times it) is one launch of 6
    passes (reads x, m and the two previous x0s; writes x_next and x0, the ring's new slot)
    and no other sample-sized op than the output's allocation: no copy into the ring, no
    corrected-sample pair, x0 written once."""
    f = _third_order_scheduler(device)
    x, m = _randn(0, device), _randn(1, device)
    for k in range(10):
        x = f.step(m, f.timesteps[k], x).prev_sample
    index = f.step_index
    traffic = _StepTraffic(monkeypatch, x.numel())
    for rep in range(1 if taken == "once" else 3):
        f._step_index = index
        traffic.ops.clear(), traffic.launches.clear()
        with traffic:
            f.step(m, f.timesteps[index], x)
        assert traffic.launches == [6], rep
        assert set(traffic.ops) <= _ALLOCATIONS and len(traffic.ops) <= 1, (rep, traffic.ops)


def test_third_order_device_step_moves_the_contract_bytes(monkeypatch, as_device, device):
    """The same with a device step index (a graphed iteration's step): 6 passes, no copy."""
    f = _third_order_scheduler(device)
    x, m = _randn(0, device), _randn(1, device)
    indices = torch.arange(20, device=device)
    traffic = _StepTraffic(monkeypatch, x.numel())
    for k in range(12):
        f.prepare_graph_step()
        traffic.ops.clear(), traffic.launches.clear()
        with traffic:
            x = f.step(m, torch.take(f.timesteps, indices[k]), x).prev_sample
    assert traffic.launches == [6]
    assert set(traffic.ops) <= _ALLOCATIONS and len(traffic.ops) <= 1, traffic.ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [ODE, MODES[2]], ids=["ode", "heun"])
def test_third_order_step_taken_again_reads_the_shifted_history(mode, backend):
    """A step taken again (the step index set back: diffusers then reads its shifted list,
    the first run's x0 newest) as diffusers takes it, twice in a row; then the rest of the
    plan. The ring's phase follows the list (the x0s lie one slot on after each run)."""
    algorithm, solver_type = mode
    config = dict(algorithm_type=algorithm, solver_type=solver_type, solver_order=3)
    d = DPMSolverMultistepScheduler(**config)
    f = FusedDPMSolverMultistepScheduler.from_config(d.config, backend=backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g).to(DEVICE)
    ms = [torch.randn(SHAPE, generator=g).to(DEVICE) for _ in range(10)]
    got = []
    for s in (d, f):
        s.set_timesteps(8, device=DEVICE)
        xs, outs = x, []
        for k, m in enumerate(ms):
            i = 4 if k in (5, 6) else k - 2 if k > 6 else k  # step 4 taken three times
            if k in (5, 6):
                s._step_index = 4
            xs = s.step(m, s.timesteps[i], xs).prev_sample
            outs.append(xs)
        got.append(outs)
    for k, (want, have) in enumerate(zip(*got)):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4 * scale, msg=f"step {k}")


def test_third_order_step_taken_again_then_device_steps(as_device, device):
    """After a step taken again (the ring's phase moved) the device step index reads the
    ring at that phase: the rest of the plan bitwise as with the host index."""
    f = FusedDPMSolverMultistepScheduler(solver_order=3, backend="triton")
    step_fn = _loop(f, _randn(1, device))

    def run(device_index):
        f.set_timesteps(8, device=device)
        y = _eager(f, step_fn, _randn(0, device), f.timesteps[:5])
        for _ in range(2):
            f._step_index = 4
            y = step_fn(y, f.timesteps[4])
        assert f._ring_phase == 2
        return _eager(f, step_fn, y, f.timesteps[5:], device_index=device_index)

    assert torch.equal(run(True), run(False))


def test_sde_capture_needs_philox_noise():
    f = FusedDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="philox"):
        f.check_capturable()
    FusedDPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", noise="philox"
    ).check_capturable()
    FusedDPMSolverMultistepScheduler(solver_type="heun").check_capturable()  # deterministic


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config",
    [
        {"algorithm_type": "sde-dpmsolver++", "noise": "philox", "use_karras_sigmas": True},
        {"solver_type": "heun"},
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "noise": "philox"},
    ],
    ids=["sde", "heun", "sde-heun"],
)
def test_graphed_loop_is_the_eager_loop(config, order, backend, as_device, device):
    f = FusedDPMSolverMultistepScheduler(**config, solver_order=order, backend=backend)
    f.check_capturable()
    f.set_timesteps(6, device=device)
    f._seed = 5  # the Philox key (drawn from the global RNG at the first noisy step)
    step_fn = _loop(f, _randn(1, device))
    x = _randn(0, device)
    eager = _eager(f, step_fn, x)
    f.set_timesteps(6, device=device)
    f._seed = 5
    device_index = _eager(f, step_fn, x, device_index=True)
    assert torch.equal(device_index, eager)
    f.set_timesteps(6, device=device)
    f._seed = 5
    loop = capture_denoising_loop(step_fn, x, scheduler=f)
    assert torch.equal(loop.run(x), eager)
    assert torch.equal(loop.run(x), eager)
    assert loop.captured


# -- on the card ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", MODES, ids=["sde", "sde-heun", "heun"])
def test_gpu_no_host_sync_and_matches_diffusers(mode, order, dtype):
    device = torch.device("cuda")
    algorithm, solver_type = mode
    config = dict(
        algorithm_type=algorithm,
        solver_type=solver_type,
        solver_order=order,
        use_karras_sigmas=True,
        beta_schedule="scaled_linear",
    )
    d = DPMSolverMultistepScheduler(**config)
    f = FusedDPMSolverMultistepScheduler.from_config(d.config, backend="triton")
    shape = (2, 4, 64, 64)
    g = torch.Generator(device).manual_seed(0)
    ms = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(10)]
    x = torch.randn(shape, generator=g, device=device, dtype=dtype)

    def run(s, sync_check: bool):
        s.set_timesteps(10, device=device)
        gen = torch.Generator(device).manual_seed(1)
        xs = x
        for k, t in enumerate(s.timesteps):
            if sync_check:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                xs = s.step(ms[k], t, xs, generator=gen).prev_sample
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return xs

    want = run(d, False)
    run(f, False)  # tables built, kernels compiled
    got = run(f, True)
    assert got.dtype == want.dtype and torch.isfinite(got).all()
    if dtype == torch.float32:  # diffusers rounds its 16-bit x0 history: compared in float32
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.gpu
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_gpu_sde_captured_loop_is_bitwise_eager(solver_type, order):
    """DPM++ 2M / 3M SDE with in-kernel noise: the captured loop replays the eager loop bit for
    bit (the Philox key fixed, as a set_timesteps draws it)."""
    device = torch.device("cuda")
    f = FusedDPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++",
        solver_type=solver_type,
        solver_order=order,
        use_karras_sigmas=True,
        noise="philox",
        backend="triton",
    )
    step_fn = _loop(f, _randn(1, device))
    x = _randn(0, device)
    f.set_timesteps(10, device=device)
    f._seed = 7
    eager = _eager(f, step_fn, x)
    f.set_timesteps(10, device=device)
    f._seed = 7
    loop = capture_denoising_loop(step_fn, x, scheduler=f)
    graphed, again = loop.run(x), loop.run(x)
    torch.cuda.synchronize()
    assert loop.captured and torch.isfinite(graphed).all()
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
