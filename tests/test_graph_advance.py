"""A graphed drop-in loop whose scheduler step advances it: the fused kernel's ``ADVANCE``
(the last program of the grid, by an atomic ticket, increments the loop's counter and writes
the next timestep and per-step value) and ``capture_denoising_loop``'s use of it (the step
writes into the loop's latents; no gather, copy or increment of the loop's own), with the
fallback to the loop's own path where the step does not make exactly one advancing launch.

On the CPU the kernels run under the Triton interpreter and the graphs through the eager
stand-in runtime (``as_device``); on the card (``gpu``) real CUDA graphs of every drop-in's
loop are checked bitwise against the eager loop.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff.kernels import fused_step as kernel

pytest.importorskip("diffusers")

from fastdiff import diffusers as fused  # noqa: E402
from fastdiff.capture import GraphCaptureError  # noqa: E402
from fastdiff.diffusers.graph import capture_denoising_loop  # noqa: E402

SHAPE = (2, 4, 4, 4)
# name -> (drop-in class, options): every drop-in whose step is one fused launch
ADVANCING = {
    "ddim": ("FusedDDIMScheduler", {}),
    "ddpm": ("FusedDDPMScheduler", {"noise": "philox"}),
    "euler": ("FusedEulerDiscreteScheduler", {}),
    "euler_a": ("FusedEulerAncestralDiscreteScheduler", {"noise": "philox"}),
    "dpmpp_2m": ("FusedDPMSolverMultistepScheduler", {}),
    "dpmpp_3m": ("FusedDPMSolverMultistepScheduler", {"solver_order": 3}),
    "dpmpp_2m_sde": (
        "FusedDPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "noise": "philox"},
    ),
    "unipc": ("FusedUniPCMultistepScheduler", {}),
    "flow_euler": ("FusedFlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    "flow_euler_stochastic": (
        "FusedFlowMatchEulerDiscreteScheduler",
        {"shift": 3.0, "stochastic_sampling": True, "noise": "philox"},
    ),
    "lcm": ("FusedLCMScheduler", {"noise": "philox"}),
    "tcd": ("FusedTCDScheduler", {"noise": "philox"}),
}
# a per-step value advanced with the timestep (the row, Euler's input scale)
SIDE = {"ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde"}
SCALED = {"euler", "euler_a"}  # and the next step's model input (LoopAdvance.set_scaled)


def _randn(seed: int, shape=SHAPE, device="cpu", dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device, dtype)


# -- the kernel ----------------------------------------------------------------------------


@pytest.mark.parametrize("side", [False, True])
def test_kernel_advances_once_per_launch_over_a_grid_of_programs(side, device):
    """A launch of several programs (2 x 2 under the interpreter, 69 x 2 on a card) advances
    the counter once, writes plan[counter] (and src[counter]) and leaves the ticket at 0;
    past the plan's end nothing more is written; the step's outputs are those of the launch
    without it, also written in place over x."""
    x, m = _randn(0, (2, 70000), device), _randn(1, (2, 70000), device)
    table = _randn(2, (5, len(kernel.COLUMNS)), device)
    counter = torch.tensor(0, device=device)
    ticket = torch.zeros(1, dtype=torch.int32, device=device)
    plan = torch.tensor([900.0, 600.0, 300.0], device=device)
    timestep = plan[0].clone()
    advance = kernel.LoopAdvance(counter, ticket, plan, timestep)
    src = torch.tensor([7, 8, 9, 4], device=device)
    dst = src[:1].clone()
    if side:
        advance.set_side(src, dst)
    rows = counter.reshape(1)
    grid = kernel.step_config(x, m, table, rows).grid
    assert grid[0] > 1 and grid[1] > 1, grid  # programs of both axes race for the ticket
    for k in range(1, 5):
        expected = kernel.fused_step(x, m, table, rows)
        out = x.clone()
        got = kernel.fused_step(out, m, table, rows, out=out, advance=advance)
        assert got[0].data_ptr() == out.data_ptr()
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert int(counter) == k and advance.launches == k and int(ticket) == 0
        assert float(timestep) == float(plan[min(k, 2)])
        assert int(dst) == (int(src[min(k, 2)]) if side else 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_writes_the_next_model_input(dtype, device):
    """ADVANCE 3 (``set_scaled``): every program also writes its tile of the next step's
    model input, the stored sample times the advanced per-step value: bitwise
    ``torch.mul(sample, dst)`` (float32 product of the rounded sample, rounded once),
    poisoned before the launch. (The interpreter truncates bf16 stores: bf16 on a card only.)"""
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("the Triton interpreter truncates bf16 stores instead of rounding")
    x, m = _randn(0, (3, 5001), device, dtype), _randn(1, (3, 5001), device, dtype)
    table = _randn(2, (4, len(kernel.COLUMNS)), device)
    counter = torch.tensor(0, device=device)
    ticket = torch.zeros(1, dtype=torch.int32, device=device)
    plan = torch.tensor([900, 600, 300], device=device)
    out = x.clone()
    advance = kernel.LoopAdvance(counter, ticket, plan, plan[0].clone(), out=out)
    src = torch.rand(4, generator=torch.Generator().manual_seed(3)).to(device) + 0.1
    advance.set_side(src, src[:1].clone())
    scaled = torch.full_like(out, float("nan"))
    advance.set_scaled(scaled)
    assert dict(advance.kernel_args)["ADVANCE"] == 3
    rows = counter.reshape(1)
    for k in range(1, 4):
        expected = kernel.fused_step(out, m, table, rows, write_x0=False)[0]
        scaled.fill_(float("nan"))
        kernel.fused_step(out, m, table, rows, out=out, write_x0=False, advance=advance)
        assert torch.equal(out, expected) and int(counter) == k
        assert torch.equal(advance.side_dst, src[min(k, 2) : min(k, 2) + 1])
        assert torch.equal(scaled, torch.mul(out, src[min(k, 2) : min(k, 2) + 1]).to(dtype))
    with pytest.raises(ValueError, match="store into out"):  # its sample elsewhere
        kernel.fused_step(out, m, table, rows, advance=advance)
    advance.set_scaled(None)
    assert dict(advance.kernel_args)["ADVANCE"] == 2


def test_loop_advance_checks_its_buffers():
    counter, ticket = torch.tensor(0), torch.zeros(1, dtype=torch.int32)
    plan = torch.tensor([3, 2, 1])
    with pytest.raises(ValueError, match="counter"):
        kernel.LoopAdvance(counter.int(), ticket, plan, plan[0].clone())
    with pytest.raises(ValueError, match="ticket"):
        kernel.LoopAdvance(counter, ticket.long(), plan, plan[0].clone())
    with pytest.raises(ValueError, match="timestep"):
        kernel.LoopAdvance(counter, ticket, plan, plan[0].float())
    advance = kernel.LoopAdvance(counter, ticket, plan, plan[0].clone())
    with pytest.raises(ValueError, match="src"):
        advance.set_side(torch.zeros(2), torch.zeros(1))
    with pytest.raises(ValueError, match="dst"):
        advance.set_side(torch.zeros(3), torch.zeros(1, dtype=torch.int64))
    assert dict(advance.kernel_args)["ADVANCE"] == 1
    with pytest.raises(ValueError, match="set_scaled needs out"):  # no out, no side value
        advance.set_scaled(torch.zeros(3))
    out = torch.zeros(2, 3)
    advance = kernel.LoopAdvance(counter, ticket, plan, plan[0].clone(), out=out)
    advance.set_side(torch.zeros(3), torch.zeros(1))
    with pytest.raises(ValueError, match="shape and strides"):
        advance.set_scaled(torch.zeros(3, 2).t())
    with pytest.raises(ValueError, match="dtype"):
        advance.set_scaled(torch.zeros(2, 3, dtype=torch.float16))
    assert dict(advance.kernel_args)["ADVANCE"] == 2


# -- the loop ------------------------------------------------------------------------------


def _scheduler(name: str, steps: int, device, **options):
    cls_name, config = ADVANCING[name]
    f = getattr(fused, cls_name)(**{"backend": "triton", **config, **options})
    torch.manual_seed(5)  # the Philox seed drawn at the first noisy step after set_timesteps
    f.set_timesteps(steps, device=device)
    return f


def _step_fn(f, weight, written=None):
    def step_fn(latents, t):
        xi = f.scale_model_input(latents, t)
        m = torch.tanh(xi * weight) * (t.float() / 1000 + 0.5)
        prev = f.step(m.to(latents.dtype), t, latents).prev_sample
        if written is not None:
            written.append(prev.data_ptr() == latents.data_ptr())
        return prev

    return step_fn


def _eager(f, step_fn, x, steps, device):
    torch.manual_seed(5)
    f.set_timesteps(steps, device=device)
    for t in f.timesteps:
        x = step_fn(x, t)
    torch.manual_seed(5)
    f.set_timesteps(steps, device=device)
    return x


@pytest.mark.parametrize("per_graph", [1, 3, 6])
@pytest.mark.parametrize("name", list(ADVANCING))
def test_advancing_loop_is_the_eager_loop(name, per_graph, as_device, device):
    steps = 6
    f = _scheduler(name, steps, device)
    written = []
    step_fn = _step_fn(f, _randn(1, device=device), written)
    x = _randn(0, device=device)
    eager = _eager(f, step_fn, x, steps, device)
    loop = capture_denoising_loop(step_fn, x, scheduler=f, steps_per_graph=per_graph)
    advance = loop.advance
    assert advance is not None and (advance.side_dst is not None) == (name in SIDE)
    # the Euler pair's launch writes the next model input (on a card: CPU scaling divides)
    assert (advance.scaled is not None) == (name in SCALED and device.type == "cuda")
    written.clear()
    assert torch.equal(loop.run(x), eager)
    # the step wrote into the loop's latents, except in the verification's reference
    # iterations (the loop's own path: outputs that alias nothing)
    assert written.count(False) == per_graph and len(written) > per_graph
    assert loop.advance is advance and advance.launches == 1
    assert int(loop.counter) == steps and int(advance.ticket) == 0
    assert torch.equal(loop.timestep, loop.plan[-1])
    if advance.side_dst is not None:
        assert torch.equal(advance.side_dst, advance.side_src[steps - 1 : steps])
    f.set_timesteps(steps, device=device)
    torch.manual_seed(5)
    assert torch.equal(loop.run(x), eager)  # again: the buffers reset by run
    # and once more without a new plan: the scheduler's host state after a chain, as a
    # replay finds it (DPM-Solver++'s first step reads its row from the advance's value)
    assert torch.equal(loop.run(x), eager)
    # after the loop a step of the scheduler advances nothing
    count = int(loop.counter)
    f.step(torch.zeros_like(x), f.timesteps[0], x.clone())
    assert int(loop.counter) == count


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_advancing_loop_is_the_loop_advancing_itself(name, as_device, device):
    """The same graphed loop with advance=False (the loop's gather, copy and increment)."""
    steps = 5
    f = _scheduler(name, steps, device)
    step_fn = _step_fn(f, _randn(1, device=device))
    x = _randn(0, device=device)
    own = capture_denoising_loop(step_fn, x, scheduler=f, advance=False)
    assert own.advance is None
    expected = own.run(x)
    f.set_timesteps(steps, device=device)
    assert torch.equal(capture_denoising_loop(step_fn, x, scheduler=f).run(x), expected)


def test_a_step_called_twice_falls_back(as_device, device):
    """Two advancing launches in the first iteration: the iteration is taken again from
    the saved state the loop's own way, and so are the next ones (no double advance)."""
    steps = 5
    f = _scheduler("ddim", steps, device)

    def step_fn(latents, t):
        half = f.step(torch.tanh(latents), t, latents).prev_sample
        return f.step(torch.tanh(half), t, half).prev_sample

    x = _randn(0, device=device)
    expected = capture_denoising_loop(step_fn, x, scheduler=f, advance=False).run(x)
    loop = capture_denoising_loop(step_fn, x, scheduler=f)
    assert loop.advance is not None
    assert torch.equal(loop.run(x), expected)
    assert loop.advance is None and int(loop.counter) == steps


def test_a_loop_without_the_step_falls_back(as_device, device):
    f = _scheduler("euler", 4, device)
    x = _randn(0, device=device)
    loop = capture_denoising_loop(lambda latents, t: latents * 0.5, x, scheduler=f)
    assert torch.equal(loop.run(x), x * 0.5**4)
    assert loop.advance is None and int(loop.counter) == 4


def test_where_the_step_cannot_advance_the_loop_advances_itself(as_device, device):
    x = _randn(0, device=device)
    f = _scheduler("ddim", 4, device, backend="reference")
    assert capture_denoising_loop(_step_fn(f, 1.0), x, scheduler=f).advance is None
    f = _scheduler("euler", 4, device)  # another plan than the scheduler's own
    loop = capture_denoising_loop(_step_fn(f, 1.0), x, f.timesteps[1:], scheduler=f)
    assert loop.advance is None
    heun = fused.FusedHeunDiscreteScheduler(backend="triton")  # ops after its launch
    heun.set_timesteps(4, device=device)
    assert capture_denoising_loop(_step_fn(heun, 1.0), x, scheduler=heun).advance is None
    g = _scheduler("ddim", 4, device)
    assert capture_denoising_loop(_step_fn(g, 1.0), x, scheduler=g, advance=False).advance is None


def test_a_step_fn_reading_t_after_the_step_is_caught(as_device, device):
    """t holds the next timestep once the step has advanced the loop: the verification
    (against the loop's own path) catches a step_fn that reads it after, and says so."""
    f = _scheduler("ddim", 5, device)

    def step_fn(latents, t):
        prev = f.step(torch.tanh(latents), t, latents).prev_sample
        return prev + t.float() / 1000

    x = _randn(0, device=device)
    with pytest.raises(GraphCaptureError, match="advance=False"):
        capture_denoising_loop(step_fn, x, scheduler=f).run(x)
    f.set_timesteps(5, device=device)
    expected = _eager(f, step_fn, x, 5, device)
    assert torch.equal(
        capture_denoising_loop(step_fn, x, scheduler=f, advance=False).run(x), expected
    )


# -- on the card ---------------------------------------------------------------------------

GPU_CASES = {
    **ADVANCING,
    "heun": ("FusedHeunDiscreteScheduler", {}),  # the loop's own path
    "flow_dpmpp_2m": (
        "FusedDPMSolverMultistepScheduler",
        {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"},
    ),
    "flow_unipc": (
        "FusedUniPCMultistepScheduler",
        {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"},
    ),
}


@pytest.mark.gpu
@pytest.mark.parametrize("per_graph", ["step", "whole"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_every_dropin_loop_is_bitwise_eager(name, dtype, per_graph, device):
    """Each drop-in's loop (scale_model_input + step) captured as CUDA graphs, one a step
    or the whole loop one graph: bitwise the eager loop, with the step's advance taken (one
    launch an iteration besides the model's and Euler's input scale) where it can be."""
    cls_name, config = GPU_CASES[name]
    steps = 12
    shape = (2, 4, 32, 32)
    f = getattr(fused, cls_name)(**{"backend": "triton", **config})
    torch.manual_seed(5)
    f.set_timesteps(steps, device=device)
    written, inputs = [], []
    weight = _randn(1, shape, device, dtype)

    def step_fn(latents, t):
        xi = f.scale_model_input(latents, t)
        inputs.append(xi.data_ptr())
        m = torch.tanh(xi * weight) * (t.float() / 1000 + 0.5)
        prev = f.step(m.to(latents.dtype), t, latents).prev_sample
        written.append(prev.data_ptr() == latents.data_ptr())
        return prev

    x = _randn(0, shape, device, dtype)
    eager = _eager(f, step_fn, x, steps, device)
    n = len(f.timesteps)
    loop = capture_denoising_loop(
        step_fn, x, scheduler=f, steps_per_graph=n if per_graph == "whole" else 1
    )
    graphed = loop.run(x)
    again = loop.run(x)  # replayed only (the captured Philox seeds)
    torch.cuda.synchronize()
    assert loop.captured and torch.isfinite(graphed).all()
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
    assert int(loop.counter) == n
    if name == "heun":
        assert loop.advance is None
        return
    assert loop.advance is not None and loop.advance.launches == 1
    assert int(loop.advance.ticket) == 0 and torch.equal(loop.timestep, loop.plan[-1])
    assert any(written)  # the step wrote into the loop's latents
    # the Euler pair's model input is the one the previous step's launch wrote
    scaled = loop.advance.scaled
    assert (scaled is not None) == (name in SCALED)
    assert scaled is None or scaled.data_ptr() in inputs


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["blend", "cfg", "identity"])
@pytest.mark.parametrize("name", sorted(SCALED))
def test_gpu_where_the_scaled_input_does_not_fit_it_is_computed_again(name, variant, device):
    """Where the launch's scaled model input would be wrong or unread, the loop stops it
    (first iteration) or the step does (the model's output in its memory), and the graphed
    loop is still bitwise the eager one: a step_fn that changes the step's sample (an
    inpainting blend), one that scales another tensor (the doubled batch of guidance), a
    model whose output is its input."""
    shape, steps = (2, 4, 16, 16), 8
    f = _scheduler(name, steps, device)
    keep = _randn(7, shape, device) > 0
    weight = _randn(1, shape, device)
    init = _randn(2, shape, device)

    def step_fn(latents, t):
        if variant == "cfg":
            xi = f.scale_model_input(torch.cat([latents] * 2), t)
            m_u, m_c = torch.tanh(xi * weight.repeat(2, 1, 1, 1)).chunk(2)
            return f.step(m_u + 3.0 * (m_c - m_u), t, latents).prev_sample
        xi = f.scale_model_input(latents, t)
        m = xi if variant == "identity" else torch.tanh(xi * weight)
        prev = f.step(m, t, latents).prev_sample
        return torch.where(keep, init, prev) if variant == "blend" else prev

    x = _randn(0, shape, device)
    eager = _eager(f, step_fn, x, steps, device)
    loop = capture_denoising_loop(step_fn, x, scheduler=f)
    assert loop.advance.scaled is not None
    graphed = loop.run(x)
    assert loop.captured and loop.advance is not None and loop.advance.scaled is None
    assert torch.equal(graphed, eager) and torch.equal(loop.run(x), eager)
