"""The host path of a native fused step, counted (not timed): once a sampler has stepped on a
signature, one ``sampler.step`` issues no torch op but the allocation of its outputs (no
table gathers, tensor constructions or dtype conversions per step). Each CUDA op costs the
host ~4-6 us, so one more op here is a regression of the Python-loop wall time.

The kernel launch is stubbed: the counts are of what the Python around it issues.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff
from fastdiff.flow_samplers import FlowDPMSolverPP2MSampler, FlowMatchEulerSampler
from fastdiff.kernels import fused_step as fused_step_module
from fastdiff.unipc import UniPCSampler

SCHEDULE = fastdiff.NoiseSchedule.create("linear", 1000)
STEPS = 6

SAMPLERS = {
    "ddpm": lambda: fastdiff.DDPMSampler(SCHEDULE, STEPS, backend="triton"),
    "ddpm-learned": lambda: fastdiff.DDPMSampler(
        SCHEDULE, STEPS, variance_type="learned_range", backend="triton"
    ),
    "ddim": lambda: fastdiff.DDIMSampler(SCHEDULE, STEPS, backend="triton"),
    "ddim-clip": lambda: fastdiff.DDIMSampler(
        SCHEDULE, STEPS, clip_sample_range=1.0, backend="triton"
    ),
    "euler": lambda: fastdiff.EulerSampler(SCHEDULE, STEPS, backend="triton"),
    "euler_ancestral": lambda: fastdiff.EulerAncestralSampler(SCHEDULE, STEPS, backend="triton"),
    "dpmpp_2m": lambda: fastdiff.DPMSolverPP2MSampler(
        SCHEDULE, STEPS, timestep_spacing="trailing", backend="triton"
    ),
    "flow_euler": lambda: FlowMatchEulerSampler(None, STEPS, backend="triton"),
    "flow_euler-stochastic": lambda: FlowMatchEulerSampler(
        None, STEPS, stochastic=True, backend="triton"
    ),
    "flow_dpmpp_2m": lambda: FlowDPMSolverPP2MSampler(None, STEPS, backend="triton"),
    "unipc": lambda: UniPCSampler(SCHEDULE, STEPS, timestep_spacing="trailing", backend="triton"),
}


class _CountOps(TorchDispatchMode):
    """Records the name of every aten op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_launch(monkeypatch):
    """The kernel launch as a no-op (its Python and C launcher are not what is counted)."""
    monkeypatch.setattr(fused_step_module, "_launch", lambda *args, **kwargs: None)


def _inputs(sampler, device, guided: bool):
    x = torch.randn(2, 3, 4, 5, device=device)
    channels = 6 if getattr(sampler, "_learned", None) else 3
    m = torch.randn(4 if guided else 2, channels, 4, 5, device=device)
    kwargs = {"return_x0": sampler.multistep}
    if sampler.stochastic:
        kwargs["seeds"] = torch.arange(2, device=device)
    if sampler.multistep:
        kwargs["x0_prev"] = torch.randn_like(x)
    if guided:
        kwargs["guidance_scale"] = 4.0
    return x, m, kwargs


def _ops_of_step(sampler, x, m, i, **kwargs) -> list[str]:
    for _ in range(2):  # every step once (configurations built, chains warmed), twice
        for j in range(sampler.num_steps):
            index = j if isinstance(i, int) else torch.tensor(j, device=x.device)
            sampler.step(x, m, index, **kwargs)
    if isinstance(i, int):
        sampler.step(x, m, i - 1, **kwargs)  # UniPC: step i continues a chain
    with _CountOps() as counter:
        sampler.step(x, m, i, **kwargs)
    return counter.ops


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_step_issues_only_its_output_allocations(name, guided, device, no_launch):
    sampler = SAMPLERS[name]()
    x, m, kwargs = _inputs(sampler, device, guided)
    expected = ["empty_like"] * (1 + int(sampler.multistep))  # out, and x0 when returned
    assert _ops_of_step(sampler, x, m, 3, **kwargs) == expected


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_step_into_preallocated_outputs_issues_no_op(name, device, no_launch):
    sampler = SAMPLERS[name]()
    x, m, kwargs = _inputs(sampler, device, guided=False)
    kwargs.update(out=torch.empty_like(x), x0_out=torch.empty_like(x))
    assert _ops_of_step(sampler, x, m, 3, **kwargs) == []


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_tensor_indexed_step_issues_no_op(name, no_launch):
    """A device step counter (a captured loop's): no index reshaping or range check (the
    range is checked on the CPU only, where it costs no sync)."""
    sampler = SAMPLERS[name]()
    x, m, kwargs = _inputs(sampler, torch.device("cuda"), guided=False)
    kwargs.update(out=torch.empty_like(x), x0_out=torch.empty_like(x))
    counter = torch.tensor(3, device="cuda")
    assert _ops_of_step(sampler, x, m, counter, **kwargs) == []
