"""Tests for fastdiff.schedules: beta schedules and NoiseSchedule lookups (plans: test_plans.py).

Closed forms are recomputed here independently (python math / numpy, float64); diffusers is
used as a second reference where it is installed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fastdiff.schedules import (
    BETA_SCHEDULES,
    CONDITIONINGS,
    NoiseSchedule,
    make_betas,
    rescale_zero_terminal_snr,
)

# Default (beta_start, beta_end) per schedule, as the usual configs use them.
BETA_RANGES = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (1e-4, 0.02),
    "sigmoid": (1e-4, 0.02),
}

# Tolerances for add_noise by dtype. add_noise computes in float32 (float64 for float64 input)
# and rounds once to the output dtype, so the error is half an ulp of the output dtype (rtol
# at its machine epsilon: 2^-11 float16, 2^-8 bfloat16) plus the float32 arithmetic error
# (~1e-6 absolute for O(1) values, a few ulps); float64 only sees float64 rounding.
ADD_NOISE_TOL = {
    torch.float16: dict(rtol=2.0**-10, atol=1e-5),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-5),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float64: dict(rtol=1e-13, atol=1e-13),
}


def _gen() -> torch.Generator:
    """A freshly seeded generator: new random inputs on every run."""
    g = torch.Generator()
    g.manual_seed(int(torch.randint(0, 2**62, ()).item()))
    return g


# ------------------------------------------------------------------------------------------
# Beta schedules against their closed forms (python math, float64)
# ------------------------------------------------------------------------------------------


def _closed_form_betas(schedule: str, T: int, start: float, end: float) -> np.ndarray:
    out = []
    for i in range(T):
        frac = i / (T - 1) if T > 1 else 0.0
        if schedule == "linear":
            b = start + (end - start) * frac
        elif schedule == "scaled_linear":
            b = (math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * frac) ** 2
        elif schedule == "squaredcos_cap_v2":

            def f(u: float) -> float:
                return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

            b = min(1 - f((i + 1) / T) / f(i / T), 0.999)
        elif schedule == "sigmoid":
            x = -6.0 + 12.0 * frac
            b = start + (end - start) / (1.0 + math.exp(-x))
        else:
            raise AssertionError(schedule)
        out.append(b)
    return np.array(out, dtype=np.float64)


@pytest.mark.parametrize("T", [1, 2, 37, 1000])
@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_betas_match_closed_form(schedule: str, T: int) -> None:
    start, end = BETA_RANGES[schedule]
    betas = make_betas(schedule, T, start, end)
    assert betas.dtype == torch.float64 and betas.device.type == "cpu"
    assert betas.shape == (T,)
    expected = torch.from_numpy(_closed_form_betas(schedule, T, start, end))
    # Both sides are float64 evaluations of the same formula: a few ulps apart.
    torch.testing.assert_close(betas, expected, rtol=1e-12, atol=1e-15)
    assert bool(((betas > 0) & (betas <= 1)).all())


def test_cosine_schedule_caps_last_beta() -> None:
    betas = make_betas("squaredcos_cap_v2", 1000)
    assert betas[-1].item() == 0.999
    assert bool((betas <= 0.999).all())


def test_trained_betas_are_kept_in_float64() -> None:
    given = torch.rand(17, generator=_gen(), dtype=torch.float64) * 0.5 + 0.01
    betas = make_betas("linear", 17, trained_betas=given)
    assert betas.dtype == torch.float64
    assert torch.equal(betas, given)
    assert betas.data_ptr() != given.data_ptr()  # a copy, not a view of the caller's tensor
    from_list = make_betas(num_train_timesteps=3, trained_betas=[0.1, 0.2, 1.0])
    assert torch.equal(from_list, torch.tensor([0.1, 0.2, 1.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(beta_schedule="cosine"), ValueError, "unknown beta_schedule"),
        (dict(num_train_timesteps=0), ValueError, "num_train_timesteps must be >= 1"),
        (dict(num_train_timesteps=10.0), TypeError, "num_train_timesteps must be an int"),
        (dict(num_train_timesteps=True), TypeError, "num_train_timesteps must be an int"),
        (dict(beta_start=float("nan")), ValueError, "beta_start must be finite"),
        (dict(beta_end="0.02"), TypeError, "beta_end must be a real number"),
        (dict(beta_start=0.0), ValueError, r"must lie in \(0, 1\]"),
        (dict(beta_end=1.5), ValueError, r"must lie in \(0, 1\]"),
        (
            dict(beta_schedule="scaled_linear", beta_start=-1e-4),
            ValueError,
            "scaled_linear needs beta_start >= 0",
        ),
        (
            dict(num_train_timesteps=3, trained_betas=[[0.1, 0.2, 0.3]]),
            ValueError,
            "trained_betas must be 1-D",
        ),
        (dict(num_train_timesteps=3, trained_betas=[]), ValueError, "must not be empty"),
        (
            dict(num_train_timesteps=3, trained_betas=[0.1, float("inf"), 0.3]),
            ValueError,
            "trained_betas must be finite",
        ),
        (
            dict(num_train_timesteps=3, trained_betas=[0.1, 0.0, 0.3]),
            ValueError,
            r"trained_betas must lie in \(0, 1\], got trained_betas\[1\]",
        ),
        (
            dict(num_train_timesteps=3, trained_betas=[0.1, 1.2, 0.3]),
            ValueError,
            r"must lie in \(0, 1\]",
        ),
        (
            dict(num_train_timesteps=1000, trained_betas=[0.1, 0.2]),
            ValueError,
            "trained_betas has 2 entries but num_train_timesteps is 1000",
        ),
        (
            dict(num_train_timesteps=2, trained_betas=torch.tensor([1, 1])),
            TypeError,
            "trained_betas must be a floating-point tensor",
        ),
        (
            dict(num_train_timesteps=2, trained_betas=["a", "b"]),
            TypeError,
            "trained_betas must be a sequence of real numbers",
        ),
    ],
)
def test_make_betas_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make_betas(**kwargs)


# ------------------------------------------------------------------------------------------
# Zero terminal SNR (Lin et al. 2023, Algorithm 1)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_zero_terminal_snr(schedule: str) -> None:
    start, end = BETA_RANGES[schedule]
    T = 1000
    old = _closed_form_betas(schedule, T, start, end)
    new = rescale_zero_terminal_snr(torch.from_numpy(old))
    assert new.dtype == torch.float64 and new.shape == (T,)
    assert new[-1].item() == 1.0  # exactly pure noise at the last step
    ab_new = np.cumprod(1.0 - new.numpy())
    assert ab_new[-1] == 0.0
    # sqrt(ab) is shifted so its last value is 0 and scaled so its first value is unchanged:
    # sqrt_ab_new = (sqrt_ab_old - last) * first / (first - last).
    sqrt_old = np.sqrt(np.cumprod(1.0 - old))
    first, last = sqrt_old[0], sqrt_old[-1]
    expected = (sqrt_old - last) * first / (first - last)
    # float64 round trips through betas and cumprod: ~T ulps at most.
    np.testing.assert_allclose(np.sqrt(ab_new), expected, rtol=1e-12, atol=1e-15)
    assert math.isclose(ab_new[0], sqrt_old[0] ** 2, rel_tol=1e-14)
    # It is still a valid schedule: strictly decreasing, last entry exactly 0.
    s = NoiseSchedule.create(schedule, T, start, end, rescale_betas_zero_snr=True)
    assert s.alphas_cumprod[-1].item() == 0.0
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())


def test_zero_terminal_snr_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 betas"):
        rescale_zero_terminal_snr([0.1])
    with pytest.raises(ValueError, match="betas must be 1-D"):
        rescale_zero_terminal_snr(torch.full((2, 3), 0.1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\]"):
        rescale_zero_terminal_snr([0.1, -0.1, 0.2])


# ------------------------------------------------------------------------------------------
# Against diffusers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_snr", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("T", [37, 1000])
@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_alphas_cumprod_match_diffusers(schedule: str, T: int, zero_snr: bool) -> None:
    diffusers = pytest.importorskip("diffusers")
    start, end = BETA_RANGES[schedule]
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=schedule,
        beta_start=start,
        beta_end=end,
        rescale_betas_zero_snr=zero_snr,
    )
    s = NoiseSchedule.create(schedule, T, start, end, rescale_betas_zero_snr=zero_snr)
    # diffusers computes in float32: the cumprod over T factors accumulates up to ~T * 2^-24
    # relative error (6e-5 at T=1000), and zero SNR's shift of sqrt(ab) cancels near the end,
    # where the absolute error is a few float32 ulps of 1.
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-4, atol=2e-6)
    if zero_snr:
        assert ref.alphas_cumprod[-1].item() == 0.0 == s.alphas_cumprod[-1].item()


# ------------------------------------------------------------------------------------------
# NoiseSchedule: construction and validation
# ------------------------------------------------------------------------------------------


def test_create_matches_tables() -> None:
    s = NoiseSchedule.create("scaled_linear", 50, 0.00085, 0.012)
    betas = _closed_form_betas("scaled_linear", 50, 0.00085, 0.012)
    assert s.num_train_timesteps == 50
    assert s.betas.dtype == s.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    assert s == NoiseSchedule.create("scaled_linear", 50, 0.00085, 0.012)
    assert hash(s) == hash(NoiseSchedule.create("scaled_linear", 50, 0.00085, 0.012))
    assert s != NoiseSchedule.create("linear", 50)
    assert "num_train_timesteps=50" in repr(s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.betas = s.betas  # type: ignore[misc]


def test_schedule_copies_float32_tables() -> None:
    betas32 = torch.linspace(1e-4, 0.02, 100, dtype=torch.float32)
    s = NoiseSchedule(betas=betas32, alphas_cumprod=torch.cumprod(1 - betas32, 0))
    assert s.betas.dtype == torch.float64
    betas32.fill_(0.5)  # the schedule owns its copy
    assert s.betas[0].item() == pytest.approx(1e-4)


def _tables(T: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    betas = torch.linspace(0.01, 0.2, T, dtype=torch.float64)
    return betas, torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda b, a: (b[None], a), ValueError, "betas must be 1-D"),
        (lambda b, a: (b, a[None]), ValueError, "alphas_cumprod must be 1-D"),
        (lambda b, a: (b, a[:-1]), ValueError, "must have the same length"),
        (lambda b, a: (b[:0], a[:0]), ValueError, "betas must not be empty"),
        (lambda b, a: (b, a.index_fill(0, torch.tensor([3]), math.nan)), ValueError, "finite"),
        (lambda b, a: (b.index_fill(0, torch.tensor([3]), 0.0), a), ValueError, r"\(0, 1\]"),
        (lambda b, a: (b, a.flip(0)), ValueError, "strictly decreasing"),
        (lambda b, a: (b, a.index_fill(0, torch.tensor([4]), 0.0)), ValueError, "only its last"),
        (lambda b, a: (b, a * 1.1), ValueError, r"alphas_cumprod must lie in \(0, 1\]"),
        (lambda b, a: (b, a * 0.9), ValueError, "is not cumprod"),
        (lambda b, a: (b.long(), a), TypeError, "betas must be a floating-point tensor"),
    ],
)
def test_schedule_validation(make, error: type, match: str) -> None:
    betas, ab = make(*_tables())
    with pytest.raises(error, match=match):
        NoiseSchedule(betas=betas, alphas_cumprod=ab)


def test_create_rejects_non_bool_rescale() -> None:
    with pytest.raises(TypeError, match="rescale_betas_zero_snr must be a bool"):
        NoiseSchedule.create(rescale_betas_zero_snr="yes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# NoiseSchedule: lookups
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_schedule() -> NoiseSchedule:
    return NoiseSchedule.create("linear", 1000)


def _closed_form_ab(T: int = 1000) -> np.ndarray:
    return np.cumprod(1 - _closed_form_betas("linear", T, 1e-4, 0.02))


def test_alpha_bar_and_sigma_accept_every_timestep_form(linear_schedule: NoiseSchedule) -> None:
    ab = _closed_form_ab()
    t = torch.randint(0, 1000, (3, 5), generator=_gen())
    expected = torch.from_numpy(ab[t.numpy()])
    for given in (t, t.int(), t.tolist(), t.numpy()):
        got = linear_schedule.alpha_bar(given)
        assert got.dtype == torch.float64 and got.shape == (3, 5)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    t0 = int(t[0, 0])
    assert linear_schedule.alpha_bar(t0).shape == ()
    assert linear_schedule.alpha_bar(np.int64(t0)).item() == pytest.approx(ab[t0], rel=1e-12)
    sigma = linear_schedule.sigma(t)
    torch.testing.assert_close(sigma, ((1 - expected) / expected).sqrt(), rtol=1e-12, atol=0)
    assert linear_schedule.alpha_bar([]).shape == (0,)


def test_minus_one_means_clean(linear_schedule: NoiseSchedule) -> None:
    assert linear_schedule.alpha_bar(-1).item() == 1.0
    assert linear_schedule.sigma(-1).item() == 0.0
    assert linear_schedule.conditioning(-1, "log_snr").item() == math.inf
    assert linear_schedule.conditioning(-1, "timestep").item() == -1.0
    got = linear_schedule.alpha_bar(torch.tensor([5, -1, 999]))
    assert got[1].item() == 1.0
    assert got[0].item() == pytest.approx(_closed_form_ab()[5], rel=1e-12)


def test_zero_snr_terminal_noise_levels() -> None:
    s = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012, rescale_betas_zero_snr=True)
    assert s.alpha_bar(999).item() == 0.0
    assert s.sigma(999).item() == math.inf
    assert s.conditioning(999, "log_snr").item() == -math.inf


@pytest.mark.parametrize("kind", CONDITIONINGS)
def test_conditioning_values(linear_schedule: NoiseSchedule, kind: str) -> None:
    ab = _closed_form_ab()
    t = torch.randint(0, 1000, (7,), generator=_gen())
    a = ab[t.numpy()]
    expected = {
        "timestep": t.numpy().astype(np.float64),
        "alpha_bar": a,
        "sigma": np.sqrt((1 - a) / a),
        "log_snr": np.log(a / (1 - a)),
    }[kind]
    got = linear_schedule.conditioning(t, kind)
    assert got.dtype == torch.float64 and got.shape == (7,)
    # float64 on both sides; log_snr near ab ~ 1 loses a few digits to 1 - ab.
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-10, atol=1e-12)
    assert torch.equal(linear_schedule.conditioning(t), t.double())  # "timestep" is the default


def test_lookups_do_not_touch_device_data(linear_schedule: NoiseSchedule) -> None:
    # Tensors on the meta device have no data: any host sync (.item(), .cpu(), bool()) on
    # them raises, so this checks the device path is sync-free the way a CUDA run would be.
    t = torch.tensor([3, 999, -1], device="meta")
    for kind in CONDITIONINGS:
        out = linear_schedule.conditioning(t, kind)
        assert out.device.type == "meta" and out.shape == (3,) and out.dtype == torch.float64
    assert linear_schedule.alpha_bar(t).device.type == "meta"
    assert linear_schedule.sigma(t.int()).device.type == "meta"
    x0 = torch.empty(3, 4, 5, device="meta", dtype=torch.bfloat16)
    out = linear_schedule.add_noise(x0, torch.empty_like(x0), t)
    assert out.device.type == "meta" and out.shape == x0.shape and out.dtype == torch.bfloat16
    # out-of-range device timesteps are not checked on the host (that would need a sync)
    assert linear_schedule.alpha_bar(torch.tensor([5000], device="meta")).shape == (1,)


@pytest.mark.parametrize(
    "t, error, match",
    [
        (1000, ValueError, r"timestep 1000 out of range \[-1, 999\]"),
        (-2, ValueError, r"timestep -2 out of range \[-1, 999\]"),
        ([0, 5, 1000], ValueError, "timestep 1000 out of range"),
        (torch.tensor([[3, -7]]), ValueError, "timestep -7 out of range"),
        (np.array([10**6]), ValueError, "out of range"),
        (2.0, TypeError, "timesteps must be ints"),
        ([1.5, 2.0], TypeError, "timesteps must be ints"),
        (True, TypeError, "got a bool"),
        ([True], TypeError, "timesteps must be ints"),
        ("5", TypeError, "timesteps must be ints"),
        (torch.tensor([1.0]), TypeError, "integer tensor"),
        (torch.tensor([True]), TypeError, "integer tensor"),
    ],
)
def test_timestep_errors(linear_schedule: NoiseSchedule, t, error: type, match: str) -> None:
    for lookup in (
        linear_schedule.alpha_bar,
        linear_schedule.sigma,
        lambda t: linear_schedule.conditioning(t, "log_snr"),
        lambda t: linear_schedule.conditioning(t, "timestep"),
    ):
        with pytest.raises(error, match=match):
            lookup(t)


def test_unknown_conditioning(linear_schedule: NoiseSchedule) -> None:
    with pytest.raises(ValueError, match=r"unknown conditioning kind 'snr'.*'timestep'.*'log_snr'"):
        linear_schedule.conditioning(3, "snr")


# ------------------------------------------------------------------------------------------
# add_noise (Ho et al. 2020, eq. 4)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_sample", [True, False], ids=["t_per_sample", "t_scalar"])
@pytest.mark.parametrize("dtype", list(ADD_NOISE_TOL), ids=str)
def test_add_noise_matches_formula(
    linear_schedule: NoiseSchedule, dtype: torch.dtype, per_sample: bool
) -> None:
    g = _gen()
    shape = (5, 3, 7, 11)  # odd sizes
    x0 = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    noise = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if per_sample:
        t = torch.randint(0, 1000, (5,), generator=g)
        t[0] = -1  # one clean sample
        t[1] = 999  # and the noisiest one
    else:
        t = int(torch.randint(0, 1000, (), generator=g))
    ab = np.concatenate([[1.0], _closed_form_ab()])[np.asarray(t) + 1]
    ab = torch.as_tensor(ab, dtype=torch.float64).reshape((-1, 1, 1, 1) if per_sample else ())
    expected = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    got = linear_schedule.add_noise(x0, noise, t)
    assert got.dtype == dtype and got.shape == shape
    torch.testing.assert_close(got.double(), expected, **ADD_NOISE_TOL[dtype])
    if per_sample:
        assert torch.equal(got[0], x0[0])  # t = -1: exactly the clean sample


def test_add_noise_keeps_channels_last(linear_schedule: NoiseSchedule) -> None:
    x0 = torch.randn(2, 3, 5, 7, generator=_gen()).to(memory_format=torch.channels_last)
    noise = torch.randn(2, 3, 5, 7, generator=_gen())
    out = linear_schedule.add_noise(x0, noise, torch.tensor([4, 800]))
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "x0, noise, t, error, match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), 5, ValueError, r"noise shape \(2, 4\)"),
        (torch.zeros(2, 3), torch.zeros(3, 2), 5, ValueError, "does not match x0 shape"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3), 5, TypeError, "x0 must be"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32), 5, TypeError, "noise must be"),
        (np.zeros((2, 3)), torch.zeros(2, 3), 5, TypeError, "x0 must be a tensor"),
        (torch.zeros(2, 3), torch.zeros(2, 3), [1, 2, 3], ValueError, "need x0 with batch size 3"),
        (torch.zeros(()), torch.zeros(()), [1], ValueError, "need x0 with batch size 1"),
        (torch.zeros(2, 3), torch.zeros(2, 3), [[1], [2]], ValueError, "scalar or of shape"),
        (torch.zeros(2, 3), torch.zeros(2, 3), [1, 1000], ValueError, "out of range"),
        (torch.zeros(2, 3), torch.zeros(2, 3), 0.5, TypeError, "timesteps must be ints"),
    ],
)
def test_add_noise_errors(linear_schedule, x0, noise, t, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        linear_schedule.add_noise(x0, noise, t)


def test_add_noise_device_mismatch(linear_schedule: NoiseSchedule) -> None:
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="noise is on meta but x0 is on cpu"):
        linear_schedule.add_noise(x0, torch.empty(2, 3, device="meta"), 5)
    with pytest.raises(ValueError, match="timesteps are on meta but x0 is on cpu"):
        linear_schedule.add_noise(x0, x0, torch.tensor([1, 2], device="meta"))
