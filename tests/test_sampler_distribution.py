"""The samplers of issue 12 on a Gaussian mixture, against their stock twins: each fused
sampler, driven by the mixture's exact denoiser, must give samples distributed as the stock
sampler's (diffusers' scheduler, or the k-diffusion package) at the same step count, and
reproduce the mixture itself where the stock sampler does.

The statistics (weights, means, covariances of test_distribution.py's mixture) of n fused
samples and of n stock samples, drawn from independent seeds, must agree within Z = 5
standard errors of their difference (the odds of test_distribution.py), each set's errors
estimated from its own samples: a consistency-model sampler (LCM, TCD) with the exact
posterior mean as its "consistency function" shrinks and skews the components (the mean of
x0 given x_t is not a sample of it), so the mixture's own errors would not apply. Those,
and the first-order stochastic samplers (Euler ancestral: variances 10-15% low at 30-50
steps, test_distribution.py; Euler with churn: means 2% inward at 30 steps), are held to
the two-sample check; the others must also be within Z standard errors of the mixture
(``exact=True``).

A fused sampler that computes another step than its stock twin fails by far: this file's
own check is tested on a stock sampler at another step count
(``test_check_sees_a_changed_sampler``).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_distribution import GMM, Z, _mismatches

diffusers = pytest.importorskip("diffusers")

from diffusers_cases import BACKENDS, DEVICE  # noqa: E402

from fastdiff import diffusers as fused  # noqa: E402

F64 = torch.float64
N = 2000
pytestmark = pytest.mark.usefixtures("one_thread")


def _standard_errors(samples: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Standard errors of ``GMM.fit(samples)``'s statistics estimated from the samples
    themselves (not from the mixture: a biased sampler's components need not be Gaussian):
    weights ``sqrt(w (1 - w) / n)``, means ``std / sqrt(n_k)``, covariances the standard
    deviation of the centred products ``(x_i - m_i)(x_j - m_j)`` over ``sqrt(n_k)``."""
    x = samples.to(F64)
    labels = GMM.responsibilities(x).argmax(dim=1)
    k, d = GMM.num_components, GMM.dim
    w = torch.bincount(labels, minlength=k).to(F64) / x.shape[0]
    mu_se, cov_se = (
        torch.full((k, d), math.inf, dtype=F64),
        torch.full((k, d, d), math.inf, dtype=F64),
    )
    for j in range(k):
        xj = x[labels == j]
        if xj.shape[0] > 2:
            c = xj - xj.mean(dim=0)
            mu_se[j] = c.std(dim=0) / math.sqrt(xj.shape[0])
            cov_se[j] = (c[:, :, None] * c[:, None, :]).std(dim=0) / math.sqrt(xj.shape[0])
    return (w * (1 - w) / x.shape[0]).sqrt(), mu_se, cov_se


def _different(ours: torch.Tensor, theirs: torch.Tensor) -> list[str]:
    """Statistics of the two sample sets further apart than Z standard errors of their
    difference (``sqrt(se_ours^2 + se_theirs^2)``, each estimated from its samples)."""
    a, b = GMM.fit(ours), GMM.fit(theirs)
    bad = [f"{a.num_nonfinite} non-finite samples"] if a.num_nonfinite else []
    stats = zip(
        ("weight", "mean", "covariance"),
        (a.weights, a.means, a.covariances),
        (b.weights, b.means, b.covariances),
        _standard_errors(ours),
        _standard_errors(theirs),
    )
    for name, x, y, se_x, se_y in stats:
        z = ((x - y).abs() / (se_x**2 + se_y**2).sqrt()).nan_to_num(nan=math.inf)
        for idx in (z > Z).nonzero().tolist():
            i = tuple(idx)
            bad.append(f"{name}{list(i)}: {x[i]:.4f} vs stock {y[i]:.4f} ({z[i]:.1f} SE)")
    return bad


def _ab_of(scheduler, t) -> torch.Tensor:
    """alpha_bar of the model's input at this call: from the scheduler's sigma (sigma-space
    schedulers: the input is x / sqrt(1 + sigma^2)) or its alphas_cumprod at t (VP ones)."""
    if getattr(scheduler, "init_noise_sigma", 1.0) != 1.0:  # sigma space
        sigma = scheduler.sigmas[scheduler.step_index].to("cpu", F64)
        return 1.0 / (1.0 + sigma**2)
    return scheduler.alphas_cumprod.to(F64)[int(t)]


def _diffusers_loop(scheduler, steps: int, seed: int, **step_kwargs) -> torch.Tensor:
    """A diffusers pipeline's loop with the mixture's exact epsilon model, N 2-d samples."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    scheduler.set_timesteps(steps, device=DEVICE)
    x = torch.randn(N, 2, generator=generator, device=DEVICE) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        ab = _ab_of(scheduler, t)
        x0 = GMM.posterior_mean(x_in.to("cpu", F64), ab)
        eps = (x_in.to("cpu", F64) - ab.sqrt() * x0) / (1 - ab).sqrt()
        m = eps.float().to(DEVICE)
        x = scheduler.step(m, t, x, generator=generator, **step_kwargs).prev_sample
    return x.cpu()


KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}
# name -> (diffusers class name, config, steps, step arguments, exact)
DIFFUSERS_CASES = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, 30, {}, False),
    "lcm": ("LCMScheduler", {}, 4, {}, False),
    "tcd": ("TCDScheduler", {}, 4, {}, False),
    "tcd-gamma0.7": ("TCDScheduler", {}, 8, {"eta": 0.7}, False),
    "euler_churn": ("EulerDiscreteScheduler", KARRAS, 30, {"s_churn": 10.0}, False),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {**SDE, **KARRAS}, 25, {}, True),
    # diffusers' own 3M misses the mixture here by 6-8 SE (its SDE form's third-order term is
    # ~-1 where the ODE's is ~0: tests/test_dpm_ext.py); held to the two-sample check
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {**SDE, "solver_order": 3}, 25, {}, False),
    "dpmpp_2m_heun": ("DPMSolverMultistepScheduler", {"solver_type": "heun"}, 15, {}, True),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"solver_order": 3, **KARRAS}, 15, {}, False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(DIFFUSERS_CASES))
def test_dropin_samples_as_diffusers_does(name, backend):
    cls_name, config, steps, step_kwargs, exact = DIFFUSERS_CASES[name]
    stock = getattr(diffusers, cls_name)(**config)
    ours = getattr(fused, f"Fused{cls_name}")(**config, backend=backend)
    theirs_x = _diffusers_loop(stock, steps, 1, **step_kwargs)
    ours_x = _diffusers_loop(ours, steps, 2, **step_kwargs)
    assert _different(ours_x, theirs_x) == []
    if exact:
        assert _mismatches(GMM, theirs_x) == []  # the case is within the stock's own accuracy
        assert _mismatches(GMM, ours_x) == []


def test_check_sees_a_changed_sampler():
    """The two-sample check fails a sampler that is not the stock one: diffusers' LCM at 2
    steps against itself at 4 (the variance shrinks with the step count)."""
    a = _diffusers_loop(diffusers.LCMScheduler(), 2, seed=1)
    b = _diffusers_loop(diffusers.LCMScheduler(), 4, seed=2)
    assert len(_different(a, b)) >= 3


# -- fastdiff.k_diffusion against the k-diffusion package -----------------------------------


def _ve_model(x, sigma):
    """k-diffusion's denoiser D(x, sigma) = E[x0 | x0 + sigma eps = x] of the mixture."""
    ab = 1.0 / (1.0 + sigma.to(F64) ** 2)
    return GMM.posterior_mean(x.to(F64) * ab.sqrt()[:, None], ab).to(x.dtype)


# name -> (kwargs, steps, exact)
K_CASES = {
    "sample_euler_ancestral": ({}, 30, False),  # variances low at 30 steps (both)
    "sample_heun": ({}, 15, True),
    "sample_dpmpp_2m": ({}, 15, True),
    "sample_dpmpp_2m_sde": ({}, 25, True),
    "sample_euler": ({"s_churn": 10.0}, 30, False),  # means 2% inward at 30 steps (both)
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(K_CASES))
def test_k_diffusion_samples_as_k_diffusion_does(name, backend):
    from kdiffusion_loader import load_sampling

    from fastdiff import k_diffusion as K

    ks = load_sampling()
    kwargs, steps, exact = K_CASES[name]
    sigmas = ks.get_sigmas_karras(steps, 0.03, 80.0, device=DEVICE)
    results = []
    for seed, fn, extra in (
        (1, getattr(ks, name), {}),
        (2, getattr(K, name), {"backend": backend}),
    ):
        torch.manual_seed(seed)  # k-diffusion's noise: the global generator
        x = torch.randn(N, 2, device=DEVICE) * sigmas[0]
        results.append(fn(_ve_model, x, sigmas, disable=True, **kwargs, **extra).cpu())
    theirs_x, ours_x = results
    assert _different(ours_x, theirs_x) == []
    if exact:
        assert _mismatches(GMM, theirs_x) == []
        assert _mismatches(GMM, ours_x) == []
