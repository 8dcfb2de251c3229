"""Tests for fastdiff.plans: timestep spacings, respacing and explicit plans.

diffusers' ``set_timesteps`` is the reference for the spacings where it is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff.plans import TIMESTEP_SPACINGS, make_plan, respaced_timesteps, spaced_timesteps


def _gen() -> torch.Generator:
    """A freshly seeded generator: new random inputs on every run."""
    g = torch.Generator()
    g.manual_seed(int(torch.randint(0, 2**62, ()).item()))
    return g


def test_schedules_re_exports_the_plans() -> None:
    import fastdiff.plans

    for name in fastdiff.plans.__all__:
        assert getattr(fastdiff.schedules, name) is getattr(fastdiff.plans, name)
        assert name in fastdiff.schedules.__all__


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
