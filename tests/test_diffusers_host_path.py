"""The host cost of a drop-in step, bounded by counts (never by time).

A loop of ``scale_model_input`` + ``step`` on small latents is host-bound: on the H200 one
CUDA torch op costs ~4-6 us of host time and the fused launch ~6-10 us, against a target of
30 us a step (issue 10). These tests count, for one steady-state step of each drop-in on the
kernel path (the launch itself stubbed out, so the count is the same under the interpreter
as on a card), the aten ops dispatched and the Python calls made inside
``fastdiff.diffusers``, and bound them, so that an added table gather, copy, tensor
construction or helper layer cannot slip in unnoticed.

The aten ops left are the ones the diffusers contract needs: the two outputs (prev_sample and
pred_original_sample; one when diffusers returns no x0), Euler's input division (the scaled
sample is returned), and the noise draw of ``noise="torch"`` (diffusers' ``randn_tensor``).
"""

from __future__ import annotations

import collections
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("diffusers")

import fastdiff.kernels.fused_step as fused_step_module  # noqa: E402
from fastdiff.diffusers import (  # noqa: E402
    FusedDDIMScheduler,
    FusedDDPMScheduler,
    FusedDPMSolverMultistepScheduler,
    FusedEulerAncestralDiscreteScheduler,
    FusedEulerDiscreteScheduler,
    FusedFlowMatchEulerDiscreteScheduler,
    FusedUniPCMultistepScheduler,
)

SHAPE = (1, 4, 8, 8)
DIFFUSERS_DIR = os.path.join("fastdiff", "diffusers") + os.sep

# (class, noise, generator?): aten ops a step may issue besides the launch, Python calls into
# fastdiff/diffusers a step may make (today's counts: a regression fails, a gain passes)
CASES = {
    "ddpm": (FusedDDPMScheduler, "torch", True, 3, 12),
    "ddpm-philox": (FusedDDPMScheduler, "philox", False, 2, 13),
    "ddim": (FusedDDIMScheduler, "torch", False, 2, 11),
    "euler": (FusedEulerDiscreteScheduler, "torch", False, 3, 10),
    "euler_a": (FusedEulerAncestralDiscreteScheduler, "torch", True, 4, 11),
    "euler_a-philox": (FusedEulerAncestralDiscreteScheduler, "philox", False, 3, 12),
    "dpm": (FusedDPMSolverMultistepScheduler, "torch", False, 2, 11),
    "unipc": (FusedUniPCMultistepScheduler, "torch", False, 1, 11),
    "flow": (FusedFlowMatchEulerDiscreteScheduler, "torch", False, 1, 10),
}


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_launch(monkeypatch):
    """The kernel path up to the launch (checks, allocations, launch constants), without it."""
    if not fused_step_module._interpreting():
        pytest.skip("counts the CPU kernel path under TRITON_INTERPRET=1")
    monkeypatch.setattr(fused_step_module, "_launch", lambda *args, **kwargs: None)


def _steady_step(name: str):
    """A scheduler on the kernel path after a warm-up loop (tables built and uploaded, kernel
    configs cached, step index known), and one iteration of the loop to count."""
    cls, noise, with_generator, _, _ = CASES[name]
    scheduler = cls(backend="triton", noise=noise)
    x = torch.randn(SHAPE)
    m = torch.randn(SHAPE)
    generator = torch.Generator().manual_seed(0) if with_generator else None
    kwargs = {"generator": generator} if with_generator else {}
    scheduler.set_timesteps(10)
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)
        scheduler.step(m, t, x, **kwargs)
    scheduler.set_timesteps(10)  # the same plan: tables kept
    timesteps = list(scheduler.timesteps)
    for t in timesteps[:3]:
        scheduler.scale_model_input(x, t)
        scheduler.step(m, t, x, **kwargs)
    t = timesteps[3]

    def iteration():
        scheduler.scale_model_input(x, t)
        return scheduler.step(m, t, x, **kwargs)

    return iteration


@pytest.mark.parametrize("name", list(CASES))
def test_aten_ops_per_step(name, no_launch):
    iteration = _steady_step(name)
    counter = _CountOps()
    with counter:
        out = iteration()
    assert out.prev_sample.shape == SHAPE
    bound = CASES[name][3]
    assert sum(counter.ops.values()) <= bound, (
        f"{name}: a step issues {dict(counter.ops)} besides the launch; at most {bound} "
        "(each CUDA op costs ~5 us of host time)"
    )


@pytest.mark.parametrize("name", list(CASES))
def test_python_calls_per_step(name, no_launch):
    iteration = _steady_step(name)
    calls: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call" and DIFFUSERS_DIR in frame.f_code.co_filename:
            calls[frame.f_code.co_name] += 1

    sys.setprofile(profile)
    try:
        iteration()
    finally:
        sys.setprofile(None)
    bound = CASES[name][4]
    assert sum(calls.values()) <= bound, (
        f"{name}: a step makes {sum(calls.values())} calls in fastdiff.diffusers "
        f"({dict(calls)}); at most {bound}"
    )


@pytest.mark.parametrize("name", list(CASES))
def test_a_steady_step_skips_the_dispatch_and_the_checks(name, no_launch, monkeypatch):
    """A step whose inputs have the signature of an earlier step of the same scheduler
    launches the configuration checked then: neither run_step (the backend dispatch) nor
    the kernel's checks run again."""
    iteration = _steady_step(name)
    import fastdiff.diffusers._step as step_module

    calls = collections.Counter()
    run_step, check = step_module.run_step, fused_step_module._launch_config

    def counted(function, label):
        return lambda *a, **k: calls.update([label]) or function(*a, **k)

    monkeypatch.setattr(step_module, "run_step", counted(run_step, "run_step"))
    monkeypatch.setattr(fused_step_module, "_launch_config", counted(check, "checks"))
    iteration()
    iteration()
    assert not calls, dict(calls)


def test_a_new_signature_is_checked_after_the_cached_ones(no_launch):
    """Every input whose signature the scheduler has not launched yet gets the kernel's
    checks and their errors, however many steps of other signatures came before; an input
    that needs a copy takes the dispatch (run_step) and gives the same result."""
    scheduler = FusedDDIMScheduler(backend="triton")
    scheduler.set_timesteps(10)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    t = scheduler.timesteps[3]
    for _ in range(3):
        scheduler.step(m, t, x)
    with pytest.raises(ValueError, match="model_output has shape"):
        scheduler.step(torch.randn(2, *SHAPE[1:]), t, x)
    with pytest.raises(ValueError, match="model_output has shape"):
        scheduler.step(torch.randn(1, *SHAPE), t, x)
    with pytest.raises(TypeError, match="model_output has dtype"):
        scheduler.step(m.to(torch.int32), t, x)
    scheduler.step(m, t, x)  # the cached signature still launches


@pytest.mark.parametrize("name", ["ddim", "euler", "flow"])
def test_cached_and_dispatched_steps_agree(name, device):
    """A step through the cached launch and one that takes the dispatch (a model output
    laid out otherwise: copied by run_step) give the same bits, interleaved."""
    cls, noise = CASES[name][:2]
    cached, dispatched = cls(backend="triton", noise=noise), cls(backend="triton", noise=noise)
    x, m = torch.randn(SHAPE, device=device), torch.randn(SHAPE, device=device)
    for scheduler in (cached, dispatched):
        scheduler.set_timesteps(4, device=device)
    for i, t in enumerate(cached.timesteps):
        m_i = m + i
        other = m_i.to(memory_format=torch.channels_last) if i % 2 else m_i
        want = cached.step(m_i, t, x)
        got = dispatched.step(other, t, x)
        assert torch.equal(got.prev_sample, want.prev_sample)
        x = want.prev_sample


def test_a_copied_scheduler_checks_again_and_steps_alike(device):
    """A deep copy (some diffusers pipelines copy their scheduler) or a pickled copy of a
    stepped scheduler starts without the launch cache and steps as the original does."""
    import copy
    import pickle

    scheduler = FusedDDIMScheduler(backend="triton")
    scheduler.set_timesteps(4, device=device)
    x, m = torch.randn(SHAPE, device=device), torch.randn(SHAPE, device=device)
    t = scheduler.timesteps[1]
    want = scheduler.step(m, t, x).prev_sample
    assert scheduler._launches
    for other in (copy.deepcopy(scheduler), pickle.loads(pickle.dumps(scheduler))):
        assert not other._launches
        assert torch.equal(other.step(m, t, x).prev_sample, want)
        assert torch.equal(other.step(m, t, x).prev_sample, want)


# aten ops of one iteration of a graphed loop (step index = the loop's counter, timestep a
# device tensor): each one is a kernel in the graph, ~2 us a step on the card (issue 10's 5 us
# a step). Euler: the input division's gather and product, the two outputs; DDIM / DDPM: the
# timestep's row (add, clamp) and the two outputs; the others: the output alone.
GRAPHED_OPS = {
    "ddim": 5, "ddpm-philox": 5, "euler": 7, "euler_a-philox": 7, "dpm": 3, "unipc": 2, "flow": 2
}  # fmt: skip


@pytest.mark.parametrize("name", list(GRAPHED_OPS))
def test_aten_ops_per_graphed_iteration(name, no_launch, as_device):
    """No device lookup of the step index inside a graph over the scheduler's own plan: the
    loop's counter is the index (``prepare_graph_step(counter)``), and the step leaves its
    advance to the loop."""
    cls, noise = CASES[name][:2]
    scheduler = cls(backend="triton", noise=noise)
    scheduler.set_timesteps(10)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    counter = torch.zeros((), dtype=torch.int64)
    for _ in range(4):
        scheduler.prepare_graph_step(counter)
        t = torch.take(scheduler.timesteps, counter)
        ops = _CountOps()
        with ops:
            scheduler.scale_model_input(x, t)
            scheduler.step(m, t, x)
        counter.add_(1)
        assert getattr(scheduler, "step_index", counter) is counter  # advanced by the loop
    assert sum(ops.ops.values()) <= GRAPHED_OPS[name], dict(ops.ops)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm"])
def test_set_timesteps_again_keeps_the_uploaded_plan(name):
    """The same plan on the same device again (a pipeline calls set_timesteps per image): the
    timesteps already there are kept, no new upload; another plan gets its own."""
    cls = CASES[name][0]
    scheduler = cls()
    reference = cls._diffusers_cls.from_config(scheduler.config)
    scheduler.set_timesteps(4, device="cpu")
    first = scheduler.timesteps
    scheduler.set_timesteps(4, device="cpu")
    assert scheduler.timesteps is first
    for steps in (6, 4):
        scheduler.set_timesteps(steps, device="cpu")
        reference.set_timesteps(steps, device="cpu")
        assert scheduler.timesteps is not first
        torch.testing.assert_close(scheduler.timesteps, reference.timesteps, rtol=0, atol=0)


def test_set_timesteps_checks_positional_arguments():
    """The plan checks read the arguments by name also when they are passed by position."""
    scheduler = FusedDPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match="needs use_dynamic_shifting"):
        scheduler.set_timesteps(4, "cpu", 1.0)  # mu, by position
    flow = FusedFlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="sigmas"):
        flow.set_timesteps(None, "cpu", [0.2, 0.5])  # not decreasing


@pytest.mark.parametrize("generator", [None, "cpu"], ids=["global RNG", "generator"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_noise_is_randn_tensor_bit_for_bit(generator, dtype):
    """The step noise drawn inline (``_step_noise``'s common case, also in another dtype than
    the tensor it is drawn like) is diffusers' ``randn_tensor`` draw: the same values, and
    the generator (or torch's global stream) left in the same state; the other cases go
    through ``randn_tensor`` itself."""
    from diffusers.utils.torch_utils import randn_tensor

    seed = int(torch.randint(0, 2**31, (1,)))
    device = torch.device("cpu")
    scheduler = FusedDDPMScheduler()

    def step_noise(shape, generator, device, dtype):  # the step's own inline draw
        like = torch.empty(shape, device=device, dtype=dtype)
        return scheduler._step_noise(like, like, generator)[0]

    def step_noise_as(shape, generator, device, dtype):  # drawn like a float64 tensor
        like = torch.empty(shape, device=device, dtype=torch.float64)
        return scheduler._step_noise(like, like, generator, None, dtype)[0]

    def draw(shape, generator, device, dtype):
        return step_noise(shape, generator, device, dtype)

    results = []
    for fn in (randn_tensor, step_noise, step_noise_as):
        if generator is None:
            torch.manual_seed(seed)
            got = fn((2, 3, 5), generator=None, device=device, dtype=dtype)
            after = torch.rand(4)
        else:
            g = torch.Generator().manual_seed(seed)
            got = fn((2, 3, 5), generator=g, device=device, dtype=dtype)
            after = torch.rand(4, generator=g)
        results.append((got, after))
    (want, want_after), *others = results
    for got, got_after in others:
        assert got.dtype == want.dtype and got.device == want.device
        assert torch.equal(got, want) and torch.equal(got_after, want_after)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]  # a list: randn_tensor's
    want = randn_tensor((2, 3), generator=gens, device=device, dtype=dtype)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    assert torch.equal(draw((2, 3), gens, device, dtype), want)


def test_launch_cache_keys_tables_by_identity_and_keeps_them_alive(no_launch):
    """The launch cache keys the scheduler's table by id: its entry holds the table (an id
    is unique only among live objects), and a new plan (new tables) gets its own entry, its
    inputs checked again."""
    scheduler = FusedDDIMScheduler(backend="triton")
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    scheduler.step(m, t, x)
    ((key, entry),) = scheduler._launches.items()
    table = scheduler._last_tables[2]["table"]
    assert id(table) in key and any(item is table for item in entry[-1])  # (its kept refs)
    scheduler.set_timesteps(7)  # another plan: tables and launches dropped
    assert not scheduler._launches
    with pytest.raises(ValueError, match="model_output has shape"):
        scheduler.step(torch.randn(2, *SHAPE[1:]), scheduler.timesteps[2], x)
    scheduler.step(m, scheduler.timesteps[2], x)
    ((new_key, _),) = scheduler._launches.items()
    assert new_key != key
