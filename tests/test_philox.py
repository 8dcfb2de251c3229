"""The Philox noise stream: known-answer vectors, statistics, and kernel == PyTorch."""

import math

import pytest
import torch

from fastdiff.kernels.fused_step import COLUMNS, fused_step
from fastdiff.philox import philox4x32, randn, seeds_from

# The kernel uses the hardware lg2/sin/cos approximations on a GPU (absolute error about
# 2**-20 on (-pi, pi), relative 2**-22 for lg2), so with |z| <= 5.9 the normals agree with
# PyTorch's precise functions to ~1e-5; under the interpreter both use precise functions.
ATOL_NOISE = 2e-5 if torch.cuda.is_available() else 2e-6


def _words(*values):
    return [torch.tensor(v, dtype=torch.int64) for v in values]


# Philox4x32-10 known-answer vectors of the Random123 distribution (kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    got = philox4x32(*_words(*counter), *_words(*key))
    assert [int(w) for w in got] == list(expected)


def test_moments_and_tails():
    # 2**20 normals: the standard error of the mean is 1e-3 and of the variance 1.4e-3, so
    # 5-sigma bounds fail with probability ~1e-6 for a correct generator.
    n = 2**20
    z = randn(seeds_from(123, 16), 7, (16, n // 16)).double().flatten()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs((z**3).mean()) < 5 * math.sqrt(15) * se  # skewness, var(z^3) = 15
    assert abs((z**4).mean() - 3) < 5 * math.sqrt(96) * se  # kurtosis, var(z^4) = 96
    # Tail mass beyond 3 sigma: 0.0026998 expected, binomial standard error sqrt(p/n).
    p3 = 0.0026997960632601866
    assert abs((z.abs() > 3).double().mean() - p3) < 5 * math.sqrt(p3 / n)
    assert z.abs().max() < 5.9  # 24-bit uniforms cap |z| at sqrt(-2 ln 2**-25) = 5.89


def _corr(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_independence_across_elements_steps_seeds_and_streams():
    # Correlations of 65536 pairs have standard error 1/256 = 0.0039: |r| < 0.025 is 6.4 sigma.
    seeds = seeds_from(5, 4)
    shape = (4, 16384)
    z = randn(seeds, 3, shape)
    assert abs(_corr(z[:, :-1], z[:, 1:])) < 0.025  # neighbouring elements (same quad)
    assert abs(_corr(z[:, :-4], z[:, 4:])) < 0.025  # neighbouring quads
    assert abs(_corr(z, randn(seeds, 4, shape))) < 0.025  # next step
    assert abs(_corr(z, randn(seeds + 1, 3, shape))) < 0.025  # next seed
    assert abs(_corr(z, randn(seeds, 3, shape, stream=1))) < 0.025  # initial-noise stream


def test_deterministic_and_batch_independent():
    seeds = seeds_from(9, 5)
    a = randn(seeds, 2, (5, 3, 7, 7))
    assert torch.equal(a, randn(seeds, 2, (5, 3, 7, 7)))
    # a sample's noise depends on its own seed only, not on the batch around it
    assert torch.equal(a[3:4], randn(seeds[3:4], 2, (1, 3, 7, 7)))
    per_sample_step = torch.tensor([2, 5, 2, 5, 2])
    b = randn(seeds, per_sample_step, (5, 3, 7, 7))
    assert torch.equal(b[0], a[0]) and torch.equal(b[1], randn(seeds, 5, (5, 3, 7, 7))[1])


def test_channels_last_is_memory_order():
    seeds = seeds_from(1, 2)
    cl = randn(seeds, 0, (2, 3, 4, 5), memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    flat = randn(seeds, 0, (2, 60))
    assert torch.equal(cl.permute(0, 2, 3, 1).reshape(2, 60), flat)


def test_errors():
    with pytest.raises(ValueError, match="seed must be"):
        seeds_from(-1, 2)
    with pytest.raises(TypeError, match="int64"):
        randn(torch.zeros(2), 0, (2, 3))
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        randn(seeds_from(0, 3), 0, (2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (70, 2), (2, 1, 33), (2, 3, 1000)])
def test_kernel_draws_the_same_stream(shape, dtype, device):
    """In-kernel Philox noise equals fastdiff.philox.randn (std = 1, everything else 0), for
    every input dtype (16-bit inputs make the quads in pairs: the same values, in float32
    outputs)."""
    x = torch.randn(shape, device=device).to(dtype)
    table = torch.zeros(6, len(COLUMNS), device=device)
    table[:, COLUMNS.index("std")] = 1.0
    seeds = seeds_from(77, shape[0], device)
    out = torch.full(shape, float("nan"), device=device)
    fused_step(
        x, torch.randn_like(x), table, torch.tensor([4], device=device), seeds=seeds, out=out
    )
    expected = randn(seeds, 4, shape)
    # Same 32-bit words; only log/sin/cos differ (see ATOL_NOISE).
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL_NOISE)


def _kernel_noise(seeds, step, shape, device):
    """The kernel's own noise: a step whose only non-zero coefficient is std = 1."""
    table = torch.zeros(step + 1, len(COLUMNS), device=device)
    table[:, COLUMNS.index("std")] = 1.0
    x = torch.zeros(shape, device=device)
    rows = torch.tensor([step], device=device)
    out, _ = fused_step(x, x, table, rows, seeds=seeds, write_x0=False)
    return out


def test_kernel_noise_statistics(device):
    """Moments, tails and correlations measured on the kernel's output itself (on a GPU this
    covers the hardware lg2/sin/cos path); thresholds as in test_moments_and_tails."""
    n_per, batch = 2**16, 4
    n = n_per * batch
    seeds = seeds_from(2024, batch, device)
    z = _kernel_noise(seeds, 3, (batch, n_per), device).double().cpu()
    se = 1 / math.sqrt(n)
    flat = z.flatten()
    assert abs(flat.mean()) < 5 * se
    assert abs(flat.var() - 1) < 5 * math.sqrt(2) * se
    assert abs((flat**4).mean() - 3) < 5 * math.sqrt(96) * se
    p3 = 0.0026997960632601866
    assert abs((flat.abs() > 3).double().mean() - p3) < 5 * math.sqrt(p3 / n)
    # correlations of 2**18 pairs: standard error 0.002, bound 0.012 is 6 sigma
    assert abs(_corr(z[:, :-1], z[:, 1:])) < 0.012
    other_step = _kernel_noise(seeds, 4, (batch, n_per), device).cpu()
    other_seed = _kernel_noise(seeds + 1, 3, (batch, n_per), device).cpu()
    assert abs(_corr(z, other_step)) < 0.012
    assert abs(_corr(z, other_seed)) < 0.012
    again = _kernel_noise(seeds, 3, (batch, n_per), device).cpu()
    assert torch.equal(again.double(), z)
    alone = _kernel_noise(seeds[1:2], 3, (1, n_per), device).cpu()
    assert torch.equal(alone.double(), z[1:2])
