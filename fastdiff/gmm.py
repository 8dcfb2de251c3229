"""A Gaussian mixture with its exact diffusion denoiser: a model whose right answer is known.

Data ``x0 ~ sum_k w_k N(mu_k, S_k)`` noised by the forward process (Ho et al. 2020, eq. 4)
``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` is again a mixture,

    p(x_t) = sum_k w_k N(x_t; sqrt(ab) mu_k, C_k),    C_k = ab S_k + (1 - ab) I,

and the minimum-mean-square-error denoiser a perfectly trained network would learn is, by
Gaussian conditioning within each component,

    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + sqrt(ab) S_k C_k^-1 (x_t - sqrt(ab) mu_k)),

with responsibilities ``r_k(x_t) = w_k N(x_t; sqrt(ab) mu_k, C_k) / p(x_t)``. A sampler driven by
this denoiser must reproduce the mixture: :meth:`GaussianMixture.fit` measures how well it did.

Everything is computed through the eigendecomposition ``S_k = U_k diag(l_k) U_k^T``, so that
``C_k = U_k diag(ab l_k + 1 - ab) U_k^T`` is inverted elementwise for any (per-sample) ``ab``.

Example::

    gmm = GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], torch.eye(2).expand(2, 2, 2) / 4)
    model = gmm.denoiser(schedule, prediction_type="epsilon")   # model(x, cond) -> eps
    fit = gmm.fit(samples)                                      # weights, means, covs, sliced W2
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GaussianMixture", "MixtureFit", "PREDICTION_TYPES", "CONDITIONINGS"]

# Same names as fastdiff.reference.PREDICTION_TYPES / fastdiff.schedules.CONDITIONINGS (kept
# local so that this module depends on nothing but torch).
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
CONDITIONINGS = ("timestep", "alpha_bar", "sigma", "log_snr")

_F64 = torch.float64
# Directions and quantile levels of the sliced Wasserstein fit figure.
_SW_PROJECTIONS = 64
_SW_SEED = 20240229


@dataclass(frozen=True)
class MixtureFit:
    """What :meth:`GaussianMixture.fit` measured on a set of samples (float64, CPU).

    Attributes:
        weights: [K] fraction of the (finite) samples assigned to each component.
        means: [K, d] per-component sample mean (NaN for an empty component).
        covariances: [K, d, d] per-component unbiased sample covariance (NaN with < 2 samples).
        counts: [K] int64 number of samples assigned to each component.
        sliced_w2: the fit figure, in data units: the sliced 2-Wasserstein distance between the
            samples and the true mixture (see :meth:`GaussianMixture.sliced_wasserstein`).
            ``inf`` if any sample is not finite.
        num_nonfinite: samples with a NaN/inf coordinate (left out of the statistics above).
    """

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    counts: torch.Tensor
    sliced_w2: float
    num_nonfinite: int


class GaussianMixture:
    """A mixture of K full-covariance Gaussians in d dimensions, stored in float64 on the CPU.

    Args:
        weights: [K] positive mixture weights summing to 1 (within 1e-6).
        means: [K, d] component means.
        covariances: [K, d, d] symmetric positive-definite component covariances.

    Raises:
        TypeError: an argument is not convertible to a float tensor.
        ValueError: wrong shapes, non-finite values, weights not positive or not summing to 1,
            covariances not symmetric or not positive definite.
    """

    def __init__(self, weights: Any, means: Any, covariances: Any) -> None:
        w = _as_f64(weights, "weights")
        mu = _as_f64(means, "means")
        cov = _as_f64(covariances, "covariances")
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError(
                f"weights must be a non-empty 1-D tensor [K], got shape {tuple(w.shape)}"
            )
        k = w.numel()
        if mu.ndim != 2 or mu.shape[0] != k or mu.shape[1] == 0:
            raise ValueError(f"means must have shape [K={k}, d], got {tuple(mu.shape)}")
        d = mu.shape[1]
        if cov.shape != (k, d, d):
            raise ValueError(
                f"covariances must have shape [K={k}, d={d}, d={d}], got {tuple(cov.shape)}"
            )
        for name, t in (("weights", w), ("means", mu), ("covariances", cov)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} must be finite")
        if (w <= 0).any():
            raise ValueError(f"weights must all be > 0, got {w.tolist()}")
        if abs(w.sum().item() - 1.0) > 1e-6:
            raise ValueError(
                f"weights must sum to 1 (within 1e-6), they sum to {w.sum().item():.9g}"
            )
        scale = cov.abs().amax(dim=(1, 2), keepdim=True)
        if ((cov - cov.transpose(1, 2)).abs() > 1e-9 * scale).any():
            raise ValueError("covariances must be symmetric")
        evals, evecs = torch.linalg.eigh(cov)
        if (evals <= 1e-12 * evals.amax(dim=1, keepdim=True)).any():
            raise ValueError(
                "covariances must be positive definite; smallest eigenvalues "
                f"{evals[:, 0].tolist()}"
            )
        self.weights = w / w.sum()
        self.means = mu
        self.covariances = cov
        self._evals = evals  # [K, d]
        self._evecs = evecs  # [K, d, d], columns are eigenvectors
        self._chol = torch.linalg.cholesky(cov)
        self._quantile_cache: dict[int, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"GaussianMixture(num_components={self.num_components}, dim={self.dim})"

    @property
    def num_components(self) -> int:
        """K, the number of components."""
        return self.weights.numel()

    @property
    def dim(self) -> int:
        """d, the dimension of a sample."""
        return self.means.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        """[d] mean of the whole mixture."""
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        """[d, d] covariance of the whole mixture (law of total covariance)."""
        centered = self.means - self.mean
        between = torch.einsum("k,ki,kj->ij", self.weights, centered, centered)
        return torch.einsum("k,kij->ij", self.weights, self.covariances) + between

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        *,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Draws ``n`` samples from the mixture.

        Args:
            n: number of samples (>= 0).
            generator: a CPU ``torch.Generator`` for reproducibility (global RNG when None).
            return_labels: also return the component each sample came from.

        Returns:
            float64 CPU tensor [n, d]; with ``return_labels``, also an int64 tensor [n].

        Example::

            x = gmm.sample(1000, torch.Generator().manual_seed(0))
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=_F64, generator=generator)
        x = self.means[labels] + torch.einsum("nij,nj->ni", self._chol[labels], z)
        return (x, labels) if return_labels else x

    # ------------------------------------------------------------------ the exact denoiser

    def posterior_mean(
        self, x: torch.Tensor, alpha_bar: torch.Tensor | float, component: int | None = None
    ) -> torch.Tensor:
        """E[x0 | x_t = x] for the mixture noised to ``alpha_bar``, in float64 on x's device.

        Args:
            x: [B, d] noisy samples (any float dtype, any device).
            alpha_bar: python float or float tensor of shape [] or [B], each in [0, 1].
            component: condition on one component (the class-conditional denoiser) if given.

        Returns:
            float64 [B, d] on x's device. Finite for alpha_bar in [0, 1].
        """
        x64, ab = self._check_x(x, alpha_bar)
        return self._posterior_mean(x64, ab, self._device_tables(x.device, component))

    def responsibilities(
        self, x: torch.Tensor, alpha_bar: torch.Tensor | float = 1.0
    ) -> torch.Tensor:
        """Posterior component probabilities r_k(x_t) for the mixture noised to ``alpha_bar``.

        Args:
            x: [B, d] samples; alpha_bar: as in :meth:`posterior_mean` (1.0: the clean mixture).

        Returns:
            float64 [B, K] on x's device; rows sum to 1.
        """
        x64, ab = self._check_x(x, alpha_bar)
        tables = self._device_tables(x.device, None)
        return _component_terms(x64, ab, tables)[0]

    def denoiser(
        self,
        schedule: Any,
        prediction_type: str = "epsilon",
        conditioning: str = "timestep",
        *,
        component: int | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The exact denoiser of this mixture as a diffusion model ``model(x, cond) -> output``.

        ``cond`` is what ``schedule.conditioning(t, conditioning)`` produces (so what a sampler's
        ``model_condition`` passes): the train timestep (``t == -1``: clean), ``alpha_bar``,
        ``sigma = sqrt((1-ab)/ab)`` or ``log_snr = log(ab/(1-ab))``; it is turned back into
        ``ab`` per sample. The output is the model's prediction in ``prediction_type``:
        ``epsilon`` ``(x - sqrt(ab) x0)/sqrt(1-ab)``, ``sample`` ``x0`` or ``v_prediction``
        ``sqrt(ab) eps - sqrt(1-ab) x0 = (sqrt(ab) x - x0)/sqrt(1-ab)``, with ``x0 = E[x0|x]``.
        Computed in float64, returned in x.dtype on x's device, without host-device syncs (the
        tables are copied to a device once, on its first call there). The model is meant for
        noisy inputs (``ab < 1``): at ``ab == 1`` the epsilon and v outputs are 0/0.

        At ``ab == 0`` (zero-terminal-SNR schedules) ``sample`` and ``v_prediction`` are exact
        (``x0 = E[x0]``, ``v = -x0``) but ``epsilon`` carries no information about ``x0`` (it is
        ``x`` itself), so epsilon prediction is refused: at construction when the schedule
        reaches ``ab == 0``, and at call time for a CPU ``cond`` that does. (On an accelerator
        the check would need a host sync; there such rows come out as NaN.)

        Args:
            schedule: a ``fastdiff.schedules.NoiseSchedule`` (anything with ``alphas_cumprod``,
                a float64 [T] tensor).
            prediction_type: "epsilon", "sample" or "v_prediction".
            conditioning: "timestep", "alpha_bar", "sigma" or "log_snr".
            component: if given, the class-conditional denoiser of that one component (the
                data distribution restricted to class ``component``), e.g. for the conditional
                half of classifier-free guidance.

        Returns:
            ``model(x, cond)`` with x [B, d] and cond [B] (or a scalar), returning [B, d].

        Raises:
            ValueError: unknown prediction type / conditioning, bad component, epsilon
                prediction with a schedule that reaches ``alpha_bar == 0``.

        Example::

            model = gmm.denoiser(schedule, "v_prediction", "log_snr")
            v = model(x, schedule.conditioning(t, "log_snr"))
        """
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
            )
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        self._check_component(component)
        table = getattr(schedule, "alphas_cumprod", None)
        if not isinstance(table, torch.Tensor) or table.ndim != 1:
            raise TypeError("schedule must have an `alphas_cumprod` 1-D tensor (a NoiseSchedule)")
        table = table.detach().to("cpu", _F64)
        if prediction_type == "epsilon" and bool((table == 0).any()):
            raise ValueError(
                "epsilon prediction is undefined at alpha_bar == 0 (this schedule has zero "
                "terminal SNR): x_t is pure noise and eps = x_t says nothing about x0; use "
                "prediction_type='v_prediction' or 'sample'"
            )
        return _ExactDenoiser(self, table, prediction_type, conditioning, component)

    # ------------------------------------------------------------------ fit statistics

    def fit(self, samples: torch.Tensor) -> MixtureFit:
        """Measures how well ``samples`` reproduce this mixture.

        Each sample is assigned to its most responsible component (under the clean mixture);
        weights are the assigned fractions, means and covariances the per-component sample
        statistics. For well-separated components these are unbiased estimates of the true
        weights, means and covariances (with standard errors :meth:`fit_standard_errors`).
        The fit figure is :meth:`sliced_wasserstein`. Host-side analysis: moves the samples to
        the CPU.

        Args:
            samples: [n, d] float tensor (any device), n >= 1.

        Returns:
            A :class:`MixtureFit`.
        """
        x = self._check_samples(samples)
        finite = torch.isfinite(x).all(dim=1)
        num_nonfinite = int((~finite).sum())
        xf = x[finite]
        k, d = self.num_components, self.dim
        labels = self.responsibilities(xf).argmax(dim=1) if xf.shape[0] else xf.new_zeros(0).long()
        counts = torch.bincount(labels, minlength=k)
        weights = counts.to(_F64) / max(xf.shape[0], 1)
        means = torch.full((k, d), float("nan"), dtype=_F64)
        covs = torch.full((k, d, d), float("nan"), dtype=_F64)
        for j in range(k):
            xj = xf[labels == j]
            if xj.shape[0] >= 1:
                means[j] = xj.mean(dim=0)
            if xj.shape[0] >= 2:
                c = xj - means[j]
                covs[j] = c.T @ c / (xj.shape[0] - 1)
        sw2 = self.sliced_wasserstein(x) if num_nonfinite == 0 else math.inf
        return MixtureFit(weights, means, covs, counts, sw2, num_nonfinite)

    def fit_standard_errors(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Standard errors of :meth:`fit`'s weights, means and covariances for n exact samples.

        Assumes well-separated components (assignment = true label) and uses the expected
        count ``n_k = n w_k``: weights are binomial, ``se = sqrt(w (1-w) / n)``; means
        ``se_i = sqrt(S_ii / n_k)``; Gaussian sample covariances
        ``se_ij = sqrt((S_ii S_jj + S_ij^2) / (n_k - 1))``.

        Args:
            n: the number of samples.

        Returns:
            (weights_se [K], means_se [K, d], covariances_se [K, d, d]), float64.
        """
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an int >= 2, got {n!r}")
        w = self.weights
        nk = (n * w).clamp_min(2.0)
        diag = torch.diagonal(self.covariances, dim1=1, dim2=2)  # [K, d]
        w_se = torch.sqrt(w * (1 - w) / n)
        mu_se = torch.sqrt(diag / nk[:, None])
        cov_se = torch.sqrt(
            (diag[:, :, None] * diag[:, None, :] + self.covariances**2) / (nk[:, None, None] - 1)
        )
        return w_se, mu_se, cov_se

    def sliced_wasserstein(self, samples: torch.Tensor) -> float:
        """Sliced 2-Wasserstein distance between ``samples`` and this mixture, in data units.

        For each of 64 fixed unit directions u (the same every call), the samples' projections
        ``u . x`` are sorted and compared with the exact quantiles of the projected mixture
        (a 1-D mixture of N(u . mu_k, u^T S_k u)) at levels (i + 1/2)/n; the figure is the root
        of the mean squared difference over samples and directions. It is 0 only for a perfect
        match, and a sampler that put every sample on the mixture mean scores about the
        mixture's spread. n exact samples do not score 0: their floor decays like ``n^-1/2``
        for a single Gaussian but only like ``n^-1/4`` between well-separated modes (the
        fraction of samples per mode fluctuates by ``~n^-1/2``, and W2 must move that mass
        across the gap), so read the figure against that of ``self.sample(n)``.

        Args:
            samples: [n, d] float tensor (any device), n >= 1.

        Returns:
            The distance as a python float (``inf`` if a sample is not finite).
        """
        x = self._check_samples(samples)
        if not torch.isfinite(x).all():
            return math.inf
        n = x.shape[0]
        dirs = self._sw_directions()  # [L, d]
        proj = torch.sort(x @ dirs.T, dim=0).values  # [n, L]
        q = self._projected_quantiles(n)  # [n, L]
        return math.sqrt(((proj - q) ** 2).mean().item())

    # ------------------------------------------------------------------ internals

    def _check_component(self, component: int | None) -> None:
        if component is None:
            return
        if isinstance(component, bool) or not isinstance(component, int):
            raise TypeError(f"component must be an int or None, got {type(component).__name__}")
        if not 0 <= component < self.num_components:
            raise ValueError(f"component must be in [0, {self.num_components}), got {component}")

    def _check_x(self, x: torch.Tensor, alpha_bar: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point torch.Tensor")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, d={self.dim}], got {tuple(x.shape)}")
        ab = torch.as_tensor(alpha_bar, dtype=_F64, device=x.device)
        if ab.ndim > 1 or (ab.ndim == 1 and ab.shape[0] != x.shape[0]):
            raise ValueError(
                f"alpha_bar must be a scalar or [B={x.shape[0]}], got {tuple(ab.shape)}"
            )
        return x.to(_F64), ab.expand(x.shape[0])

    def _check_samples(self, samples: torch.Tensor) -> torch.Tensor:
        if not isinstance(samples, torch.Tensor) or not samples.is_floating_point():
            raise TypeError("samples must be a floating-point torch.Tensor")
        if samples.ndim != 2 or samples.shape[1] != self.dim or samples.shape[0] == 0:
            raise ValueError(
                f"samples must have shape [n >= 1, d={self.dim}], got {tuple(samples.shape)}"
            )
        return samples.detach().to("cpu", _F64)

    def _device_tables(self, device: torch.device, component: int | None) -> _Tables:
        sel = slice(None) if component is None else slice(component, component + 1)
        logw = torch.log(self.weights[sel])
        logw = logw - torch.logsumexp(logw, 0)  # a single component gets weight 1
        return _Tables(
            logw=logw.to(device),
            means=self.means[sel].to(device),
            evals=self._evals[sel].to(device),
            evecs=self._evecs[sel].to(device),
        )

    def _posterior_mean(self, x64: torch.Tensor, ab: torch.Tensor, tables: _Tables) -> torch.Tensor:
        return _component_terms(x64, ab, tables, with_means=True)[1]

    def _sw_directions(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(_SW_SEED)
        u = torch.randn(_SW_PROJECTIONS, self.dim, dtype=_F64, generator=g)
        return u / u.norm(dim=1, keepdim=True)

    def _projected_quantiles(self, n: int) -> torch.Tensor:
        """[n, L] exact quantiles at levels (i + 1/2)/n of the mixture projected on each direction.

        Cached per n (a demo or a test evaluates many samplers at one n).
        """
        cached = self._quantile_cache.get(n)
        if cached is not None:
            return cached
        dirs = self._sw_directions()  # [L, d]
        m = dirs @ self.means.T  # [L, K]
        s = torch.sqrt(torch.einsum("li,kij,lj->lk", dirs, self.covariances, dirs))  # [L, K]
        w = self.weights
        levels = (torch.arange(n, dtype=_F64) + 0.5) / n  # [n]
        # Bracket on a grid of the CDF, then bisect inside the bracket.
        lo_all = (m - 10 * s).amin(dim=1)  # [L]
        hi_all = (m + 10 * s).amax(dim=1)
        grid_size = 2048
        steps = torch.linspace(0, 1, grid_size, dtype=_F64)
        grid = lo_all[:, None] + (hi_all - lo_all)[:, None] * steps  # [L, G]

        def cdf(z: torch.Tensor) -> torch.Tensor:  # z [L, N] -> [L, N]
            return (torch.special.ndtr((z[..., None] - m[:, None]) / s[:, None]) * w).sum(-1)

        grid_cdf = cdf(grid)
        idx = torch.searchsorted(
            grid_cdf.contiguous(), levels.expand(dirs.shape[0], n).contiguous()
        )
        idx = idx.clamp(1, grid_size - 1)
        lo = grid.gather(1, idx - 1)
        hi = grid.gather(1, idx)
        for _ in range(20):  # bracket width shrinks to (range / 2048) / 2^20
            mid = 0.5 * (lo + hi)
            below = cdf(mid) < levels
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        q = (0.5 * (lo + hi)).T.contiguous()
        if len(self._quantile_cache) >= 8:
            self._quantile_cache.clear()
        self._quantile_cache[n] = q
        return q


@dataclass(frozen=True)
class _Tables:
    logw: torch.Tensor  # [K] log weights (normalized)
    means: torch.Tensor  # [K, d]
    evals: torch.Tensor  # [K, d]
    evecs: torch.Tensor  # [K, d, d]


def _component_terms(
    x: torch.Tensor, ab: torch.Tensor, t: _Tables, with_means: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Responsibilities r_k(x_t) [B, K] and, if asked, the posterior mean E[x0 | x_t] [B, d].

    Works in a [K, d, B] layout (batch innermost), so that the reductions over the small
    dimensions d and K and the per-component matrix products run along contiguous B.
    """
    a = ab[None, None, :]  # [1, 1, B]
    sa = torch.sqrt(a)
    xt = x.T[None]  # [1, d, B]
    diff = xt - sa * t.means[:, :, None]  # [K, d, B]: x_t - sqrt(ab) mu_k
    y = torch.matmul(t.evecs.transpose(1, 2), diff)  # U_k^T diff: S_k's eigenbasis
    var = a * t.evals[:, :, None] + (1 - a)  # eigenvalues of C_k = ab S_k + (1 - ab) I
    inv_var = 1.0 / var
    # log w_k N(x_t; sqrt(ab) mu_k, C_k) + const; log det C_k = log prod of its eigenvalues.
    log_lik = t.logw[:, None] - 0.5 * ((y * y * inv_var).sum(1) + torch.log(var.prod(1)))
    log_lik = log_lik - log_lik.amax(0, keepdim=True)  # log-sum-exp normalization
    lik = torch.exp(log_lik)
    resp = lik / lik.sum(0, keepdim=True)  # [K, B]
    if not with_means:
        return resp.T, None
    gain = sa * t.evals[:, :, None] * inv_var  # sqrt(ab) S_k C_k^-1 in the eigenbasis
    comp = t.means[:, :, None] + torch.matmul(t.evecs, gain * y)  # E[x0 | x_t, k]: [K, d, B]
    return resp.T, (resp[:, None, :] * comp).sum(0).T.contiguous()


class _ExactDenoiser:
    """model(x, cond) -> prediction; see GaussianMixture.denoiser."""

    def __init__(
        self,
        gmm: GaussianMixture,
        ab_table: torch.Tensor,
        prediction_type: str,
        conditioning: str,
        component: int | None,
    ) -> None:
        self.gmm = gmm
        self.prediction_type = prediction_type
        self.conditioning = conditioning
        self.component = component
        self._ab_table = ab_table
        self._cache: dict[torch.device, tuple[_Tables, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"ExactGMMDenoiser(prediction_type={self.prediction_type!r}, "
            f"conditioning={self.conditioning!r}, component={self.component})"
        )

    def _tables(self, device: torch.device) -> tuple[_Tables, torch.Tensor]:
        hit = self._cache.get(device)
        if hit is None:
            hit = (self.gmm._device_tables(device, self.component), self._ab_table.to(device))
            self._cache[device] = hit
        return hit

    def alpha_bar(self, cond: torch.Tensor, batch: int) -> torch.Tensor:
        """Turns the model's conditioning back into alpha_bar, float64 [batch] on cond's device."""
        tables, ab_table = self._tables(cond.device)
        if self.conditioning == "timestep":
            t = cond.round().long() if cond.is_floating_point() else cond.long()
            if cond.device.type == "cpu":
                bad = (t < -1) | (t >= ab_table.shape[0])
                if bad.any():
                    raise ValueError(
                        f"timestep conditioning out of range [-1, {ab_table.shape[0] - 1}]: "
                        f"{t[bad][:4].tolist()}"
                    )
            ab = torch.where(
                t < 0, torch.ones((), dtype=_F64, device=t.device), ab_table[t.clamp_min(0)]
            )
        else:
            c = cond.to(_F64)
            if self.conditioning == "alpha_bar":
                ab = c
            elif self.conditioning == "sigma":
                ab = 1.0 / (1.0 + c * c)  # sigma = inf -> 0
            else:  # log_snr = log(ab / (1 - ab))
                ab = torch.sigmoid(c)
            if cond.device.type == "cpu" and ((ab < 0) | (ab > 1) | ab.isnan()).any():
                raise ValueError(f"{self.conditioning} conditioning gives alpha_bar outside [0, 1]")
        return ab.expand(batch)

    def __call__(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point torch.Tensor")
        if x.ndim != 2 or x.shape[1] != self.gmm.dim:
            raise ValueError(f"x must have shape [B, d={self.gmm.dim}], got {tuple(x.shape)}")
        cond = torch.as_tensor(cond, device=x.device)
        if cond.ndim > 1 or (cond.ndim == 1 and cond.shape[0] != x.shape[0]):
            raise ValueError(f"cond must be a scalar or [B={x.shape[0]}], got {tuple(cond.shape)}")
        if cond.device != x.device:
            cond = cond.to(x.device)
        tables, _ = self._tables(x.device)
        ab = self.alpha_bar(cond, x.shape[0])
        if self.prediction_type == "epsilon" and x.device.type == "cpu" and (ab == 0).any():
            raise ValueError(
                "epsilon prediction is undefined at alpha_bar == 0 (pure noise); "
                "use prediction_type='v_prediction' or 'sample'"
            )
        x64 = x.to(_F64)
        x0 = self.gmm._posterior_mean(x64, ab, tables)
        a = ab[:, None]
        if self.prediction_type == "sample":
            out = x0
        elif self.prediction_type == "epsilon":
            eps = (x64 - torch.sqrt(a) * x0) / torch.sqrt(1 - a)
            out = torch.where(a == 0, torch.nan, eps)  # reached only off the CPU
        else:  # v = sqrt(ab) eps - sqrt(1-ab) x0 = (sqrt(ab) x - x0) / sqrt(1-ab)
            out = (torch.sqrt(a) * x64 - x0) / torch.sqrt(1 - a)
        return out.to(x.dtype).contiguous()  # the math ran in a [K, d, B] layout


def _as_f64(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        return value.detach().to("cpu", _F64)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a tensor or a (nested) sequence of numbers, got a string")
    try:
        return torch.as_tensor(value, dtype=_F64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a tensor or a (nested) sequence of numbers: {err}"
        ) from err
