"""Benchmark settings: real timings on a CUDA card, a one-pass smoke run everywhere else.

* Without CUDA, pytest-benchmark is forced into ``--benchmark-disable`` mode (each benchmarked
  function runs once, no statistics) and the kernels run under the Triton interpreter: the
  suite then only checks that every benchmark still runs (tiny shapes, see ``bench_step.py``).
* With CUDA, the ``copy_bandwidth`` fixture measures the card's device-to-device copy
  bandwidth once per session; every step figure is reported as a fraction of it
  (``shared/PERFORMANCE.md``: "the floor").
* ``FASTDIFF_BENCH_DEADLINE`` (seconds since the epoch, set by ``gpu_run.sh``): benchmarks
  that would start after it are skipped, so a time-boxed GPU run still ends normally and
  writes its JSON.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    # Before any kernel module is imported: triton.jit reads this when it decorates.
    os.environ.setdefault("TRITON_INTERPRET", "1")

COPY_BYTES = 1 << 30  # 1 GiB source, copied into a 1 GiB destination


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """No CUDA: run each benchmark once as a smoke test (timings on a CPU mean nothing here)."""
    if HAS_CUDA:
        return
    if hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True
        config.option.benchmark_enable = False
    # If pytest-benchmark configured itself before this hook ran, tell its session too.
    session = getattr(config, "_benchmarksession", None)
    if session is not None:
        session.disabled = True


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Name the card and the library versions in the JSON (figures without a card mean little)."""
    import triton

    machine_info["cuda_device"] = torch.cuda.get_device_name() if HAS_CUDA else None
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["cuda"] = torch.version.cuda
    try:
        import diffusers

        machine_info["diffusers"] = diffusers.__version__
    except ImportError:
        machine_info["diffusers"] = None


@pytest.fixture(autouse=True)
def _time_budget() -> None:
    """Skip benchmarks that would start after ``FASTDIFF_BENCH_DEADLINE`` (epoch seconds)."""
    deadline = os.environ.get("FASTDIFF_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("time budget of this run used up (FASTDIFF_BENCH_DEADLINE)")


@pytest.fixture(scope="session")
def copy_bandwidth() -> float | None:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes/s), or None without CUDA.

    A 1 GiB float32 tensor is copied into a preallocated 1 GiB tensor; the median of
    ``triton.testing.do_bench`` gives the time and the bytes are read + written (2 GiB).
    This is the practical ceiling a memory-bound step can reach on this card, measured in the
    same run as the steps (the cards are shared and vary).
    """
    if not HAS_CUDA:
        return None
    ms = _copy_ms()
    torch.cuda.empty_cache()  # give the 2 GiB back to the benchmarks
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def _copy_ms() -> float:
    """Median milliseconds of one COPY_BYTES device-to-device copy (do_bench, CUDA events)."""
    import triton.testing

    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    return triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=400, return_mode="median")
