"""Shared test settings: the kernels run under the Triton interpreter on this CPU machine.

Tolerances for comparing a kernel (float32 arithmetic, output rounded to its dtype) with the
reference computed in float64 from the same inputs. Each number is the output rounding of
the dtype plus float32 arithmetic error amplified by the step's coefficients:

* float32: unit roundoff 6e-8; the eps->x0 conversion multiplies by up to 1/sqrt(ab_min)
  ~ 160 for the schedules used in the tests, and the coefficient table itself is rounded to
  float32, so relative errors reach ~1e-5 and absolute ones ~2e-5 on N(0,1)-sized data.
* float16: output rounding 2**-11 = 4.9e-4 relative (the arithmetic error is far below).
* bfloat16: output rounding 2**-8 = 3.9e-3 relative, doubled because the interpreter
  truncates bfloat16 stores instead of rounding them.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before any kernel module is imported: triton.jit reads this when it decorates.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOLERANCES = {
    torch.float32: {"rtol": 2e-5, "atol": 5e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3},
}

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def no_tf32():
    """Full float32 convolutions and matmuls on a GPU: TF32 rounds a model's inputs to 10
    mantissa bits, which would turn the schedulers' float32-ulp differences into 1e-3 ones
    in pipeline comparisons (use: ``pytestmark = pytest.mark.usefixtures("no_tf32")``)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def device():
    """CUDA when there is one (GPU runs), else the CPU under the Triton interpreter."""
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")


def random_mixture(seed: int, dim: int):
    """A random two-component Gaussian mixture in ``dim`` dimensions, the same for one seed:
    means N(0, 4 I), covariances A A^T / dim + 0.2 I (A with N(0, 1) entries; eigenvalues
    >= 0.2), weights 0.4 and 0.6; all in float64.

    Args:
        seed: seed of the torch.Generator that draws the means and covariances.
        dim: the dimension of a sample.

    Returns:
        A ``fastdiff.gmm.GaussianMixture``.
    """
    from fastdiff.gmm import GaussianMixture

    g = torch.Generator().manual_seed(seed)
    means = torch.randn(2, dim, generator=g, dtype=torch.float64) * 2
    a = torch.randn(2, dim, dim, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) / dim + 0.2 * torch.eye(dim, dtype=torch.float64)
    return GaussianMixture([0.4, 0.6], means, covs)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after it). For files whose loops run many
    small ops: one thread is faster, and on a busy CI machine multi-threaded small ops stall
    waiting for descheduled threads. Use it with ``pytestmark =
    pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def as_device(monkeypatch):
    """Timesteps read as device tensors (no host value, even CPU ones: the drop-ins' device
    step-index path), and graphs through the eager stand-in runtime (``graph_fakes``)."""
    from graph_fakes import EagerRuntime

    from fastdiff import capture
    from fastdiff.diffusers import _base

    monkeypatch.setattr(_base, "on_host", lambda t: False)
    monkeypatch.setattr(capture, "make_runtime", EagerRuntime)
