"""A Gaussian mixture with its exact diffusion denoiser: a model whose right answer is known.

Data ``x0 ~ sum_k w_k N(mu_k, S_k)`` noised as ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps``
(Ho et al. 2020, eq. 4) is the mixture ``sum_k w_k N(sqrt(ab) mu_k, C_k)``,
``C_k = ab S_k + (1 - ab) I``, and its minimum-mean-square-error denoiser is

    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + sqrt(ab) S_k C_k^-1 (x_t - sqrt(ab) mu_k)),

``r_k`` the component responsibilities, through ``S_k = U_k diag(l_k) U_k^T``. Example::

    gmm = demo_mixture()
    model = gmm.denoiser(schedule, prediction_type="epsilon")   # model(x, cond) -> eps
    fit = gmm.fit(samples)                                      # weights, means, covs, sliced W2
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastdiff.checks import PREDICTION_TYPES, check_choice
from fastdiff.schedules import CONDITIONINGS

__all__ = ["GaussianMixture", "MixtureFit", "demo_mixture"]

_F64 = torch.float64
# Directions and quantile levels of the sliced Wasserstein fit figure.
_SW_PROJECTIONS = 64
_SW_SEED = 20240229


@dataclass(frozen=True)
class MixtureFit:
    """What :meth:`GaussianMixture.fit` measured (float64, CPU), per component ``k``.

    Attributes:
        weights: [K] fraction of the finite samples assigned to each component.
        means: [K, d] sample means (NaN when empty).
        covariances: [K, d, d] unbiased sample covariances (NaN with < 2 samples).
        counts: [K] int64 samples assigned.
        sliced_w2: :meth:`GaussianMixture.sliced_wasserstein` (``inf`` with a non-finite sample).
        num_nonfinite: samples with a NaN/inf coordinate (left out of the statistics).
    """

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    counts: torch.Tensor
    sliced_w2: float
    num_nonfinite: int


class GaussianMixture:
    """A mixture of K full-covariance Gaussians in d dimensions, float64 on the CPU.

    Args:
        weights: [K] positive weights summing to 1 (within 1e-6).
        means: [K, d] component means.
        covariances: [K, d, d] symmetric positive-definite covariances.
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

    def sample(
        self, n: int, generator: torch.Generator | None = None, *, return_labels: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples of the mixture (float64 CPU [n, d]; with ``return_labels`` also the
        int64 [n] components they came from).

        Example::

            x = gmm.sample(1000, torch.Generator().manual_seed(0))
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=_F64, generator=generator)
        x = self.means[labels] + torch.einsum("nij,nj->ni", self._chol[labels], z)
        return (x, labels) if return_labels else x

    def posterior_mean(
        self, x: torch.Tensor, alpha_bar: torch.Tensor | float, component: int | None = None
    ) -> torch.Tensor:
        """``E[x0 | x_t = x]`` at ``alpha_bar`` (float, [] or [B], in [0, 1]) for x [B, d]:
        float64 [B, d] on x's device; ``component`` conditions on one component."""
        x64, ab = self._check_x(x, alpha_bar)
        return self._posterior_mean(x64, ab, self._device_tables(x.device, component))

    def responsibilities(
        self, x: torch.Tensor, alpha_bar: torch.Tensor | float = 1.0
    ) -> torch.Tensor:
        """Responsibilities ``r_k(x_t)`` at ``alpha_bar`` (1.0: the clean mixture): float64
        [B, K] on x's device, rows summing to 1."""
        x64, ab = self._check_x(x, alpha_bar)
        return _component_terms(x64, ab, self._device_tables(x.device, None))[0]

    def denoiser(
        self,
        schedule: Any,
        prediction_type: str = "epsilon",
        conditioning: str = "timestep",
        *,
        component: int | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The exact denoiser as a model ``model(x, cond) -> output``, x [B, d], cond [B] or [].

        ``cond`` is ``schedule.conditioning(t, conditioning)`` (what ``model_condition``
        passes), turned back into ``ab`` per sample; the output is ``prediction_type`` of
        ``x0 = E[x0 | x]``: epsilon ``(x - sqrt(ab) x0)/sqrt(1-ab)``, sample ``x0``, or v
        ``(sqrt(ab) x - x0)/sqrt(1-ab)``. float64 math, x's dtype out, no host sync. Epsilon
        is undefined at ``ab == 0`` and refused for a schedule that reaches it (and for a CPU
        ``cond`` that does; on a device such rows are NaN).

        Args:
            schedule: a ``NoiseSchedule`` (anything with a 1-D ``alphas_cumprod`` tensor).
            prediction_type: one of ``fastdiff.checks.PREDICTION_TYPES``.
            conditioning: one of ``fastdiff.schedules.CONDITIONINGS``.
            component: the class-conditional denoiser of this one component, if given.

        Example::

            model = gmm.denoiser(schedule, "v_prediction", "log_snr")
            v = model(x, schedule.conditioning(t, "log_snr"))
        """
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("conditioning", conditioning, CONDITIONINGS)
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

    def fit(self, samples: torch.Tensor) -> MixtureFit:
        """How well ``samples`` [n, d] (any device) reproduce this mixture.

        Each sample goes to its most responsible component; weights, means and covariances
        are the per-component statistics (unbiased for well-separated components, standard
        errors :meth:`fit_standard_errors`), the fit figure :meth:`sliced_wasserstein`.
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
        """Standard errors of :meth:`fit` for n exact samples, well-separated components,
        ``n_k = n w_k``: weights ``sqrt(w (1-w) / n)``, means ``sqrt(S_ii / n_k)``,
        covariances ``sqrt((S_ii S_jj + S_ij^2) / (n_k - 1))``; float64 ([K], [K, d], [K, d, d]).
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
        """Sliced 2-Wasserstein distance between ``samples`` [n, d] and the mixture, in data units.

        Over 64 fixed unit directions ``u``: the sorted projections ``u . x`` against the exact
        quantiles of the projected mixture at levels ``(i + 1/2)/n``, root mean square. n
        exact samples score a floor (``~n^-1/2`` for one Gaussian, ``~n^-1/4`` between
        separated modes): read it against ``self.sample(n)``'s. ``inf`` for a non-finite sample.
        """
        x = self._check_samples(samples)
        if not torch.isfinite(x).all():
            return math.inf
        n = x.shape[0]
        dirs = self._sw_directions()  # [L, d]
        proj = torch.sort(x @ dirs.T, dim=0).values  # [n, L]
        q = self._projected_quantiles(n)  # [n, L]
        return math.sqrt(((proj - q) ** 2).mean().item())

    def _check_component(self, component: int | None) -> None:
        if component is None:
            return
        if isinstance(component, bool) or not isinstance(component, int):
            raise TypeError(f"component must be an int or None, got {type(component).__name__}")
        if not 0 <= component < self.num_components:
            raise ValueError(f"component must be in [0, {self.num_components}), got {component}")

    def _check_x(
        self, x: torch.Tensor, alpha_bar: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point torch.Tensor")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, d={self.dim}], got {tuple(x.shape)}")
        if alpha_bar is None:  # no tensor made from a number: a copy a CUDA graph refuses
            return x.to(_F64), None
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
        """[n, L] exact quantiles at levels (i + 1/2)/n of the projected mixture, cached per n."""
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

        idx = torch.searchsorted(cdf(grid).contiguous(), levels.expand(len(dirs), n).contiguous())
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
    """Responsibilities r_k(x_t) [B, K] and, if asked, E[x0 | x_t] [B, d], computed in a
    [K, d, B] layout (batch innermost, contiguous for the small reductions)."""
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

    def __init__(self, gmm, ab_table, prediction_type, conditioning, component) -> None:
        self.gmm = gmm
        self.prediction_type, self.conditioning = prediction_type, conditioning
        self.component = component
        self._ab_table = ab_table
        self._cache: dict[torch.device, tuple[_Tables, torch.Tensor]] = {}

    def __repr__(self) -> str:
        kind = f"{self.prediction_type!r}, {self.conditioning!r}, component={self.component}"
        return f"ExactGMMDenoiser({kind})"

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
        x64, _ = self.gmm._check_x(x)
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


def demo_mixture() -> GaussianMixture:
    """The built-in 2-D mixture (``fastdiff demo``, ``--model gmm``): 7 blobs on a ring of
    radius 3, long along the ring (std 0.45) and thin across it (0.12), weights varying
    smoothly around it, and a round one (std 0.3, weight 0.16) in the centre.

    Example:
        >>> demo_mixture().num_components
        8
    """
    ring = 7
    angles = torch.arange(ring, dtype=_F64) * (2 * math.pi / ring) + math.pi / 2
    normal = torch.stack([angles.cos(), angles.sin()], 1)  # [ring, 2]
    tangent = torch.stack([-angles.sin(), angles.cos()], 1)
    covs = 0.45**2 * torch.einsum("ki,kj->kij", tangent, tangent) + 0.12**2 * torch.einsum(
        "ki,kj->kij", normal, normal
    )
    covs = torch.cat([covs, (0.3**2 * torch.eye(2, dtype=_F64))[None]])
    means = torch.cat([3.0 * normal, torch.zeros(1, 2, dtype=_F64)])
    ring_w = 1.0 + 0.6 * torch.cos(angles - math.pi / 2)
    weights = torch.cat([0.84 * ring_w / ring_w.sum(), torch.tensor([0.16], dtype=_F64)])
    return GaussianMixture(weights, means, covs)
