"""Tests for fastdiff.schedules: beta schedules, NoiseSchedule lookups, timestep plans.

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
    TIMESTEP_SPACINGS,
    NoiseSchedule,
    make_betas,
    make_plan,
    rescale_zero_terminal_snr,
    respaced_timesteps,
    spaced_timesteps,
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


@pytest.mark.parametrize("T", [1, 37, 999, 1000])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_spaced_timesteps_match_diffusers_for_every_step_count(
    spacing: str, steps_offset: int, T: int
) -> None:
    diffusers = pytest.importorskip("diffusers")
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        ref = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=steps_offset)
        for N in range(1, T + 1):
            ref.set_timesteps(N)
            expected = ref.timesteps.long()
            if int(expected.max()) > T - 1:
                # diffusers' leading + steps_offset can step past the table; we refuse.
                assert spacing == "leading" and steps_offset > 0
                with pytest.raises(ValueError, match="past num_train_timesteps - 1"):
                    spaced_timesteps(T, N, spacing, steps_offset)
                continue
            if spacing == "trailing" and expected.numel() == N + 1:
                # diffusers' float arange overshoots by one point for some (T, N) and then
                # returns N + 1 steps ending at t = -1; we keep the first N.
                assert int(expected[-1]) == -1
                expected = expected[:-1]
            got = spaced_timesteps(T, N, spacing, steps_offset)
            assert got.dtype == torch.long and got.device.type == "cpu"
            assert torch.equal(got, expected), (cls.__name__, T, N)
            assert torch.equal(make_plan(T, N, spacing, steps_offset), expected)


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


# ------------------------------------------------------------------------------------------
# Timestep plans
# ------------------------------------------------------------------------------------------


def test_spacings_follow_lin_et_al_table_2() -> None:
    # Lin et al. 2023, Table 2 (1000 train steps, 10 sampling steps), descending.
    assert spaced_timesteps(1000, 10, "linspace").tolist() == list(range(999, -1, -111))
    assert spaced_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert spaced_timesteps(1000, 10, "leading", 1).tolist() == list(range(901, 0, -100))
    assert spaced_timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    # steps_offset shifts only the leading spacing (as in diffusers)
    assert torch.equal(
        spaced_timesteps(1000, 10, "trailing", 1), spaced_timesteps(1000, 10, "trailing")
    )
    # linspace rounds half to even: linspace(0, 999, 3) = 0, 499.5, 999
    assert spaced_timesteps(1000, 3, "linspace").tolist() == [999, 500, 0]


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((1000, 1001), ValueError, r"num_inference_steps \(1001\) cannot be larger"),
        ((1000, 0), ValueError, "num_inference_steps must be >= 1"),
        ((1000, -5), ValueError, "num_inference_steps must be >= 1"),
        ((0, 1), ValueError, "num_train_timesteps must be >= 1"),
        ((1000, 10, "uniform"), ValueError, "unknown timestep_spacing 'uniform'"),
        ((1000, 10, "leading", -1), ValueError, "steps_offset must be >= 0"),
        ((1000, 10.0), TypeError, "num_inference_steps must be an int"),
        ((1000, 1000, "leading", 1), ValueError, "pushes the first 'leading' timestep to 1000"),
    ],
)
def test_spaced_timesteps_errors(args: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        spaced_timesteps(*args)


def _check_sections(plan: torch.Tensor, T: int, counts: list[int]) -> None:
    """Each of the len(counts) near-equal sections holds its count, visits its first and last
    timestep (when count > 1), with gaps that differ by at most one."""
    assert plan.dtype == torch.long
    assert bool((plan[1:] < plan[:-1]).all())
    steps = plan.flip(0).tolist()
    base, extra = divmod(T, len(counts))
    start = 0
    for i, n in enumerate(counts):
        size = base + (i < extra)
        inside = [s for s in steps if start <= s < start + size]
        assert len(inside) == n
        if n > 1:
            assert inside[0] == start and inside[-1] == start + size - 1
            gaps = np.diff(inside)
            assert gaps.max() - gaps.min() <= 1
        start += size
    assert len(steps) == sum(counts)


def test_respacing_sections_improved_diffusion_examples() -> None:
    plan = respaced_timesteps(1000, "10,15,20")
    assert plan.numel() == 45
    _check_sections(plan, 1000, [10, 15, 20])
    # First section (0..333, 10 steps): an exact stride of 333 / 9 = 37.
    assert plan.flip(0)[:10].tolist() == list(range(0, 334, 37))
    # improved-diffusion's docstring example: 300 steps, [10, 15, 20] -> 10 in 0..99,
    # 15 in 100..199, 20 in 200..299.
    for counts in ("10,15,20", [10, 15, 20], (10, 15, 20), " 10, 15 ,20 "):
        plan = respaced_timesteps(300, counts)
        _check_sections(plan, 300, [10, 15, 20])
        if isinstance(counts, str):  # a list given to make_plan is an explicit plan instead
            assert torch.equal(make_plan(300, counts), plan)
    # Odd sizes: 101 steps in 3 sections (34, 34, 33), one-step and empty sections.
    _check_sections(respaced_timesteps(101, [34, 1, 0]), 101, [34, 1, 0])
    assert respaced_timesteps(101, [0, 1, 0]).tolist() == [34]


def test_respacing_ddim() -> None:
    assert respaced_timesteps(1000, "ddim50").tolist() == list(range(980, -1, -20))
    assert respaced_timesteps(1000, "ddim25").tolist() == list(range(960, -1, -40))
    assert respaced_timesteps(1000, "ddim1000").tolist() == list(range(999, -1, -1))
    assert respaced_timesteps(10, "ddim3").tolist() == [8, 4, 0]  # stride 4
    assert respaced_timesteps(1000, "ddim1").tolist() == [0]
    assert torch.equal(make_plan(1000, "ddim50"), respaced_timesteps(1000, "ddim50"))


@pytest.mark.parametrize(
    "T, counts, error, match",
    [
        (10, "ddim7", ValueError, "cannot get exactly 7 timesteps out of 10"),
        (1000, "ddim0", ValueError, "needs N >= 1"),
        (1000, "ddimx", ValueError, "expected 'ddimN' with an int N"),
        (1000, "500,600", ValueError, r"section 1 \(500\.\.999\) has 500 timesteps.*600 steps"),
        (10, [11], ValueError, "has 10 timesteps, cannot take 11"),
        (1000, "", ValueError, "comma-separated ints"),
        (1000, "10,,5", ValueError, "comma-separated ints"),
        (1000, "10,-5", ValueError, "must be >= 0"),
        (1000, [], ValueError, "must not be empty"),
        (1000, [0, 0], ValueError, "0 steps in total"),
        (1000, [10, 2.5], TypeError, "each section count must be an int"),
        (1000, [True], TypeError, "each section count must be an int"),
        (1000, 10, TypeError, "section_counts must be a str or a sequence"),
    ],
)
def test_respacing_errors(T: int, counts, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        respaced_timesteps(T, counts)


def test_make_plan_dispatch() -> None:
    assert torch.equal(make_plan(1000, 50, "trailing"), spaced_timesteps(1000, 50, "trailing"))
    assert torch.equal(make_plan(1000, np.int64(7)), spaced_timesteps(1000, 7))
    assert torch.equal(make_plan(1000, "10,15,20"), respaced_timesteps(1000, "10,15,20"))
    explicit = sorted(torch.randperm(1000, generator=_gen())[:13].tolist(), reverse=True)
    for given in (explicit, tuple(explicit), np.array(explicit), torch.tensor(explicit).int()):
        plan = make_plan(1000, given)
        assert plan.dtype == torch.long and plan.tolist() == explicit
    source = torch.tensor([999, 0])
    plan = make_plan(1000, source)
    plan[0] = 5
    assert source[0].item() == 999  # a copy


@pytest.mark.parametrize(
    "steps, kwargs, error, match",
    [
        ([5, 5, 3], {}, ValueError, "strictly decreasing"),
        ([3, 5], {}, ValueError, "strictly decreasing"),
        (torch.tensor([10, 20]), {}, ValueError, "strictly decreasing"),
        ([1000, 5], {}, ValueError, r"explicit plan timestep 1000 out of range \[0, 999\]"),
        ([5, -1], {}, ValueError, "explicit plan timestep -1 out of range"),
        ([], {}, ValueError, "must not be empty"),
        (torch.tensor([[9, 8]]), {}, ValueError, "must be 1-D"),
        (np.array([[9, 8]]), {}, ValueError, "must be 1-D"),
        ([9.0, 8.0], {}, TypeError, "must hold ints"),
        (torch.tensor([9.0, 8.0]), {}, TypeError, "must hold ints"),
        (True, {}, TypeError, "got a bool"),
        (2.5, {}, TypeError, "steps must be an int, a str or a sequence"),
        (0, {}, ValueError, "num_inference_steps must be >= 1"),
        (1001, {}, ValueError, "cannot be larger than num_train_timesteps"),
        (50, dict(timestep_spacing="even"), ValueError, "unknown timestep_spacing"),
        ("ddim50", dict(steps_offset=1), ValueError, "steps_offset=1 only applies"),
        ([9, 8], dict(steps_offset=1), ValueError, "steps_offset=1 only applies"),
    ],
)
def test_make_plan_errors(steps, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make_plan(1000, steps, **kwargs)
