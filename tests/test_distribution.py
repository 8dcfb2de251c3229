"""Samplers reproduce a Gaussian mixture when driven by its exact denoiser.

The exact denoiser (fastdiff.gmm) is what a perfectly trained network computes, so a correct
sampler must return samples of the mixture: its weights, means and covariances, up to
sampling error and the sampler's own discretization error. The first tests check the
denoiser itself against Tweedie's formula, E[x0 | x_t] = (x_t + (1 - ab) grad log p(x_t)) /
sqrt(ab), with the score from autograd through torch.distributions (an independent route).

Tolerances. Every statistic must lie within Z = 5 standard errors of the truth; the standard
errors are those of n exact samples (GaussianMixture.fit_standard_errors: binomial weights,
sqrt(S_ii / n_k) means, sqrt((S_ii S_jj + S_ij^2) / (n_k - 1)) covariances). The components
are 12 standard deviations apart, so the assignment of a sample to its component is exact
(a misassignment needs a 6-sigma excursion: probability < 1e-9 per sample) and the fit is an
unbiased estimate. For an exact sampler a 5-SE excursion has probability 5.7e-7 per
statistic, 18 statistics per check (3 weights, 6 mean and 9 covariance entries), so below
1.1e-5 per check and 1e-4 for this file.

Discretization error is not sampling error. Measured once with n = 100000 on this mixture
(seed 0, float64), the largest bias of each checked sampler, in standard errors of n = 1000
samples (the bias in SEs grows like sqrt(n)):

    sampler (steps, spacing)          weights  means  covariances
    DDPM (1000)                          0.2     0.3     0.4
    DDPM (respaced "100")                0.2     0.5     1.5   (variances 5% low)
    DDIM (50, eta 0, trailing)           0.1     1.6     0.8   (means pulled 1% inward)
    Euler ancestral (50, trailing)       0.4     1.0     2.7   (variances 10-15% low)
    DPM-Solver++(2M) (20, trailing)      0.2     0.4     0.6
    DPM-Solver++(2M) (20, leading)       0.4     0.5     5.7   (second-order step onto t=0)

So each check uses the n at which that sampler's bias stays below ~1.6 SE (DDPM 1000: 0.8 SE
at n = 10000; DPM++ 1.3 SE at 4000; DDIM 1.6 SE and DDPM "100" 1.5 SE at 1000; Euler ancestral
1.5 SE at 300): with 5-SE bounds the margin is >= 3.4 SE, a false-failure probability below
3.4e-4 per biased statistic (a few such statistics per check, ~1e-3 per check). A sampler
with a real error fails by far: the wrong-schedule test below misses by > 18 SE on five
statistics at n = 1000.
"""

import functools
import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from fastdiff.gmm import GaussianMixture
from fastdiff.samplers import SAMPLERS
from fastdiff.sampling import guidance_pair
from fastdiff.sampling import sample as _sample
from fastdiff.schedules import NoiseSchedule

F64 = torch.float64
Z = 5.0  # tolerance in standard errors (see the module docstring)
# CPU tests (the reference backend), also on a machine with a GPU, where sample() would
# otherwise default to CUDA.
sample = functools.partial(_sample, device="cpu")
SCHEDULE = NoiseSchedule.create("linear", 1000)


def _rotated(angle: float, std_major: float, std_minor: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=F64)
    return rot @ torch.diag(torch.tensor([std_major**2, std_minor**2], dtype=F64)) @ rot.T


def _test_mixture() -> GaussianMixture:
    """Three anisotropic, well-separated components on a triangle of radius 6 (side 10.4)."""
    angles = torch.tensor([math.pi, math.pi / 3, -math.pi / 3], dtype=F64)
    means = 6.0 * torch.stack([angles.cos(), angles.sin()], 1)
    covs = torch.stack(
        [_rotated(0.3, 0.9, 0.7), _rotated(-0.8, 0.81, 0.77), _rotated(1.2, 0.9, 0.63)]
    )
    return GaussianMixture([0.5, 0.3, 0.2], means, covs)


GMM = _test_mixture()


# The loops here run many small ops: one intra-op thread (conftest.py) for every test.
pytestmark = pytest.mark.usefixtures("one_thread")


def _mismatches(gmm: GaussianMixture, samples: torch.Tensor) -> list[str]:
    """Statistics of `samples` further than Z standard errors from the mixture's."""
    n = samples.shape[0]
    fit = gmm.fit(samples)
    w_se, mu_se, cov_se = gmm.fit_standard_errors(n)
    bad = []
    if fit.num_nonfinite:
        bad.append(f"{fit.num_nonfinite} non-finite samples")
    checks = [
        ("weight", fit.weights, gmm.weights, w_se),
        ("mean", fit.means, gmm.means, mu_se),
        ("covariance", fit.covariances, gmm.covariances, cov_se),
    ]
    for name, got, want, se in checks:
        diff = (got - want).abs()
        # A one-component fit has weight 1 exactly (se 0); NaN (empty component) fails.
        z = torch.where(se > 0, diff / se.clamp_min(1e-300), torch.where(diff == 0, 0.0, torch.inf))
        z = torch.where(torch.isnan(z), torch.inf, z)
        for idx in (z > Z).nonzero().tolist():
            i = tuple(idx)
            bad.append(f"{name}{list(i)}: {got[i]:.4f} vs {want[i]:.4f} ({z[i]:.1f} SE)")
    return bad


def _log_density(gmm: GaussianMixture, ab: float, component: int | None = None):
    """torch.distributions log p(x_t) of the noised mixture (independent of fastdiff.gmm)."""
    eye = torch.eye(gmm.dim, dtype=F64)
    means = math.sqrt(ab) * gmm.means
    covs = ab * gmm.covariances + (1 - ab) * eye
    if component is not None:
        return MultivariateNormal(means[component], covs[component]).log_prob
    return MixtureSameFamily(
        Categorical(probs=gmm.weights), MultivariateNormal(means, covs)
    ).log_prob


def _tweedie_x0(gmm, x, ab, component=None):
    x = x.detach().to(F64).requires_grad_(True)
    (score,) = torch.autograd.grad(_log_density(gmm, ab, component)(x).sum(), x)
    return ((x + (1 - ab) * score) / math.sqrt(ab)).detach()


def _random_mixture(k: int, d: int, seed: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, d, d, generator=g, dtype=F64)
    covs = a @ a.transpose(1, 2) / d + 0.05 * torch.eye(d, dtype=F64)
    weights = torch.rand(k, generator=g, dtype=F64) + 0.2
    return GaussianMixture(
        weights / weights.sum(), 1.5 * torch.randn(k, d, generator=g, dtype=F64), covs
    )


@pytest.mark.parametrize("conditioning", ["timestep", "alpha_bar", "sigma", "log_snr"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_denoiser_matches_tweedie(prediction_type, conditioning):
    gmm = _random_mixture(4, 3, seed=7)
    model = gmm.denoiser(SCHEDULE, prediction_type, conditioning)
    t = torch.tensor([0, 37, 250, 611, 998])
    x = torch.randn(5, 3, dtype=F64) * 2
    out = model(x, SCHEDULE.conditioning(t, conditioning))
    assert out.dtype == F64 and out.shape == (5, 3)
    for b in range(5):
        ab = float(SCHEDULE.alpha_bar(int(t[b])))
        x0 = _tweedie_x0(gmm, x[b : b + 1], ab)[0]
        eps = (x[b] - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        want = {
            "epsilon": eps,
            "sample": x0,
            "v_prediction": math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0,
        }[prediction_type]
        # float64 throughout; the epsilon/v conversions divide by sqrt(1 - ab) >= 1e-2 at t=0.
        torch.testing.assert_close(out[b], want, rtol=1e-9, atol=1e-9)


def test_class_conditional_denoiser_is_one_component():
    gmm = _random_mixture(3, 2, seed=3)
    x = torch.randn(6, 2, dtype=F64)
    ab = 0.3
    for k in range(3):
        model = gmm.denoiser(SCHEDULE, "sample", "alpha_bar", component=k)
        got = model(x, torch.full((6,), ab, dtype=F64))
        torch.testing.assert_close(got, _tweedie_x0(gmm, x, ab, component=k), rtol=1e-9, atol=1e-9)


def test_denoiser_dtype_device_and_float32_conditioning():
    model = GMM.denoiser(SCHEDULE, "epsilon")
    x = torch.randn(7, 2, dtype=torch.float32)
    cond = torch.full((7,), 400.0)  # samplers hand float32 timesteps to the model
    out = model(x, cond)
    assert out.dtype == torch.float32 and out.device == x.device
    want = model(x.double(), torch.full((7,), 400, dtype=torch.int64))
    # Computed in float64 either way: the only difference is the final rounding to float32.
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    assert model(x.half(), cond).dtype == torch.float16
    assert model(x, torch.tensor(400.0)).shape == (7, 2)  # scalar conditioning broadcasts


def test_denoiser_at_zero_snr():
    zero_snr = NoiseSchedule.create("linear", 1000, rescale_betas_zero_snr=True)
    x = torch.randn(4, 2, dtype=F64)
    last = torch.full((4,), 999)
    x0 = GMM.denoiser(zero_snr, "sample")(x, zero_snr.conditioning(last))
    v = GMM.denoiser(zero_snr, "v_prediction", "log_snr")(x, zero_snr.conditioning(last, "log_snr"))
    # Pure noise says nothing: E[x0 | x_T] is the mixture mean and v = -x0 there.
    torch.testing.assert_close(x0, GMM.mean.expand(4, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(v, -GMM.mean.expand(4, 2), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="alpha_bar == 0"):
        GMM.denoiser(zero_snr, "epsilon")
    eps_model = GMM.denoiser(SCHEDULE, "epsilon", "alpha_bar")
    with pytest.raises(ValueError, match="alpha_bar == 0"):
        eps_model(x, torch.zeros(4, dtype=F64))


def test_denoiser_rejects_bad_arguments():
    with pytest.raises(ValueError, match="prediction_type"):
        GMM.denoiser(SCHEDULE, "score")
    with pytest.raises(ValueError, match="conditioning"):
        GMM.denoiser(SCHEDULE, conditioning="snr")
    with pytest.raises(ValueError, match="component"):
        GMM.denoiser(SCHEDULE, component=3)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        GMM.denoiser(object())
    model = GMM.denoiser(SCHEDULE)
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="cond"):
        model(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.zeros(3, 2), torch.full((3,), 1000))


def test_mixture_validation():
    eye = torch.eye(2, dtype=F64).expand(2, 2, 2)
    means = [[0.0, 0.0], [1.0, 1.0]]
    GaussianMixture([0.5, 0.5], means, eye)  # valid
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture([0.5, 0.6], means, eye)
    with pytest.raises(ValueError, match="> 0"):
        GaussianMixture([1.5, -0.5], means, eye)
    with pytest.raises(ValueError, match="means must have shape"):
        GaussianMixture([0.5, 0.5], [0.0, 1.0], eye)
    with pytest.raises(ValueError, match="covariances must have shape"):
        GaussianMixture([0.5, 0.5], means, torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture([0.5, 0.5], means, torch.tensor([[[1.0, 0.5], [0.0, 1.0]]] * 2))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture([0.5, 0.5], means, torch.tensor([[[1.0, 2.0], [2.0, 1.0]]] * 2))
    with pytest.raises(ValueError, match="finite"):
        GaussianMixture([0.5, 0.5], [[0.0, float("nan")], [1.0, 1.0]], eye)
    with pytest.raises(TypeError, match="weights"):
        GaussianMixture("0.5", means, eye)


def test_exact_samples_pass_and_fit_figure():
    # The check itself: exact samples pass, and the fit figure orders good and bad samples.
    n = 4000
    exact = GMM.sample(n, torch.Generator().manual_seed(0))
    assert _mismatches(GMM, exact) == []
    exact_w2 = GMM.fit(exact).sliced_w2
    collapsed_w2 = GMM.fit(GMM.mean.expand(n, 2).clone()).sliced_w2
    # Exact samples: 0.19-0.47 over seeds (mass fluctuating across the gaps between modes);
    # all at the mixture mean: the mixture's spread, 4.2.
    assert exact_w2 < 1.0 < 3.0 < collapsed_w2
    broken = exact.clone()
    broken[0, 0] = float("nan")
    fit = GMM.fit(broken)
    assert fit.num_nonfinite == 1 and fit.sliced_w2 == math.inf
    x, labels = GMM.sample(50, torch.Generator().manual_seed(1), return_labels=True)
    assert torch.equal(GMM.responsibilities(x).argmax(1), labels)


# (sampler, steps, options, n): n from the bias table in the module docstring.
CASES = [
    ("ddpm", 1000, {}, 10000),
    ("ddpm", "100", {}, 1000),
    ("ddim", 50, {"eta": 0.0, "timestep_spacing": "trailing"}, 1000),
    ("euler_ancestral", 50, {"timestep_spacing": "trailing"}, 300),
    ("dpmpp_2m", 20, {"timestep_spacing": "trailing"}, 4000),
]


@pytest.mark.parametrize("name,steps,options,n", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_sampler_reproduces_the_mixture(name, steps, options, n):
    sampler = SAMPLERS[name](SCHEDULE, steps, backend="reference", **options)
    x = sample(GMM.denoiser(SCHEDULE), sampler, shape=(n, 2), seed=1, progress=False)
    assert _mismatches(GMM, x) == []


def test_wrong_schedule_fails_the_check():
    # The denoiser knows the linear schedule; the sampler believes in Stable Diffusion's
    # scaled_linear one, so it calls the model with the wrong noise levels.
    wrong = NoiseSchedule.create("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    sampler = SAMPLERS["ddim"](wrong, 50, timestep_spacing="trailing", backend="reference")
    x = sample(GMM.denoiser(SCHEDULE), sampler, shape=(1000, 2), seed=1, progress=False)
    bad = _mismatches(GMM, x)
    assert len(bad) >= 3, bad


@pytest.mark.parametrize("component", [0, 2])
def test_classifier_free_guidance_samples_one_class(component):
    # Guidance scale 1 is the conditional model alone: samples of that one component.
    model = guidance_pair(
        GMM.denoiser(SCHEDULE, "v_prediction"),
        GMM.denoiser(SCHEDULE, "v_prediction", component=component),
    )
    sampler = SAMPLERS["dpmpp_2m"](
        SCHEDULE,
        20,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        backend="reference",
    )
    n = 1000
    x = sample(model, sampler, shape=(n, 2), guidance_scale=1.0, seed=2, progress=False)
    one = GaussianMixture([1.0], GMM.means[component : component + 1], GMM.covariances[[component]])
    assert (GMM.responsibilities(x).argmax(1) == component).all()
    assert _mismatches(one, x) == []
    # Stronger guidance still lands every sample in the class (and further from the others).
    x3 = sample(model, sampler, shape=(n, 2), guidance_scale=3.0, seed=2, progress=False)
    assert (GMM.responsibilities(x3).argmax(1) == component).all()
