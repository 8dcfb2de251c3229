"""The backend switch: argument, FASTDIFF_BACKEND, auto."""

import pytest
import torch

from fastdiff.backend import resolve_backend
from fastdiff.samplers import DDIMSampler
from fastdiff.schedules import NoiseSchedule


def test_auto_takes_the_reference_on_cpu_and_for_float64(monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    assert resolve_backend(None, torch.zeros(1)) == "reference"
    assert resolve_backend("auto", torch.zeros(1, dtype=torch.float64)) == "reference"
    if torch.cuda.is_available():
        assert resolve_backend("auto", torch.zeros(1, device="cuda")) == "triton"
        assert resolve_backend("auto", torch.zeros(1, device="cuda", dtype=torch.float64)) == (
            "reference"
        )


def test_auto_takes_the_kernels_only_for_kernel_dtypes(monkeypatch):
    """dtypes: the other tensors of the step (a float64 model output or output buffer sends
    auto to the reference); an explicit backend is taken as it is."""
    x = torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_backend("auto", x, (torch.float64,)) == "reference"
    assert resolve_backend("triton", x, (torch.float64,)) == "triton"
    if torch.cuda.is_available():
        assert resolve_backend("auto", x, (torch.float16, torch.bfloat16)) == "triton"
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    assert resolve_backend(None, x, [torch.float64]) == "reference"


def test_argument_wins_over_environment(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    x = torch.zeros(1)
    assert resolve_backend(None, x) == "triton"
    assert resolve_backend("reference", x) == "reference"


def test_environment_selects_the_backend_of_a_sampler(monkeypatch, device):
    schedule = NoiseSchedule.create("linear", 1000)
    sampler = DDIMSampler(schedule, 10)  # backend None: FASTDIFF_BACKEND decides at step time
    x, m = torch.randn(2, 3, 4, 4, device=device), torch.randn(2, 3, 4, 4, device=device)
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    want = sampler.step(x.double(), m.double(), 3).prev_sample
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")  # on a CPU, under the interpreter
    got = sampler.step(x, m, 3).prev_sample
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=5e-5)


def test_bad_names(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        DDIMSampler(NoiseSchedule.create("linear", 1000), 10, backend="cuda")
    monkeypatch.setenv("FASTDIFF_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND='fast'"):
        resolve_backend(None, torch.zeros(1))
