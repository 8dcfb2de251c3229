"""The one step dispatch (fastdiff.stepping): layouts, aliased buffers and the backend."""

import pathlib

import pytest
import torch
from conftest import TOLERANCES

from fastdiff.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler
from fastdiff.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.create("linear", 1000)
TOL = TOLERANCES[torch.float32]
CL = torch.channels_last


def _pair(cls, **kwargs):
    return cls(SCHEDULE, 10, backend="triton", **kwargs), cls(SCHEDULE, 10, backend="reference")


@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_model_output_in_another_layout_than_x(x_layout, device):
    """A channels_last conv returns channels_last output for contiguous input: the kernel
    path lays it out like x, as the reference path takes it (issue 9, item 4)."""
    fused, ref = _pair(DDPMSampler)
    x = torch.randn(2, 3, 5, 7, device=device)
    m, noise = torch.randn_like(x), torch.randn_like(x)
    if x_layout == "channels_last":
        x = x.to(memory_format=CL)
    else:
        m, noise = m.to(memory_format=CL), noise.to(memory_format=CL)
    got = fused.step(x, m, 4, noise=noise)
    want = ref.step(x.double(), m.double(), 4, noise=noise.double())
    fmt = CL if x_layout == "channels_last" else torch.contiguous_format
    assert got.prev_sample.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got.prev_sample.double(), want.prev_sample, **TOL)
    torch.testing.assert_close(got.pred_original_sample.double(), want.pred_original_sample, **TOL)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_aliased_multistep_step_with_thresholding(backend, device):
    """x0_out aliasing x0_prev (how SamplingGraph keeps its state) gives the un-aliased step:
    the thresholding pre-pass must not overwrite x0_prev before the main pass reads it."""
    sampler = DPMSolverPP2MSampler(SCHEDULE, 10, thresholding=(0.9, 1.5), backend=backend)
    ref = DPMSolverPP2MSampler(SCHEDULE, 10, thresholding=(0.9, 1.5), backend="reference")
    x = 3 * torch.randn(3, 2, 5, 7, device=device)
    m, x0_prev = 3 * torch.randn_like(x), torch.randn_like(x)
    want = sampler.step(x, m, 4, x0_prev=x0_prev)
    x_buf, x0_buf = x.clone(), x0_prev.clone()
    got = sampler.step(x_buf, m, 4, x0_prev=x0_buf, out=x_buf, x0_out=x0_buf)
    assert got.prev_sample.data_ptr() == x_buf.data_ptr()
    assert torch.equal(x_buf, want.prev_sample)
    assert torch.equal(x0_buf, want.pred_original_sample)
    exact = ref.step(x.double(), m.double(), 4, x0_prev=x0_prev.double())
    torch.testing.assert_close(x_buf.double(), exact.prev_sample, **TOL)


def test_out_in_another_dtype_is_written_as_given(device):
    """out= of another float dtype is written, not replaced, on both backends."""
    x, m = torch.randn(2, 3, 4, 4, device=device), torch.randn(2, 3, 4, 4, device=device)
    results = []
    for backend in ("triton", "reference"):
        out = torch.full(x.shape, float("nan"), dtype=torch.float16, device=device)
        got = DDIMSampler(SCHEDULE, 10, backend=backend).step(x, m, 3, out=out).prev_sample
        assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float16
        results.append(got)
    torch.testing.assert_close(results[0], results[1], **TOLERANCES[torch.float16])


def test_only_the_backend_module_reads_the_environment():
    """FASTDIFF_BACKEND has one reader, fastdiff.backend (the drop-ins go through it too)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    readers = [
        p.relative_to(root).as_posix()
        for p in sorted((root / "fastdiff").rglob("*.py"))
        if "environ" in (text := p.read_text()) and '"FASTDIFF_BACKEND"' in text
    ]
    assert readers == ["fastdiff/backend.py"]


def test_drop_in_follows_the_environment(monkeypatch, device):
    """A drop-in with backend=None resolves FASTDIFF_BACKEND through fastdiff.backend."""
    pytest.importorskip("diffusers")
    from fastdiff.diffusers import FusedDDIMScheduler

    scheduler = FusedDDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4, device=device)
    m = torch.randn_like(x)
    t = scheduler.timesteps[2]
    calls = []
    import fastdiff.backend as backends
    import fastdiff.stepping as stepping

    resolve = backends.resolve_backend
    record = lambda *a: calls.append(a) or resolve(*a)  # noqa: E731
    monkeypatch.setattr(backends, "resolve_backend", record)  # the drop-ins' lookup
    monkeypatch.setattr(stepping, "resolve_backend", record)  # run_step's
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    want = scheduler.step(m, t, x).prev_sample
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    got = scheduler.step(m, t, x).prev_sample
    assert [c[0] for c in calls] == [None, None]
    torch.testing.assert_close(got, want, **TOL)
