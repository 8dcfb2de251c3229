"""Tests of the pure-PyTorch reference steps (fastdiff.reference), CPU only.

1. Paper formulas in float64, each written here independently of the reference.
2. Agreement with diffusers' schedulers (same config, same model outputs, same noise).
3. Classifier-free guidance rescale against diffusers' ``rescale_noise_cfg``.
4. The errors the math itself needs (argument checks: tests/test_checks.py).

Inputs are fresh random numbers on every run (the seed is printed, so a failure can be
replayed); shapes are odd on purpose.
"""

from __future__ import annotations

import functools
import math
import secrets

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fastdiff import reference as R

F64 = torch.float64
SHAPE = (3, 2, 5, 7)  # odd sizes, batch 3
# float64 against a closed form written differently: a handful of roundings on values of
# magnitude <= ~100, so 1e-12 relative / 1e-11 absolute is ~100x above the observed error.
TOL64 = {"rtol": 1e-12, "atol": 1e-11}


@pytest.fixture
def gen() -> torch.Generator:
    seed = secrets.randbits(62)
    print(f"test seed: {seed}")  # shown by pytest on failure
    return torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype)


def uniform(gen: torch.Generator, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=F64)


def schedule_pair(gen: torch.Generator, batch: int = SHAPE[0]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (ab_t, ab_next) with 0 < ab_t < ab_next < 1, away from the ends."""
    ab_t = uniform(gen, 0.05, 0.9, batch)
    ab_next = ab_t + (1 - ab_t) * uniform(gen, 0.05, 0.9, batch)
    return ab_t, ab_next


def bcast(v: torch.Tensor | float, ndim: int = len(SHAPE)) -> torch.Tensor | float:
    """[B] -> [B, 1, ..., 1] so a per-sample value multiplies a [B, ...] tensor."""
    return v.view(-1, *([1] * (ndim - 1))) if isinstance(v, torch.Tensor) else v


def model_output_for(ptype: str, x0: torch.Tensor, eps: torch.Tensor, ab) -> torch.Tensor:
    """What a perfect model of each prediction type outputs for x_t built from (x0, eps)."""
    alpha, sigma = bcast(ab) ** 0.5, (1 - bcast(ab)) ** 0.5
    return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[ptype]


def closed_x0(x: torch.Tensor, m: torch.Tensor, ab, ptype: str) -> torch.Tensor:
    alpha, sigma = bcast(ab) ** 0.5, (1 - bcast(ab)) ** 0.5
    if ptype == "epsilon":
        return (x - sigma * m) / alpha
    if ptype == "sample":
        return m
    return alpha * x - sigma * m


# =======================================================================================
# 1. Paper formulas (float64)
# =======================================================================================


@pytest.mark.parametrize("ptype", R.PREDICTION_TYPES)
def test_predictions_round_trip_through_forward_process(gen, ptype):
    x0, eps = randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab = uniform(gen, 0.02, 0.98, SHAPE[0])
    x = bcast(ab) ** 0.5 * x0 + (1 - bcast(ab)) ** 0.5 * eps  # Ho et al. eq. 4
    m = model_output_for(ptype, x0, eps, ab)
    assert_close(R.predict_x0(x, m, ab, ptype), x0, **TOL64)
    assert_close(R.predict_eps(x, m, ab, ptype), eps, **TOL64)


def test_v_prediction_identities(gen):
    # Salimans & Ho 2022: v = alpha eps - sigma x0 with alpha^2 + sigma^2 = 1 is the
    # velocity d x_t / d phi for x_t = cos(phi) x0 + sin(phi) eps.
    x0, eps = randn(gen, *SHAPE), randn(gen, *SHAPE)
    phi = uniform(gen, 0.1, 1.4, SHAPE[0])
    x = bcast(phi.cos()) * x0 + bcast(phi.sin()) * eps
    v = bcast(phi.cos()) * eps - bcast(phi.sin()) * x0
    dphi = 1e-6
    x_plus = bcast((phi + dphi).cos()) * x0 + bcast((phi + dphi).sin()) * eps
    x_minus = bcast((phi - dphi).cos()) * x0 + bcast((phi - dphi).sin()) * eps
    assert_close((x_plus - x_minus) / (2 * dphi), v, rtol=1e-8, atol=1e-8)  # O(dphi^2)
    ab = phi.cos() ** 2
    assert_close(R.predict_x0(x, v, ab, "v_prediction"), x0, **TOL64)
    assert_close(R.predict_eps(x, v, ab, "v_prediction"), eps, **TOL64)
    # ||x||^2 + ||v||^2 = ||x0||^2 + ||eps||^2 (a rotation)
    assert_close(x**2 + v**2, x0**2 + eps**2, **TOL64)
    # In sigma space (x / alpha), Euler's v formula gives the same x0.
    sigma = (1 - ab) ** 0.5 / ab**0.5
    _, x0_euler = R.euler_step(x / bcast(ab**0.5), v, sigma, 0.0, prediction_type="v_prediction")
    assert_close(x0_euler, x0, **TOL64)


def posterior_mean_eq7(x, x0, ab_t, ab_next):
    """Ho et al. eq. 7 with beta_t -> beta' = 1 - ab_t / ab_next, alpha' = 1 - beta'."""
    ab_t, ab_next = bcast(ab_t), bcast(ab_next)
    beta = 1 - ab_t / ab_next
    alpha = 1 - beta
    return ab_next**0.5 * beta / (1 - ab_t) * x0 + alpha**0.5 * (1 - ab_next) / (1 - ab_t) * x


@pytest.mark.parametrize("ptype", R.PREDICTION_TYPES)
def test_ddpm_mean_is_posterior_mean_eq7(gen, ptype):
    x, m = randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab_t, ab_next = schedule_pair(gen)
    x_prev, x0 = R.ddpm_step(x, m, ab_t, ab_next, prediction_type=ptype)
    assert_close(x0, closed_x0(x, m, ab_t, ptype), **TOL64)
    assert_close(x_prev, posterior_mean_eq7(x, x0, ab_t, ab_next), **TOL64)


def test_ddpm_mean_epsilon_form_eq11(gen):
    # Ho et al. eq. 11: mu = (x_t - beta' / sqrt(1 - ab_t) eps) / sqrt(alpha'), unclipped.
    x, eps = randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab_t, ab_next = schedule_pair(gen)
    beta = 1 - bcast(ab_t) / bcast(ab_next)
    expected = (x - beta / (1 - bcast(ab_t)) ** 0.5 * eps) / (1 - beta) ** 0.5
    assert_close(R.ddpm_step(x, eps, ab_t, ab_next)[0], expected, **TOL64)


def expected_ddpm_std(variance_type, ab_t, ab_next, v=None):
    ab_t, ab_next = bcast(ab_t), bcast(ab_next)
    beta = 1 - ab_t / ab_next
    small = torch.clamp((1 - ab_next) / (1 - ab_t) * beta, min=1e-20)
    if variance_type in ("fixed_small", "fixed_small_log"):
        return small.sqrt()
    if variance_type in ("fixed_large", "fixed_large_log"):
        return beta.sqrt()
    if variance_type == "learned":
        return torch.exp(v / 2)
    frac = (v + 1) / 2  # Nichol & Dhariwal 2021 eq. 15
    return torch.exp((frac * beta.log() + (1 - frac) * small.log()) / 2)


@pytest.mark.parametrize("variance_type", R.VARIANCE_TYPES)
def test_ddpm_noise_std_by_variance_type(gen, variance_type):
    x, z = randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab_t, ab_next = schedule_pair(gen)
    learned = variance_type in ("learned", "learned_range")
    v = uniform(gen, -1, 1, *SHAPE) if learned else None
    m = torch.cat([randn(gen, *SHAPE), v], dim=1) if learned else randn(gen, *SHAPE)
    kw = {"variance_type": variance_type}
    mean, _ = R.ddpm_step(x, m, ab_t, ab_next, **kw)
    noisy, _ = R.ddpm_step(x, m, ab_t, ab_next, noise=z, **kw)
    std = expected_ddpm_std(variance_type, ab_t, ab_next, v)
    assert_close(noisy - mean, std * z, **TOL64)
    variance = R.ddpm_variance(ab_t, ab_next, variance_type, v)
    variance = variance if learned else bcast(variance).expand(SHAPE)
    assert_close(variance, (std**2).expand(SHAPE), **TOL64)


def test_ddpm_step_to_clean(gen):
    # ab_next = 1: the posterior mean is x0 itself and no noise is added by default.
    x, m, z = randn(gen, *SHAPE), randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab_t = uniform(gen, 0.1, 0.9, SHAPE[0])
    x_prev, x0 = R.ddpm_step(x, m, ab_t, 1.0, variance_type="fixed_large", noise=z)
    assert_close(x_prev, x0, **TOL64)
    # add_noise=True forces noise (fixed_large: std = sqrt(beta') = sqrt(1 - ab_t)).
    forced, _ = R.ddpm_step(x, m, ab_t, 1.0, variance_type="fixed_large", noise=z, add_noise=True)
    assert_close(forced, x0 + bcast(1 - ab_t) ** 0.5 * z, **TOL64)
    # per-sample: sample 1 goes to clean, the others do not; add_noise=False disables all.
    ab_next = torch.tensor([0.95, 1.0, 0.97], dtype=F64)
    x_prev, x0 = R.ddpm_step(x, m, ab_t, ab_next, noise=z)
    mean, _ = R.ddpm_step(x, m, ab_t, ab_next)
    assert_close(x_prev[1], x0[1], **TOL64)
    assert (x_prev[0] != mean[0]).all() and (x_prev[2] != mean[2]).all()
    off, _ = R.ddpm_step(x, m, ab_t, ab_next, noise=z, add_noise=False)
    assert_close(off, mean, **TOL64)
    mask = torch.tensor([True, True, False])
    part, _ = R.ddpm_step(x, m, ab_t, ab_next, noise=z, add_noise=mask)
    assert_close(part[2], mean[2], **TOL64)
    assert_close(part[1], x0[1] + 1e-10 * z[1], **TOL64)  # fixed_small floor: sqrt(1e-20)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_classifier_guidance_shifts_mean_by_variance(gen, variance_type):
    # Dhariwal & Nichol 2021 Alg. 1: mean + Sigma * grad; nothing on the step to clean.
    x, g = randn(gen, *SHAPE), randn(gen, *SHAPE)
    learned = variance_type == "learned_range"
    v = uniform(gen, -1, 1, *SHAPE) if learned else None
    m = torch.cat([randn(gen, *SHAPE), v], dim=1) if learned else randn(gen, *SHAPE)
    ab_t = uniform(gen, 0.1, 0.5, SHAPE[0])
    ab_next = torch.tensor([0.8, 1.0, 0.6], dtype=F64)
    kw = {"variance_type": variance_type}
    plain, _ = R.ddpm_step(x, m, ab_t, ab_next, **kw)
    guided, _ = R.ddpm_step(x, m, ab_t, ab_next, grad=g, **kw)
    var = expected_ddpm_std(variance_type, ab_t, ab_next, v) ** 2
    var = var * bcast(torch.tensor([1.0, 0.0, 1.0], dtype=F64))
    assert_close(guided - plain, var * g, **TOL64)


def ddim_eq12(x, eps, x0, ab_t, ab_next, eta, z):
    ab_t, ab_next = bcast(ab_t), bcast(ab_next)
    sigma = eta * ((1 - ab_next) / (1 - ab_t)) ** 0.5 * (1 - ab_t / ab_next) ** 0.5  # eq. 16
    return ab_next**0.5 * x0 + (1 - ab_next - sigma**2) ** 0.5 * eps + sigma * z


@pytest.mark.parametrize("ptype", R.PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.4, 1.0])
def test_ddim_is_eq12(gen, ptype, eta):
    x, m, z = randn(gen, *SHAPE), randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab_t, ab_next = schedule_pair(gen)
    x_prev, x0 = R.ddim_step(x, m, ab_t, ab_next, eta=eta, prediction_type=ptype, noise=z)
    x0_ref = closed_x0(x, m, ab_t, ptype)
    eps_ref = (x - bcast(ab_t) ** 0.5 * x0_ref) / (1 - bcast(ab_t)) ** 0.5
    assert_close(x0, x0_ref, **TOL64)
    assert_close(x_prev, ddim_eq12(x, eps_ref, x0_ref, ab_t, ab_next, eta, z), **TOL64)


def test_ddim_eta0_is_deterministic(gen):
    x, m, z = randn(gen, *SHAPE), randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab_t, ab_next = schedule_pair(gen)
    with_noise, _ = R.ddim_step(x, m, ab_t, ab_next, eta=0.0, noise=z)
    assert torch.equal(with_noise, R.ddim_step(x, m, ab_t, ab_next, eta=0.0)[0])


@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddim_eta1_is_ddpm_posterior(gen, clip):
    # Song et al. 2021 Sec. 4.1: with sigma from eq. 16 at eta = 1 the DDIM step is the DDPM
    # posterior, mean (eq. 7) and variance. With clipping DDPM's mean uses the clipped x0,
    # so DDIM must re-derive eps from it (use_clipped_model_output).
    x, z = randn(gen, *SHAPE), randn(gen, *SHAPE)
    m = 3 * randn(gen, *SHAPE)  # large enough that clipping is active
    ab_t, ab_next = schedule_pair(gen)
    ddim = R.ddim_step(
        x, m, ab_t, ab_next, eta=1.0, clip_range=clip, use_clipped_model_output=True, noise=z
    )
    ddpm = R.ddpm_step(x, m, ab_t, ab_next, clip_range=clip, noise=z)
    assert_close(ddim[0], ddpm[0], **TOL64)
    assert_close(ddim[1], ddpm[1], **TOL64)
    posterior_std = bcast(R.ddpm_variance(ab_t, ab_next, "fixed_small")) ** 0.5
    kw = {"eta": 1.0, "clip_range": clip, "use_clipped_model_output": True}
    mean, _ = R.ddim_step(x, m, ab_t, ab_next, **kw)
    assert_close(ddim[0] - mean, posterior_std * z, **TOL64)


@pytest.mark.parametrize("ptype", R.PREDICTION_TYPES)
def test_euler_is_ddim_eta0_in_sigma_space(gen, ptype):
    # Karras et al. 2022 Sec. 3 / Song et al. 2021 eq. 14: DDIM (eta = 0) is the Euler method
    # for the probability-flow ODE in sigma space, x_sigma = x_t / sqrt(ab).
    x, m = randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab_t, ab_next = schedule_pair(gen)
    sigma, sigma_next = ((1 - ab_t) / ab_t) ** 0.5, ((1 - ab_next) / ab_next) ** 0.5
    x_next, x0 = R.euler_step(x / bcast(ab_t) ** 0.5, m, sigma, sigma_next, prediction_type=ptype)
    x_prev, x0_ddim = R.ddim_step(x, m, ab_t, ab_next, prediction_type=ptype)
    assert_close(x0, x0_ddim, **TOL64)
    assert_close(x_next * bcast(ab_next) ** 0.5, x_prev, **TOL64)


def test_euler_closed_form_and_step_to_zero(gen):
    x, m = randn(gen, *SHAPE), randn(gen, *SHAPE)
    sigma, sigma_next = uniform(gen, 1, 10, SHAPE[0]), uniform(gen, 0.1, 1, SHAPE[0])
    # epsilon: d = eps, x_next = x + (sigma_next - sigma) eps (Karras et al. Alg. 2 line 8)
    x_next, x0 = R.euler_step(x, m, sigma, sigma_next)
    assert_close(x_next, x + bcast(sigma_next - sigma) * m, **TOL64)
    for ptype in R.PREDICTION_TYPES:
        x_next, x0 = R.euler_step(x, m, sigma, 0.0, prediction_type=ptype)
        assert_close(x_next, x0, **TOL64)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 3.0])
def test_euler_ancestral_closed_form(gen, eta):
    x, m, z = randn(gen, *SHAPE), randn(gen, *SHAPE), randn(gen, *SHAPE)
    sigma, sigma_next = uniform(gen, 1, 10, SHAPE[0]), uniform(gen, 0.1, 1, SHAPE[0])
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (1 - sigma_next**2 / sigma**2)).sqrt())
    down = (sigma_next**2 - up**2).sqrt()
    x_next, x0 = R.euler_ancestral_step(x, m, sigma, sigma_next, eta=eta, noise=z)
    assert_close(x_next, x + bcast(down - sigma) * m + bcast(up) * z, **TOL64)
    # total variance at sigma_next is preserved: down^2 + up^2 = sigma_next^2
    assert_close(down**2 + up**2, sigma_next**2, **TOL64)
    if eta == 0.0:
        assert_close(x_next, R.euler_step(x, m, sigma, sigma_next)[0], **TOL64)
    to_zero, x0 = R.euler_ancestral_step(x, m, sigma, 0.0, eta=eta, noise=z)
    assert_close(to_zero, x0, **TOL64)


@pytest.mark.parametrize("ptype", R.PREDICTION_TYPES)
def test_dpmpp_first_order_is_ddim_eta0(gen, ptype):
    # Lu et al. 2022 Sec. 4.1: DPM-Solver++(1) is DDIM.
    x, m = randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab_t, ab_next = schedule_pair(gen)
    dpm = R.dpmpp_multistep_step(x, m, ab_t, ab_next, prediction_type=ptype)
    ddim = R.ddim_step(x, m, ab_t, ab_next, prediction_type=ptype)
    assert_close(dpm[0], ddim[0], **TOL64)
    assert_close(dpm[1], ddim[1], **TOL64)


def test_dpmpp_second_order_closed_form(gen):
    # Lu et al. 2022 Alg. 2 with lambda = log(alpha / sigma) computed from logs directly.
    x, m, x0_prev = randn(gen, *SHAPE), randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab_t, ab_next = schedule_pair(gen)
    ab_prev = ab_t * uniform(gen, 0.3, 0.9, SHAPE[0])

    def lam(a):  # log(alpha / sigma)
        return torch.log(a.sqrt() / (1 - a).sqrt())

    h, h_prev = lam(ab_next) - lam(ab_t), lam(ab_t) - lam(ab_prev)
    r = h_prev / h
    x0 = closed_x0(x, m, ab_t, "epsilon")
    d = (1 + 1 / (2 * bcast(r))) * x0 - 1 / (2 * bcast(r)) * x0_prev
    sigma_t, sigma_n, alpha_n = (1 - ab_t) ** 0.5, (1 - ab_next) ** 0.5, ab_next**0.5
    expected = bcast(sigma_n / sigma_t) * x - bcast(alpha_n * (torch.exp(-h) - 1)) * d
    got, _ = R.dpmpp_multistep_step(x, m, ab_t, ab_next, history=[(x0_prev, ab_prev)])
    assert_close(got, expected, **TOL64)
    # a constant x0 makes the correction vanish: second order = first order
    x_next, x0 = R.dpmpp_multistep_step(x, m, ab_t, ab_next)
    same, _ = R.dpmpp_multistep_step(x, m, ab_t, ab_next, history=[(x0, ab_prev)])
    assert_close(same, x_next, **TOL64)


def test_dpmpp_ve_is_vp_on_the_scaled_state(gen):
    """k-diffusion's sigma space (``space="ve"``, x = x0 + sigma eps) is the VP state over
    sqrt(ab) with sigma = sqrt((1 - ab) / ab); DPM-Solver++ is invariant to the scale, so the
    VE step is the VP step over sqrt(ab_next) (first and second order)."""
    x, m, x0_prev = randn(gen, *SHAPE), randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab_prev, ab, ab_next = 0.2, 0.4, 0.7

    def sigma(a):
        return ((1 - a) / a) ** 0.5

    for second_order in (False, True):
        vp_history = [(x0_prev, ab_prev)] if second_order else []
        ve_history = [(x0_prev, sigma(ab_prev))] if second_order else []
        want, _ = R.dpmpp_multistep_step(
            x, m, ab, ab_next, history=vp_history, prediction_type="sample"
        )
        got, _ = R.dpmpp_multistep_step(
            x / ab**0.5, m, sigma(ab), sigma(ab_next), history=ve_history, space="ve"
        )
        assert_close(got * ab_next**0.5, want, **TOL64)


def test_dpmpp_first_order_at_the_ends(gen):
    x, m, x0_prev = randn(gen, *SHAPE), randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab_t = uniform(gen, 0.1, 0.9, SHAPE[0])
    # to clean (h = inf): first order, which returns x0 itself
    x_next, x0 = R.dpmpp_multistep_step(x, m, ab_t, 1.0, history=[(x0_prev, ab_t / 2)])
    assert torch.isfinite(x_next).all()
    assert_close(x_next, x0, **TOL64)
    # ab_prev = 0 (no previous information, lambda_prev = -inf): first order, per sample
    ab_next = ab_t + (1 - ab_t) / 2
    ab_prev = torch.tensor([0.0, 0.05, 0.0], dtype=F64) * ab_t
    mixed, _ = R.dpmpp_multistep_step(x, m, ab_t, ab_next, history=[(x0_prev, ab_prev)])
    first, _ = R.dpmpp_multistep_step(x, m, ab_t, ab_next)
    assert_close(mixed[[0, 2]], first[[0, 2]], **TOL64)
    assert not torch.allclose(mixed[1], first[1])
    # from pure noise (ab_t = 0, zero terminal SNR) with v-prediction: finite
    x_next, _ = R.dpmpp_multistep_step(x, m, 0.0, 0.3, prediction_type="v_prediction")
    assert torch.isfinite(x_next).all()


def test_solvers_converge_at_their_order_on_gaussian_data(gen):
    # For x0 ~ N(mu, c^2) the exact denoiser is linear and the probability-flow ODE has the
    # closed-form solution x_t = sqrt(ab) mu + sqrt(ab c^2 + 1 - ab) z with z constant. DDIM
    # (= Euler = DPM-Solver++(1)) must converge at order 1, DPM-Solver++(2M) at order 2.
    mu, c = 0.7, 0.5
    x_start = 3 * randn(gen, 9, 1)

    def denoiser(x, ab):
        return mu + ab**0.5 * c**2 / (ab * c**2 + 1 - ab) * (x - ab**0.5 * mu)

    def solve(n, second_order):
        # uniform in lambda from -4 to 3 (ab from 3e-4 to 0.998)
        abs_ = [1 / (1 + math.exp(-2 * (-4 + 7 * i / n))) for i in range(n + 1)]
        exact = abs_[-1] ** 0.5 * mu + (
            (abs_[-1] * c**2 + 1 - abs_[-1]) / (abs_[0] * c**2 + 1 - abs_[0])
        ) ** 0.5 * (x_start - abs_[0] ** 0.5 * mu)
        x, x0, ab_prev = x_start, None, None
        for a, a_next in zip(abs_[:-1], abs_[1:]):
            m = denoiser(x, a)
            kw = {"history": [(x0, ab_prev)]} if second_order and x0 is not None else {}
            x, x0 = R.dpmpp_multistep_step(x, m, a, a_next, prediction_type="sample", **kw)
            ab_prev = a
        return (x - exact).abs().max().item()

    first = [solve(n, False) for n in (20, 40, 80)]
    second = [solve(n, True) for n in (20, 40, 80)]
    # error ratios when the step count doubles: ~1/2 for order 1, ~1/4 for order 2
    assert 0.45 < first[2] / first[1] < 0.55 and 0.45 < first[1] / first[0] < 0.56
    assert 0.2 < second[2] / second[1] < 0.3
    assert second[2] < first[2] / 20


def test_clip_and_dynamic_thresholding(gen):
    x0 = 2 * randn(gen, *SHAPE)
    assert_close(R.process_x0(x0, clip_range=1.5), x0.clamp(-1.5, 1.5), **TOL64)
    assert torch.equal(R.process_x0(x0), x0)
    ratio, max_value = 0.8, 2.0
    got = R.process_x0(x0, thresholding=(ratio, max_value))
    for b in range(SHAPE[0]):
        # Saharia et al. 2022: s = ratio-percentile of |x0|, at least 1, capped at max_value
        s = min(max(np.quantile(x0[b].abs().numpy(), ratio), 1.0), max_value)
        assert_close(got[b], x0[b].clamp(-s, s) / s, **TOL64)
    # s < 1 is raised to 1: thresholding then is plain clipping to [-1, 1]
    small = 0.3 * x0 / x0.abs().amax()
    small[:, 0, 0, 0] = 5.0  # one outlier: above the quantile, clipped to 1
    assert_close(R.process_x0(small, thresholding=(0.9, 3.0)), small.clamp(-1, 1), **TOL64)


X0_STEPS = {
    "ddpm_step": (R.ddpm_step, (0.5, 0.7)),
    "ddim_step": (R.ddim_step, (0.5, 0.7)),
    "euler_step": (R.euler_step, (2.0, 1.0)),
    "euler_ancestral_step": (R.euler_ancestral_step, (2.0, 1.0)),
    "flow_euler_step": (R.flow_euler_step, (0.7, 0.5)),
    "flow_dpmpp_multistep_step": (
        functools.partial(R.dpmpp_multistep_step, space="flow"),
        (0.7, 0.5),
    ),
    "dpmpp_multistep_step": (R.dpmpp_multistep_step, (0.5, 0.7)),
}


@pytest.mark.parametrize("name", sorted(X0_STEPS))
def test_steps_take_the_x0_options(gen, name):
    """Every step reads its x0 options (X0Options) by keyword: clipping shows in the x0 it
    returns, and a name that is not an option is a TypeError."""
    step, levels = X0_STEPS[name]
    x, m = 3 * randn(gen, *SHAPE), 3 * randn(gen, *SHAPE)
    _, x0 = step(x, m, *levels, prediction_type="sample", clip_range=0.5)
    assert torch.equal(x0, m.clamp(-0.5, 0.5))
    _, x0 = step(x, m, *levels, prediction_type="sample")
    assert torch.equal(x0, m)
    with pytest.raises(TypeError, match="clip_sample"):
        step(x, m, *levels, clip_sample=0.5)


def test_x0_options_defaults():
    assert R.X0Options.of({}) == R.X0Options("epsilon", None, None)
    assert R.X0Options.of({"clip_range": 1.0}, "flow_prediction").processes
    assert not R.X0Options.of({"prediction_type": "sample"}, "flow_prediction").processes
    assert R.X0Options.of({"prediction_type": "sample"}, "flow_prediction").prediction_type == (
        "sample"
    )


def test_cfg_combine(gen):
    uncond, cond = randn(gen, *SHAPE), randn(gen, *SHAPE)
    w = 7.5
    assert_close(R.cfg_combine(uncond, cond, w), uncond + w * (cond - uncond), **TOL64)
    assert_close(R.cfg_combine(uncond, cond, 1.0), cond, **TOL64)
    assert_close(R.cfg_combine(uncond, cond, 0.0), uncond, **TOL64)
    per_sample = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float32)
    got = R.cfg_combine(uncond, cond, per_sample)
    for b in range(SHAPE[0]):
        assert_close(got[b], R.cfg_combine(uncond, cond, float(per_sample[b]))[b], **TOL64)
    # rescale = 1: the guided output gets the per-sample std of the conditional one
    full = R.cfg_combine(uncond, cond, w, rescale=1.0)
    assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), **TOL64)
    half = R.cfg_combine(uncond, cond, w, rescale=0.5)
    assert_close(half, (full + R.cfg_combine(uncond, cond, w)) / 2, **TOL64)


# -- dtypes, broadcasting, no host sync ---------------------------------------------------


def labeled(name: str):
    """assert_close message prefix naming the step function that failed."""
    return lambda message: f"{name}: {message}"


def sigma_of(ab):
    """sigma = sqrt((1 - ab) / ab) in float64, whatever ab's dtype."""
    ab = ab.double() if isinstance(ab, torch.Tensor) else ab
    return ((1 - ab) / ab) ** 0.5


def all_steps(x, m, z, ab_t, ab_next):
    """Every step function on the same inputs, as name -> (x_next, x0)."""
    sigma, sigma_next = sigma_of(ab_t), sigma_of(ab_next)
    x0_prev = 0.5 * m
    ab_old = ab_t * 0.5
    v = torch.cat([m, 0.25 * torch.ones_like(m)], dim=1)  # 0.25: exact in every dtype
    return {
        "ddpm": R.ddpm_step(x, m, ab_t, ab_next, noise=z, clip_range=2.0),
        "ddpm_learned": R.ddpm_step(x, v, ab_t, ab_next, variance_type="learned_range", noise=z),
        "ddim": R.ddim_step(x, m, ab_t, ab_next, eta=0.5, noise=z, thresholding=(0.9, 2.0)),
        "euler": R.euler_step(x, m, sigma, sigma_next, prediction_type="v_prediction"),
        "euler_a": R.euler_ancestral_step(x, m, sigma, sigma_next, noise=z),
        "dpmpp": R.dpmpp_multistep_step(x, m, ab_t, ab_next, history=[(x0_prev, ab_old)]),
    }


# Half types: the reference computes in float32 and rounds once at the end, so the result
# is within one rounding of the float64 answer: rtol = the dtype's epsilon (2 half-ulps);
# atol covers values near 0 where float32's own error (~1e-7 * |terms| <= 1e-5) dominates.
HALF_TOL = {
    torch.float16: {"rtol": 1e-3, "atol": 1e-4},
    torch.bfloat16: {"rtol": 8e-3, "atol": 1e-3},
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_upcast_and_round_once(gen, dtype):
    x, m, z = (randn(gen, *SHAPE, dtype=dtype) for _ in range(3))
    ab_t, ab_next = schedule_pair(gen)
    low = all_steps(x, m, z, ab_t.to(dtype), ab_next.to(dtype))
    exact = all_steps(x.double(), m.double(), z.double(), ab_t.to(dtype).double(),
                      ab_next.to(dtype).double())  # fmt: skip
    tol = HALF_TOL.get(dtype, {"rtol": 1e-5, "atol": 1e-5})  # float32: a few float32 ulps
    for name, (x_next, x0) in low.items():
        assert x_next.dtype == dtype and x0.dtype == dtype, name
        assert_close(x_next.double(), exact[name][0], **tol, msg=labeled(name))
        assert_close(x0.double(), exact[name][1], **tol, msg=labeled(name))


def test_float64_is_computed_in_float64(gen):
    # 1 - ab_t for ab_t = 1 - 1e-12 is representable in float64 only; a float32 path would
    # divide by zero or lose all digits.
    x, eps = randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab = 1 - 1e-12
    x_t = ab**0.5 * x + (1 - ab) ** 0.5 * eps
    assert_close(R.predict_eps(x_t, x, ab, "sample"), eps, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_schedule_values_any_float_dtype_or_python_float(gen, sdtype):
    # 0.5 and 0.75 are exact in every float dtype, so all spellings give identical results.
    x, m, z = randn(gen, *SHAPE), randn(gen, *SHAPE), randn(gen, *SHAPE)
    as_float = all_steps(x, m, z, 0.5, 0.75)
    as_tensor = all_steps(
        x, m, z, torch.tensor(0.5, dtype=sdtype), torch.tensor(0.75, dtype=sdtype)
    )
    as_batch = all_steps(x, m, z, torch.full((3,), 0.5, dtype=sdtype), torch.full((3,), 0.75))
    for name in as_float:
        for got in (as_tensor[name], as_batch[name]):
            assert_close(got[0], as_float[name][0], **TOL64, msg=labeled(name))
            assert_close(got[1], as_float[name][1], **TOL64, msg=labeled(name))


def test_per_sample_schedule_equals_one_call_per_sample(gen):
    x, m, z = randn(gen, *SHAPE), randn(gen, *SHAPE), randn(gen, *SHAPE)
    ab_t, ab_next = schedule_pair(gen)
    batched = all_steps(x, m, z, ab_t, ab_next)
    for b in range(SHAPE[0]):
        one = all_steps(x[b : b + 1], m[b : b + 1], z[b : b + 1], float(ab_t[b]), float(ab_next[b]))
        for name in batched:
            assert_close(
                batched[name][0][b : b + 1],
                one[name][0],
                **TOL64,
                msg=labeled(name),
            )
            assert_close(
                batched[name][1][b : b + 1],
                one[name][1],
                **TOL64,
                msg=labeled(name),
            )


def test_no_host_sync_runs_on_meta_tensors():
    # Meta tensors have no values: any .item(), bool(tensor) or data-dependent python branch
    # raises, so this proves the steps can be queued on a GPU without synchronising.
    x = torch.empty(SHAPE, device="meta")
    ab_t = torch.empty(SHAPE[0], device="meta")
    ab_next = torch.empty((), device="meta")
    outs = all_steps(x, x, x, ab_t, ab_next)
    outs["grad"] = R.ddpm_step(x, x, ab_t, ab_next, noise=x, grad=x, add_noise=ab_t > 0)
    outs["cfg"] = (R.cfg_combine(x, x, ab_t, rescale=ab_next), x)
    for name, (x_next, x0) in outs.items():
        assert x_next.shape == SHAPE and x0.shape == SHAPE, name


# =======================================================================================
# 2. Against diffusers
# =======================================================================================

# DDPM / DDIM: both sides in float64 (the schedulers' alpha tables are replaced by float64
# copies): the same formulas in a different order on values up to ~1e3 (x0 = x / sqrt(4e-5)
# at the noisiest step), so a few ulps of 1e3 ~ 1e-13; observed < 1e-14 relative.
TOL_DIFFUSERS64 = {"rtol": 1e-12, "atol": 1e-12}
# Euler / DPM-Solver schedulers cast the sample to float32 whatever its dtype, so both sides
# run in float32 on the scheduler's float32 sigmas. |x0| reaches ~15 (x / alpha at
# sigma_max ~ 14.6) and each step has ~10 roundings of 1.2e-7 relative, carried over <= 16
# steps: up to ~1e-4 absolute in the worst case. Observed: Euler bit-identical, DPM-Solver
# ~1e-5 (it derives alpha from sigma, fastdiff from alpha bar).
TOL_DIFFUSERS32 = {"rtol": 2e-5, "atol": 2e-4}


def seed_of(gen: torch.Generator) -> int:
    return int(torch.randint(2**62, (), generator=gen))


def noise_like_diffusers(shape, seed, dtype):
    """The noise a diffusers scheduler draws with torch.Generator().manual_seed(seed) on CPU."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ddpm_config(**overrides):
    config = {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "clip_sample": False,
        "thresholding": False,
    }
    return {**config, **overrides}


def float64_tables(scheduler):
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(F64)
    return scheduler.alphas_cumprod


THRESH = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0}
CLIP = {"clip_sample": True, "clip_sample_range": 1.5}


@pytest.mark.parametrize(
    "ptype,variance_type,process",
    [
        ("epsilon", "fixed_small", {}),
        ("epsilon", "fixed_small_log", CLIP),
        ("sample", "fixed_large", THRESH),
        ("v_prediction", "fixed_small", THRESH),
        ("v_prediction", "learned_range", {}),
        ("epsilon", "learned_range", CLIP),
        ("sample", "fixed_small_log", {}),
    ],
)
def test_ddpm_matches_diffusers(gen, ptype, variance_type, process):
    diffusers = pytest.importorskip("diffusers")
    config = ddpm_config(prediction_type=ptype, variance_type=variance_type, **process)
    scheduler = diffusers.DDPMScheduler(**config)
    scheduler.set_timesteps(7)
    ab = float64_tables(scheduler)
    learned = variance_type == "learned_range"
    timesteps = scheduler.timesteps.tolist()
    x = randn(gen, *SHAPE)
    ours = x.clone()
    for i, t in enumerate(timesteps):
        m = 2 * randn(gen, *SHAPE)  # "sample" outputs partly outside [-1, 1]: processing acts
        if learned:
            m = torch.cat([m, uniform(gen, -1, 1, *SHAPE)], dim=1)
        seed = seed_of(gen)
        out = scheduler.step(m, t, x, generator=torch.Generator().manual_seed(seed))
        ab_next = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        ours, x0 = R.ddpm_step(
            ours, m, ab[t], ab_next,
            prediction_type=ptype, variance_type=variance_type,
            clip_range=process.get("clip_sample_range"),
            thresholding=(0.9, 2.0) if process.get("thresholding") else None,
            noise=noise_like_diffusers(SHAPE, seed, F64),
        )  # fmt: skip
        assert_close(x0, out.pred_original_sample, **TOL_DIFFUSERS64)
        assert_close(ours, out.prev_sample, **TOL_DIFFUSERS64)
        x = out.prev_sample


def test_ddpm_learned_is_a_log_variance_unlike_diffusers(gen):
    # diffusers' DDPMScheduler "learned" reads the extra channels as the variance itself
    # (std = sqrt(p)); improved-diffusion (and fastdiff) read a log-variance (std = exp(v/2)).
    # The two agree when fastdiff gets v = log(p).
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(**ddpm_config(variance_type="learned"))
    scheduler.set_timesteps(5)
    ab = float64_tables(scheduler)
    t, t_next = scheduler.timesteps[:2].tolist()
    x, m, p = randn(gen, *SHAPE), randn(gen, *SHAPE), uniform(gen, 0.01, 0.5, *SHAPE)
    seed = seed_of(gen)
    out = scheduler.step(torch.cat([m, p], 1), t, x, generator=torch.Generator().manual_seed(seed))
    z = noise_like_diffusers(SHAPE, seed, F64)
    ours, _ = R.ddpm_step(x, torch.cat([m, p.log()], 1), ab[t], ab[t_next], variance_type="learned",
                          noise=z)  # fmt: skip
    assert_close(ours, out.prev_sample, **TOL_DIFFUSERS64)


def test_ddpm_diffusers_adds_noise_while_t_above_zero(gen):
    # diffusers' DDPMScheduler adds noise whenever the train timestep t > 0, so with
    # steps_offset=1 the step from t=1 to clean adds noise (std sqrt(beta') = sqrt(1 - ab_1)
    # with fixed_large). fastdiff adds none on the step to clean unless add_noise=True.
    diffusers = pytest.importorskip("diffusers")
    config = ddpm_config(variance_type="fixed_large", steps_offset=1)
    scheduler = diffusers.DDPMScheduler(**config)
    scheduler.set_timesteps(4)
    ab = float64_tables(scheduler)
    t = int(scheduler.timesteps[-1])
    assert t == 1
    x, m = randn(gen, *SHAPE), randn(gen, *SHAPE)
    seed = seed_of(gen)
    out = scheduler.step(m, t, x, generator=torch.Generator().manual_seed(seed))
    z = noise_like_diffusers(SHAPE, seed, F64)
    forced, x0 = R.ddpm_step(x, m, ab[t], 1.0, variance_type="fixed_large", noise=z, add_noise=True)
    assert_close(forced, out.prev_sample, **TOL_DIFFUSERS64)
    default, _ = R.ddpm_step(x, m, ab[t], 1.0, variance_type="fixed_large", noise=z)
    assert_close(default, x0, **TOL64)


@pytest.mark.parametrize(
    "ptype,eta,use_clipped,process,set_alpha_to_one",
    [
        ("epsilon", 0.0, False, {}, True),
        ("epsilon", 1.0, False, CLIP, False),
        ("epsilon", 1.0, True, CLIP, True),
        ("v_prediction", 0.0, True, THRESH, False),
        ("sample", 1.0, False, THRESH, True),
        ("v_prediction", 0.5, True, {}, True),
    ],
)
def test_ddim_matches_diffusers(gen, ptype, eta, use_clipped, process, set_alpha_to_one):
    diffusers = pytest.importorskip("diffusers")
    config = ddpm_config(
        prediction_type=ptype, set_alpha_to_one=set_alpha_to_one, steps_offset=1, **process
    )
    scheduler = diffusers.DDIMScheduler(**config)
    scheduler.set_timesteps(6)
    ab = float64_tables(scheduler)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=F64) if set_alpha_to_one else ab[0]
    timesteps = scheduler.timesteps.tolist()
    x = randn(gen, *SHAPE)
    ours = x.clone()
    for i, t in enumerate(timesteps):
        m = 2 * randn(gen, *SHAPE)
        z = randn(gen, *SHAPE)
        out = scheduler.step(
            m, t, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=z
        )
        # the last step goes to "alpha bar 0": 1.0, or ab[0] when set_alpha_to_one=False
        if i + 1 < len(timesteps):
            ab_next = ab[timesteps[i + 1]]
        else:
            ab_next = 1.0 if set_alpha_to_one else ab[0]
        ours, x0 = R.ddim_step(
            ours, m, ab[t], ab_next,
            eta=eta, prediction_type=ptype, use_clipped_model_output=use_clipped,
            clip_range=process.get("clip_sample_range"),
            thresholding=(0.9, 2.0) if process.get("thresholding") else None,
            noise=z,
        )  # fmt: skip
        assert_close(x0, out.pred_original_sample, **TOL_DIFFUSERS64)
        assert_close(ours, out.prev_sample, **TOL_DIFFUSERS64)
        x = out.prev_sample


def test_ddim_diffusers_previous_timestep_ignores_spacing(gen):
    # diffusers' DDIMScheduler steps from t to t - T // n whatever the timestep_spacing, so
    # with "linspace" (999, 888, 777, ...) it does not land on the next visited timestep;
    # the same step in fastdiff needs ab_next = ab[t - T // n].
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(**ddpm_config(timestep_spacing="linspace"))
    scheduler.set_timesteps(10)
    ab = float64_tables(scheduler)
    t, t_visited_next = scheduler.timesteps[:2].tolist()
    assert (t, t_visited_next) == (999, 888)
    x, m = randn(gen, *SHAPE), randn(gen, *SHAPE)
    out = scheduler.step(m, t, x)
    assert_close(R.ddim_step(x, m, ab[t], ab[t - 100])[0], out.prev_sample, **TOL_DIFFUSERS64)
    assert not torch.allclose(R.ddim_step(x, m, ab[t], ab[t_visited_next])[0], out.prev_sample)


def euler_scheduler(cls_name, ptype, steps=10):
    diffusers = pytest.importorskip("diffusers")
    scheduler = getattr(diffusers, cls_name)(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=ptype,
    )
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("ptype", R.PREDICTION_TYPES)
def test_euler_matches_diffusers(gen, ptype):
    scheduler = euler_scheduler("EulerDiscreteScheduler", ptype)
    sigmas = scheduler.sigmas  # float32, last one 0
    x = randn(gen, *SHAPE, dtype=torch.float32) * sigmas[0]
    ours = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        m = randn(gen, *SHAPE, dtype=torch.float32)
        scheduler.scale_model_input(x, t)  # marks the input as scaled (the model is fake)
        out = scheduler.step(m, t, x)
        ours, x0 = R.euler_step(ours, m, sigmas[i], sigmas[i + 1], prediction_type=ptype)
        assert_close(x0, out.pred_original_sample, **TOL_DIFFUSERS32)
        assert_close(ours, out.prev_sample, **TOL_DIFFUSERS32)
        x = out.prev_sample


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])  # diffusers: no "sample"
def test_euler_ancestral_matches_diffusers(gen, ptype):
    scheduler = euler_scheduler("EulerAncestralDiscreteScheduler", ptype)
    sigmas = scheduler.sigmas
    x = randn(gen, *SHAPE, dtype=torch.float32) * sigmas[0]
    ours = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        m = randn(gen, *SHAPE, dtype=torch.float32)
        seed = seed_of(gen)
        scheduler.scale_model_input(x, t)
        out = scheduler.step(m, t, x, generator=torch.Generator().manual_seed(seed))
        z = noise_like_diffusers(SHAPE, seed, torch.float32)
        ours, x0 = R.euler_ancestral_step(
            ours, m, sigmas[i], sigmas[i + 1], prediction_type=ptype, noise=z
        )
        assert_close(x0, out.pred_original_sample, **TOL_DIFFUSERS32)
        assert_close(ours, out.prev_sample, **TOL_DIFFUSERS32)
        x = out.prev_sample


@pytest.mark.parametrize(
    "ptype,steps,thresholding",
    [("epsilon", 8, False), ("v_prediction", 16, False), ("sample", 9, True)],
)
def test_dpmpp_2m_matches_diffusers(gen, ptype, steps, thresholding):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=ptype,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        thresholding=thresholding,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=2.0,
    )
    scheduler.set_timesteps(steps)
    # alpha bar of each visited step from the scheduler's own (float32) sigmas; the last
    # sigma is 0, i.e. ab = 1 (clean), where diffusers takes a first-order step.
    ab = 1 / (1 + scheduler.sigmas.to(F64) ** 2)
    x = randn(gen, *SHAPE, dtype=torch.float32)
    ours, x0_prev, ab_prev = x.clone(), None, None
    for i, t in enumerate(scheduler.timesteps):
        m = 2 * randn(gen, *SHAPE, dtype=torch.float32)
        out = scheduler.step(m, t, x)
        ours, x0 = R.dpmpp_multistep_step(
            ours, m, ab[i], ab[i + 1],
            history=[] if x0_prev is None else [(x0_prev, ab_prev)], prediction_type=ptype,
            thresholding=(0.9, 2.0) if thresholding else None,
        )  # fmt: skip
        assert_close(x0, scheduler.model_outputs[-1], **TOL_DIFFUSERS32)
        assert_close(ours, out.prev_sample, **TOL_DIFFUSERS32)
        x, x0_prev, ab_prev = out.prev_sample, x0, ab[i]


# =======================================================================================
# 3. Guidance rescale against diffusers
# =======================================================================================


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cfg_rescale_matches_diffusers(gen, dtype):
    pytest.importorskip("diffusers")
    # The same function as diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion's,
    # from a module that does not import transformers (5 s faster).
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    uncond, cond = randn(gen, *SHAPE, dtype=dtype), 2 * randn(gen, *SHAPE, dtype=dtype)
    w, phi = 7.5, 0.7
    expected = rescale_noise_cfg(uncond + w * (cond - uncond), cond, guidance_rescale=phi)
    # float32: both compute in float32 from the same inputs; the std reductions may sum in a
    # different order: a few ulps of values ~20.
    tol = TOL64 if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    assert_close(R.cfg_combine(uncond, cond, w, rescale=phi), expected, **tol)


# =======================================================================================
# 4. Errors
# =======================================================================================


def test_errors_the_math_needs():
    """The reference checks only what its math needs; argument errors are checked at the
    public boundary, the same on both backends (tests/test_checks.py)."""
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"even number of channels"):
        R.split_learned_variance(x, "learned")
    with pytest.raises(ValueError, match=r"space must be one of \('vp', 'flow', 've'\)"):
        R.dpmpp_multistep_step(x, x, 0.5, 0.6, space="edm")
    with pytest.raises(ValueError, match=r'space "ve" takes the denoised x0'):
        R.dpmpp_multistep_step(x, x, 0.5, 0.6, space="ve", prediction_type="epsilon")
    with pytest.raises(
        ValueError, match=r"ab_next must be .*shape \[\] or \[B\] with B=2, got shape \(3,\)"
    ):
        R.ddim_step(x, x, 0.5, torch.rand(3))
    with pytest.raises(ValueError, match=r"needs the model's variance values v"):
        R.ddpm_variance(0.5, 0.6, "learned")


def test_ddpm_posterior_is_accurate_in_float32_where_alpha_is_tiny():
    """At the end of a cosine schedule alpha' = ab_t / ab_next is 1e-3: the posterior's x_t
    coefficient sqrt(alpha') (1 - ab_next) / (1 - ab_t) must keep float32's relative accuracy
    (a few ulps); sqrt(1 - beta') loses three digits there (relative error ~3e-5)."""
    from fastdiff.schedules import NoiseSchedule

    ab = NoiseSchedule.create("squaredcos_cap_v2", 1000).alphas_cumprod
    ab_t, ab_next = ab[999:], ab[998:999]
    assert float(ab_t / ab_next) < 1e-2
    _, coef32 = R.posterior_mean_coefficients(ab_t.float(), ab_next.float())
    _, coef64 = R.posterior_mean_coefficients(ab_t, ab_next)
    assert float(((coef32.double() - coef64) / coef64).abs()) < 1e-6
