"""Noise schedules: the betas and ``ab_t = prod_{s<=t} (1 - beta_s)`` over the train
timesteps (Ho et al. 2020, eq. 4), built once on the host in float64, with per-timestep lookups
on any device without a host sync. Timestep plans live in :mod:`fastdiff.plans` (re-exported).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastdiff.checks import check_choice, check_int
from fastdiff.plans import TIMESTEP_SPACINGS, make_plan, respaced_timesteps, spaced_timesteps

__all__ = [
    "BETA_SCHEDULES",
    "CONDITIONINGS",
    "TIMESTEP_SPACINGS",
    "NoiseSchedule",
    "make_betas",
    "make_plan",
    "rescale_zero_terminal_snr",
    "respaced_timesteps",
    "spaced_timesteps",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
CONDITIONINGS = ("timestep", "alpha_bar", "sigma", "log_snr")

# Offset of the cosine schedule (Nichol & Dhariwal 2021, eq. 17) and its cap on beta.
_COSINE_S = 0.008
_COSINE_MAX_BETA = 0.999


# -- Argument checks ---------------------------------------------------------------------------


def _check_real(name: str, value: Any) -> float:
    """``value`` as a finite python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _float64_vector(name: str, values: Any) -> torch.Tensor:
    """``values`` as a fresh, finite, non-empty float64 CPU 1-D tensor."""
    if isinstance(values, torch.Tensor):
        if not values.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {values.dtype}")
        table = values.detach().to(device="cpu", dtype=torch.float64).clone()
    else:
        try:
            table = torch.as_tensor(np.asarray(values, dtype=np.float64)).clone()
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a sequence of real numbers: {err}") from None
    if table.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(table.shape)}")
    if table.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if not bool(torch.isfinite(table).all()):
        raise ValueError(f"{name} must be finite, got non-finite values")
    return table.contiguous()


def _check_betas(name: str, betas: torch.Tensor) -> torch.Tensor:
    """Every beta lies in (0, 1]."""
    bad = (betas <= 0) | (betas > 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must lie in (0, 1], got {name}[{i}] = {betas[i].item()!r}")
    return betas


# -- Beta schedules ----------------------------------------------------------------------------


def _cosine_alpha_bar(s: torch.Tensor) -> torch.Tensor:
    """f(s) = cos^2((s + 0.008) / 1.008 * pi / 2) for s = t / T (Nichol & Dhariwal 2021, eq. 17)."""
    return torch.cos((s + _COSINE_S) / (1.0 + _COSINE_S) * (math.pi / 2)) ** 2


def make_betas(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    trained_betas: Sequence[float] | torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """The betas of a named schedule (or given betas, checked), float64, ``i = 0..T-1``.

    - ``"linear"``: ``linspace(beta_start, beta_end, T)`` (Ho et al. 2020).
    - ``"scaled_linear"``: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``
      (Rombach et al. 2022).
    - ``"squaredcos_cap_v2"``: ``min(1 - f((i+1)/T) / f(i/T), 0.999)``,
      ``f(s) = cos^2((s + 0.008) / 1.008 * pi / 2)`` (Nichol & Dhariwal 2021, eq. 17).
    - ``"sigmoid"``: ``sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start``
      (Xu et al. 2022, GeoDiff).

    Args:
        beta_schedule: one of :data:`BETA_SCHEDULES` (checked, unused with ``trained_betas``).
        num_train_timesteps: ``T`` (>= 1); ``len(trained_betas)`` when those are given.
        beta_start, beta_end: the ends of the linear-type schedules.
        trained_betas: explicit betas (1-D, finite, in (0, 1]), taking precedence.

    Returns:
        float64 CPU tensor ``[T]``, each beta in (0, 1].

    Example:
        >>> make_betas("scaled_linear", 1000, 0.00085, 0.012).shape
        torch.Size([1000])
    """
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    T = check_int("num_train_timesteps", num_train_timesteps, 1)
    if trained_betas is not None:
        betas = _float64_vector("trained_betas", trained_betas)
        if betas.numel() != T:
            raise ValueError(
                f"trained_betas has {betas.numel()} entries but num_train_timesteps is {T}; "
                f"pass num_train_timesteps={betas.numel()}"
            )
        return _check_betas("trained_betas", betas)

    start = _check_real("beta_start", beta_start)
    end = _check_real("beta_end", beta_end)
    f64 = torch.float64
    if beta_schedule == "linear":
        betas = torch.linspace(start, end, T, dtype=f64)
    elif beta_schedule == "scaled_linear":
        if start < 0 or end < 0:
            raise ValueError(
                f"scaled_linear needs beta_start >= 0 and beta_end >= 0 (it interpolates their "
                f"square roots), got beta_start={start}, beta_end={end}"
            )
        betas = torch.linspace(math.sqrt(start), math.sqrt(end), T, dtype=f64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        f = _cosine_alpha_bar(torch.arange(T + 1, dtype=f64) / T)
        betas = torch.clamp(1.0 - f[1:] / f[:-1], max=_COSINE_MAX_BETA)
    else:  # "sigmoid"
        betas = torch.sigmoid(torch.linspace(-6.0, 6.0, T, dtype=f64)) * (end - start) + start
    return _check_betas(f"betas of the {beta_schedule!r} schedule", betas.contiguous())


def rescale_zero_terminal_snr(betas: Sequence[float] | torch.Tensor | np.ndarray) -> torch.Tensor:
    """Betas rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1)::

        sqrt_ab' = (sqrt_ab - sqrt_ab[-1]) * sqrt_ab[0] / (sqrt_ab[0] - sqrt_ab[-1])
        beta'_0 = 1 - ab'_0,   beta'_i = 1 - ab'_i / ab'_{i-1}

    Args:
        betas: 1-D betas (at least 2), finite, in (0, 1].

    Returns:
        float64 CPU tensor, same length; the last beta is exactly 1 (``ab = 0``).

    Example:
        >>> float(rescale_zero_terminal_snr(make_betas("scaled_linear", 1000, 0.00085, 0.012))[-1])
        1.0
    """
    betas = _check_betas("betas", _float64_vector("betas", betas))
    if betas.numel() < 2:
        raise ValueError("zero-terminal-SNR rescaling needs at least 2 betas")
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).contiguous()


# -- NoiseSchedule -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """An immutable table of noise levels over the train timesteps ``t = 0..T-1``.

    ``betas`` and ``alphas_cumprod`` (``ab_t = prod_{s<=t} (1 - beta_s)``) are float64 CPU
    tensors, validated: 1-D, one length, finite, betas in (0, 1], ``alphas_cumprod`` strictly
    decreasing in (0, 1) (the last may be 0: zero terminal SNR) and ``cumprod(1 - betas)``
    within rtol 1e-3. Lookups take ``t`` as an int, a nested sequence of ints or an integer
    tensor; ``t == -1`` is clean (``ab = 1``). Python and CPU ``t`` are range checked; device
    ``t`` gathers from a cached device table, unchecked and without a host sync (capturable).

    Example:
        >>> NoiseSchedule.create("linear", 1000).alpha_bar([999, -1]).dtype
        torch.float64
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    # Device copies of derived tables, keyed by (name, device, dtype).
    _tables: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        betas = _check_betas("betas", _float64_vector("betas", self.betas))
        ab = _float64_vector("alphas_cumprod", self.alphas_cumprod)
        if ab.numel() != betas.numel():
            raise ValueError(
                f"betas and alphas_cumprod must have the same length, got {betas.numel()} "
                f"and {ab.numel()}"
            )
        if not bool(((ab > 0) & (ab <= 1))[:-1].all()) or not 0 <= ab[-1].item() <= 1:
            raise ValueError(
                "alphas_cumprod must lie in (0, 1] (only its last entry may be exactly 0, "
                "for zero terminal SNR)"
            )
        if ab.numel() > 1 and not bool((ab[1:] < ab[:-1]).all()):
            i = int((ab[1:] >= ab[:-1]).nonzero()[0, 0])
            raise ValueError(
                f"alphas_cumprod must be strictly decreasing, got alphas_cumprod[{i}] = "
                f"{ab[i].item()!r} <= alphas_cumprod[{i + 1}] = {ab[i + 1].item()!r}"
            )
        expected = torch.cumprod(1.0 - betas, dim=0)
        if not torch.allclose(ab, expected, rtol=1e-3, atol=1e-12):
            i = int((ab - expected).abs().argmax())
            raise ValueError(
                f"alphas_cumprod is not cumprod(1 - betas): at t={i} it is {ab[i].item()!r}, "
                f"cumprod gives {expected[i].item()!r}"
            )
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", ab)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NoiseSchedule):
            return NotImplemented
        return torch.equal(self.betas, other.betas) and torch.equal(
            self.alphas_cumprod, other.alphas_cumprod
        )

    def __hash__(self) -> int:
        return hash((self.betas.numpy().tobytes(), self.alphas_cumprod.numpy().tobytes()))

    def __repr__(self) -> str:
        ab = self.alphas_cumprod
        return (
            f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, "
            f"betas=[{self.betas[0].item():.4g} .. {self.betas[-1].item():.4g}], "
            f"alphas_cumprod=[{ab[0].item():.4g} .. {ab[-1].item():.4g}])"
        )

    @classmethod
    def create(
        cls,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        trained_betas: Sequence[float] | torch.Tensor | np.ndarray | None = None,
        rescale_betas_zero_snr: bool = False,
    ) -> NoiseSchedule:
        """A schedule from a named beta schedule, as diffusers' scheduler configs give it.

        Args:
            beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas: as for
                :func:`make_betas`.
            rescale_betas_zero_snr: apply :func:`rescale_zero_terminal_snr`.

        Returns:
            The :class:`NoiseSchedule` with ``alphas_cumprod = cumprod(1 - betas)``.

        Example:
            >>> NoiseSchedule.create("squaredcos_cap_v2", 1000).num_train_timesteps
            1000
        """
        if not isinstance(rescale_betas_zero_snr, bool):
            raise TypeError(
                f"rescale_betas_zero_snr must be a bool, got {type(rescale_betas_zero_snr)}"
            )
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        """``T``, the number of train timesteps."""
        return int(self.betas.shape[0])

    # ---- lookups -------------------------------------------------------------------------

    def _index(self, t: Any) -> torch.Tensor:
        """``t`` as int64 on t's device (CPU for python values); range checked on the CPU."""
        if isinstance(t, torch.Tensor):
            if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
                raise TypeError(f"timesteps must be an integer tensor, got dtype {t.dtype}")
            idx = t.long()
            if idx.device.type != "cpu":
                return idx
        elif isinstance(t, bool):
            raise TypeError("timesteps must be ints, got a bool")
        elif isinstance(t, numbers.Integral):
            self._check_range(int(t), int(t))
            return torch.tensor(int(t), dtype=torch.long)
        else:
            try:
                arr = np.asarray(t)
            except (TypeError, ValueError) as err:
                raise TypeError(f"timesteps must be ints, got {t!r}: {err}") from None
            if arr.size == 0:
                arr = arr.astype(np.int64)
            if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"timesteps must be ints, got {t!r} (dtype {arr.dtype})")
            idx = torch.as_tensor(arr.astype(np.int64))
        if idx.numel() > 0:
            self._check_range(int(idx.min()), int(idx.max()))
        return idx

    def _check_range(self, lo: int, hi: int) -> None:
        """Raise unless lo..hi lies in [-1, T-1]."""
        last = self.num_train_timesteps - 1
        if lo < -1 or hi > last:
            bad = lo if lo < -1 else hi
            raise ValueError(f"timestep {bad} out of range [-1, {last}] (-1 means clean)")

    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A derived table ``[T+1]``, clean entry first (index ``t + 1``), cached per
        (name, device, dtype)."""
        key = (name, torch.device(device), dtype)
        table = self._tables.get(key)
        if table is None:
            ab = self.alphas_cumprod
            if name == "alpha_bar":
                values = ab
                clean = 1.0
            elif name == "sigma":
                values = ((1.0 - ab) / ab).sqrt()  # inf where ab == 0 (zero terminal SNR)
                clean = 0.0
            elif name == "log_snr":
                values = torch.log(ab) - torch.log1p(-ab)  # -inf where ab == 0
                clean = math.inf
            elif name == "sqrt_alpha_bar":
                values = ab.sqrt()
                clean = 1.0
            elif name == "sqrt_one_minus_alpha_bar":
                values = (1.0 - ab).sqrt()
                clean = 0.0
            else:
                raise AssertionError(name)
            table = torch.cat([values.new_tensor([clean]), values])
            table = table.to(dtype=dtype).to(device=device, non_blocking=True)
            self._tables[key] = table
        return table

    def _gather(self, name: str, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.take(self._table(name, idx.device, dtype), idx + 1)

    def alpha_bar(self, t: Any) -> torch.Tensor:
        """``ab_t = prod_{s<=t} (1 - beta_s)``; 1 for ``t == -1``.

        Args:
            t: an int, a nested sequence of ints, or an integer tensor on any device.

        Returns:
            float64 tensor of t's shape, on t's device (CPU for python values).

        Example:
            >>> NoiseSchedule.create().alpha_bar(-1)
            tensor(1., dtype=torch.float64)
        """
        return self._gather("alpha_bar", self._index(t), torch.float64)

    def sigma(self, t: Any) -> torch.Tensor:
        """``sigma_t = sqrt((1 - ab_t) / ab_t)`` (Karras et al. 2022): 0 for ``t == -1``,
        +inf where ``ab_t == 0``.

        Args:
            t: as for :meth:`alpha_bar`.

        Returns:
            float64 tensor of t's shape, on t's device.

        Example:
            >>> NoiseSchedule.create().sigma([0, -1]).shape
            torch.Size([2])
        """
        return self._gather("sigma", self._index(t), torch.float64)

    def conditioning(self, t: Any, kind: str = "timestep") -> torch.Tensor:
        """What a model is conditioned on at ``t``, by ``kind``: ``"timestep"`` (``t`` as
        float64), ``"alpha_bar"`` (``ab_t``), ``"sigma"`` or ``"log_snr"``
        (``log(ab_t / (1 - ab_t))``: +inf clean, -inf where ``ab_t == 0``).

        Args:
            t: as for :meth:`alpha_bar`.
            kind: one of :data:`CONDITIONINGS`.

        Returns:
            float64 tensor of t's shape, on t's device.

        Example:
            >>> NoiseSchedule.create().conditioning([999, 0], "timestep")
            tensor([999.,   0.], dtype=torch.float64)
        """
        if not isinstance(kind, str) or kind not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning kind {kind!r}; expected one of {CONDITIONINGS}")
        idx = self._index(t)
        if kind == "timestep":
            return idx.to(torch.float64)
        return self._gather(kind, idx, torch.float64)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Any) -> torch.Tensor:
        """The forward process ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise`` (Ho et al. 2020,
        eq. 4), in float64 for float64 ``x0`` and float32 otherwise, cast to ``x0.dtype``.

        Args:
            x0: clean samples, floating point, batch first for per-sample ``t``.
            noise: standard normal noise of x0's shape and device.
            t: as for :meth:`alpha_bar`: 0-d, or ``[B]`` per sample.

        Returns:
            ``x_t``, same shape, dtype and device as ``x0`` (no host sync for ``t`` on that
            device).

        Example:
            >>> x0 = torch.randn(4, 2)
            >>> NoiseSchedule.create().add_noise(x0, torch.randn_like(x0), [0, 9, 500, 999]).shape
            torch.Size([4, 2])
        """
        for name, x in (("x0", x0), ("noise", noise)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if noise.shape != x0.shape:
            raise ValueError(
                f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}"
            )
        if noise.device != x0.device:
            raise ValueError(f"noise is on {noise.device} but x0 is on {x0.device}")
        idx = self._index(t)
        if idx.device != x0.device and idx.device.type != "cpu":
            raise ValueError(f"timesteps are on {idx.device} but x0 is on {x0.device}")
        if idx.dim() == 1:
            if x0.dim() == 0 or idx.shape[0] != x0.shape[0]:
                raise ValueError(
                    f"per-sample timesteps of shape {tuple(idx.shape)} need x0 with batch size "
                    f"{idx.shape[0]}, got x0 shape {tuple(x0.shape)}"
                )
        elif idx.dim() != 0:
            raise ValueError(
                f"timesteps must be a scalar or of shape [B], got shape {tuple(idx.shape)}"
            )
        compute = torch.float64 if x0.dtype == torch.float64 else torch.float32
        sqrt_ab = self._gather("sqrt_alpha_bar", idx, compute)
        sqrt_1m_ab = self._gather("sqrt_one_minus_alpha_bar", idx, compute)
        if idx.device != x0.device:
            sqrt_ab = sqrt_ab.to(x0.device, non_blocking=True)
            sqrt_1m_ab = sqrt_1m_ab.to(x0.device, non_blocking=True)
        if idx.dim() == 1:
            per_sample = (-1,) + (1,) * (x0.dim() - 1)
            sqrt_ab, sqrt_1m_ab = sqrt_ab.view(per_sample), sqrt_1m_ab.view(per_sample)
        x_t = sqrt_ab * x0.to(compute) + sqrt_1m_ab * noise.to(compute)
        return x_t.to(x0.dtype)
