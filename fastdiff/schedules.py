"""Noise schedules and sampling plans, computed once on the host in float64.

A diffusion model is trained on a table of noise levels over the train timesteps
``t = 0..T-1``: the betas and their cumulative products ``ab_t = prod_{s<=t} (1 - beta_s)``
(Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 4). This module builds that
table (:func:`make_betas`, :func:`rescale_zero_terminal_snr`, :class:`NoiseSchedule`), answers
per-timestep questions about it on any device without a host sync (:meth:`NoiseSchedule.alpha_bar`,
:meth:`NoiseSchedule.sigma`, :meth:`NoiseSchedule.conditioning`, :meth:`NoiseSchedule.add_noise`)
and picks the train timesteps that a sampler visits (:func:`spaced_timesteps`,
:func:`respaced_timesteps`, :func:`make_plan`).

References:
    - Ho et al. 2020, DDPM: the linear schedule and the forward process (eq. 4).
    - Rombach et al. 2022, Latent Diffusion: the ``scaled_linear`` schedule.
    - Nichol & Dhariwal 2021, Improved DDPM: the cosine schedule (eq. 17) and section respacing.
    - Song et al. 2021, DDIM: evenly strided sub-sequences ("ddimN").
    - Xu et al. 2022, GeoDiff: the sigmoid schedule.
    - Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed":
      zero-terminal-SNR rescaling (Algorithm 1) and the leading / trailing / linspace spacings
      (Table 2).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

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
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
CONDITIONINGS = ("timestep", "alpha_bar", "sigma", "log_snr")

# Offset of the cosine schedule (Nichol & Dhariwal 2021, eq. 17) and its cap on beta.
_COSINE_S = 0.008
_COSINE_MAX_BETA = 0.999


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` as a python int, or raise if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_real(name: str, value: Any) -> float:
    """Return ``value`` as a finite python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _float64_vector(name: str, values: Any) -> torch.Tensor:
    """Convert ``values`` to a fresh float64 CPU 1-D tensor (no check of the values)."""
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
    """Check that every beta lies in (0, 1]."""
    bad = (betas <= 0) | (betas > 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must lie in (0, 1], got {name}[{i}] = {betas[i].item()!r}")
    return betas


# --------------------------------------------------------------------------------------------
# Beta schedules
# --------------------------------------------------------------------------------------------


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
    """Build the beta table of a named schedule (or check given betas), in float64.

    Schedules (``i = 0..T-1``):

    - ``"linear"``: ``beta_i = linspace(beta_start, beta_end, T)`` (Ho et al. 2020).
    - ``"scaled_linear"``: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``
      (Rombach et al. 2022, latent diffusion / Stable Diffusion).
    - ``"squaredcos_cap_v2"``: ``beta_i = min(1 - f((i+1)/T) / f(i/T), 0.999)`` with
      ``f(s) = cos^2((s + 0.008) / 1.008 * pi / 2)`` (Nichol & Dhariwal 2021, eq. 17);
      ``beta_start`` and ``beta_end`` are not used.
    - ``"sigmoid"``: ``sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start``
      (Xu et al. 2022, GeoDiff; the same formula as diffusers).

    Args:
        beta_schedule: one of :data:`BETA_SCHEDULES`; ignored (but still checked) when
            ``trained_betas`` is given.
        num_train_timesteps: ``T``, the number of train timesteps (>= 1). Must equal
            ``len(trained_betas)`` when those are given.
        beta_start: first beta of the linear-type schedules.
        beta_end: last beta of the linear-type schedules.
        trained_betas: explicit betas (1-D, finite, each in (0, 1]); they take precedence
            over the named schedule.

    Returns:
        float64 CPU tensor ``[T]`` of betas, each in (0, 1].

    Raises:
        ValueError: unknown schedule name, ``num_train_timesteps < 1``, a length mismatch,
            betas outside (0, 1], non-finite or not 1-D betas, negative ``beta_start`` /
            ``beta_end`` for ``scaled_linear``.
        TypeError: arguments of the wrong type.

    Example:
        >>> make_betas("scaled_linear", 1000, 0.00085, 0.012).shape
        torch.Size([1000])
    """
    if not isinstance(beta_schedule, str) or beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}"
        )
    T = _check_int("num_train_timesteps", num_train_timesteps, 1)
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
    """Rescale betas so that the last timestep has zero signal-to-noise ratio.

    Lin et al. 2023, Algorithm 1: shift ``sqrt(ab)`` so that its last value is 0, then scale
    it so that its first value is unchanged, and convert back to betas::

        sqrt_ab' = (sqrt_ab - sqrt_ab[-1]) * sqrt_ab[0] / (sqrt_ab[0] - sqrt_ab[-1])
        beta'_0 = 1 - ab'_0,   beta'_i = 1 - ab'_i / ab'_{i-1}

    The last rescaled beta is exactly 1, so the last ``ab`` is exactly 0 (pure noise).

    Args:
        betas: 1-D betas (at least 2), finite, each in (0, 1].

    Returns:
        float64 CPU tensor of the rescaled betas, same length.

    Raises:
        ValueError: fewer than 2 betas, not 1-D, non-finite or outside (0, 1].

    Example:
        >>> b = rescale_zero_terminal_snr(make_betas("scaled_linear", 1000, 0.00085, 0.012))
        >>> float(b[-1])
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


# --------------------------------------------------------------------------------------------
# NoiseSchedule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """An immutable table of noise levels over the train timesteps ``t = 0..T-1``.

    Holds ``betas`` and ``alphas_cumprod`` (``ab_t = prod_{s<=t} (1 - beta_s)``, Ho et al.
    2020) as float64 CPU tensors; treat them as read-only. The lookups accept a timestep
    ``t`` as a python int, a (nested) sequence of ints, or an integer tensor on any device;
    ``t == -1`` means "clean" (``ab = 1``, ``sigma = 0``, after the last sampling step).

    For a tensor ``t`` that is not on the CPU the lookup gathers from a device copy of the
    table (made once per device and dtype, then cached) without any host synchronization,
    so it can run inside a CUDA graph once the cache is warm; such ``t`` is not range
    checked (an out-of-range index is a device-side error). Python values and CPU tensors
    are checked to lie in ``[-1, T-1]``.

    Construct with :meth:`create`, or directly from tables, which are validated: both 1-D,
    the same length, finite, betas in (0, 1], ``alphas_cumprod`` strictly decreasing in
    (0, 1) except that its last entry may be exactly 0 (zero terminal SNR), and consistent
    with ``cumprod(1 - betas)`` (relative tolerance 1e-3, which admits tables computed in
    float32).

    Args:
        betas: 1-D floating-point betas.
        alphas_cumprod: 1-D floating-point cumulative products of ``1 - betas``.

    Example:
        >>> s = NoiseSchedule.create("linear", 1000)
        >>> s.alpha_bar([999, -1]).dtype
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
        """Build a schedule from a named beta schedule, as diffusers' scheduler configs do.

        Args:
            beta_schedule: one of :data:`BETA_SCHEDULES` (see :func:`make_betas`).
            num_train_timesteps: ``T`` (>= 1).
            beta_start: first beta of the linear-type schedules.
            beta_end: last beta of the linear-type schedules.
            trained_betas: explicit betas, taking precedence over ``beta_schedule``.
            rescale_betas_zero_snr: apply :func:`rescale_zero_terminal_snr`
                (Lin et al. 2023, Algorithm 1).

        Returns:
            The :class:`NoiseSchedule` with ``alphas_cumprod = cumprod(1 - betas)`` in float64.

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
        """Timesteps ``t`` as an int64 tensor on t's device (CPU for python values).

        Python values and CPU tensors are checked to lie in [-1, T-1]; other devices are
        not checked (that would need a host sync).
        """
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
        """A derived table of length T+1 with the clean entry first (index = t + 1), cached
        per (name, device, dtype); the copy to a device happens once, on first use."""
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
        """``ab_t``, the cumulative product of ``1 - beta`` up to train timestep ``t``.

        Args:
            t: python int, (nested) sequence of ints, or integer tensor on any device;
                ``-1`` means clean (``ab = 1``).

        Returns:
            float64 tensor of t's shape, on t's device (CPU for python values).

        Raises:
            ValueError: a python / CPU timestep outside ``[-1, T-1]``.
            TypeError: non-integer timesteps.

        Example:
            >>> NoiseSchedule.create().alpha_bar(-1)
            tensor(1., dtype=torch.float64)
        """
        return self._gather("alpha_bar", self._index(t), torch.float64)

    def sigma(self, t: Any) -> torch.Tensor:
        """``sigma_t = sqrt((1 - ab_t) / ab_t)``, the noise level in sigma space (Karras et
        al. 2022); 0 for clean (``t == -1``), +inf where ``ab_t == 0`` (zero terminal SNR).

        Args:
            t: as for :meth:`alpha_bar`.

        Returns:
            float64 tensor of t's shape, on t's device.

        Raises:
            ValueError: a python / CPU timestep outside ``[-1, T-1]``.
            TypeError: non-integer timesteps.

        Example:
            >>> NoiseSchedule.create().sigma([0, -1]).shape
            torch.Size([2])
        """
        return self._gather("sigma", self._index(t), torch.float64)

    def conditioning(self, t: Any, kind: str = "timestep") -> torch.Tensor:
        """What a model is conditioned on at train timestep ``t``.

        Kinds: ``"timestep"`` (``t`` itself, as float64 so that model code can embed it; -1 stays
        -1.0), ``"alpha_bar"`` (``ab_t``), ``"sigma"`` (``sqrt((1-ab_t)/ab_t)``) and
        ``"log_snr"`` (``log(ab_t / (1 - ab_t))``: +inf for clean, -inf where ``ab_t == 0``).
        A model conditioned on the noise level can so be sampled on any plan.

        Args:
            t: as for :meth:`alpha_bar`.
            kind: one of :data:`CONDITIONINGS`.

        Returns:
            float64 tensor of t's shape, on t's device.

        Raises:
            ValueError: unknown ``kind``, or a python / CPU timestep outside ``[-1, T-1]``.
            TypeError: non-integer timesteps.

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
        """Sample the forward process ``q(x_t | x_0)``: ``sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``.

        Ho et al. 2020, eq. 4. ``t`` is one timestep for the whole batch or one per sample
        (shape ``[B]``, broadcast over x0's trailing dims); ``t == -1`` returns ``x0``. The
        arithmetic runs in float64 for float64 ``x0`` and in float32 otherwise, and the
        result is cast to ``x0.dtype``. With ``t`` on x0's device no host sync happens; a
        python / CPU ``t`` is gathered on the CPU and copied over without blocking.

        Args:
            x0: clean samples, floating point, any shape (batch first for per-sample ``t``).
            noise: standard normal noise of x0's shape, floating point, on x0's device.
            t: as for :meth:`alpha_bar`; 0-d or shape ``[B]`` with ``B = x0.shape[0]``.

        Returns:
            ``x_t``, same shape, dtype and device as ``x0``.

        Raises:
            TypeError: non-tensor or non-floating ``x0`` / ``noise``; non-integer ``t``.
            ValueError: shape or device mismatch; ``t`` neither 0-d nor ``[B]``; a python /
                CPU timestep outside ``[-1, T-1]``.

        Example:
            >>> s = NoiseSchedule.create()
            >>> x0 = torch.randn(4, 3, 8, 8)
            >>> s.add_noise(x0, torch.randn_like(x0), torch.tensor([0, 10, 500, 999])).shape
            torch.Size([4, 3, 8, 8])
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


# --------------------------------------------------------------------------------------------
# Sampling plans
# --------------------------------------------------------------------------------------------


def spaced_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    """The train timesteps a sampler visits, evenly spaced, in descending order.

    The three spacings of Lin et al. 2023, Table 2, with diffusers' DDPM/DDIM semantics
    (``set_timesteps``), for ``T`` train steps and ``N`` sampling steps:

    - ``"leading"``: ``t_k = k * (T // N) + steps_offset`` for ``k = N-1..0``
      (e.g. T=1000, N=10: 900, 800, ..., 0).
    - ``"trailing"``: ``round(T - k * T / N) - 1`` for ``k = 0..N-1``, with the floating-point
      stepping of diffusers (``numpy.arange``), so half-way values round as there
      (e.g. T=1000, N=10: 999, 899, ..., 99). Where that stepping yields one extra point
      (diffusers then returns ``N + 1`` steps ending at ``t = -1``) the extra point is dropped.
    - ``"linspace"``: ``round(linspace(0, T-1, N))`` reversed, rounding half to even
      (e.g. T=1000, N=10: 999, 888, ..., 0).

    As in diffusers, ``steps_offset`` only shifts the ``"leading"`` spacing; the others
    ignore it.

    Args:
        num_train_timesteps: ``T`` (>= 1).
        num_inference_steps: ``N``, with ``1 <= N <= T``.
        timestep_spacing: one of :data:`TIMESTEP_SPACINGS`.
        steps_offset: added to every ``"leading"`` timestep (>= 0); the largest must stay
            ``<= T-1``.

    Returns:
        int64 CPU tensor ``[N]``, strictly decreasing, in ``[0, T-1]``.

    Raises:
        ValueError: ``N < 1``, ``N > T``, unknown spacing, negative ``steps_offset``, or a
            ``steps_offset`` that pushes a timestep past ``T-1``.
        TypeError: non-int counts.

    Example:
        >>> spaced_timesteps(1000, 4, "trailing")
        tensor([999, 749, 499, 249])
    """
    T = _check_int("num_train_timesteps", num_train_timesteps, 1)
    N = _check_int("num_inference_steps", num_inference_steps, 1)
    if N > T:
        raise ValueError(
            f"num_inference_steps ({N}) cannot be larger than num_train_timesteps ({T})"
        )
    if not isinstance(timestep_spacing, str) or timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"unknown timestep_spacing {timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}"
        )
    offset = _check_int("steps_offset", steps_offset, 0)

    if timestep_spacing == "leading":
        stride = T // N
        plan = np.arange(N - 1, -1, -1, dtype=np.int64) * stride + offset
        if plan[0] > T - 1:
            raise ValueError(
                f"steps_offset={offset} pushes the first 'leading' timestep to {plan[0]}, "
                f"past num_train_timesteps - 1 = {T - 1}"
            )
    elif timestep_spacing == "trailing":
        # The float stepping of numpy.arange can overshoot by one point (~0); keep N points.
        points = np.arange(T, 0, -T / N)[:N]
        plan = np.round(points).astype(np.int64) - 1
    else:  # "linspace"
        plan = np.round(np.linspace(0, T - 1, N))[::-1].astype(np.int64)
    plan = torch.from_numpy(np.ascontiguousarray(plan))
    _check_explicit_plan(T, plan)  # cannot fail for N <= T; guards the float arithmetic
    return plan


def _section_counts(section_counts: Any) -> list[int]:
    """Parse improved-diffusion's section counts ("10,15,20" or a sequence of ints)."""
    if isinstance(section_counts, str):
        parts = section_counts.split(",")
        counts = []
        for part in parts:
            try:
                counts.append(int(part.strip()))
            except ValueError:
                raise ValueError(
                    f"section counts must be comma-separated ints or 'ddimN', got "
                    f"{section_counts!r}"
                ) from None
    else:
        try:
            items = list(section_counts)
        except TypeError:
            raise TypeError(
                f"section_counts must be a str or a sequence of ints, got "
                f"{type(section_counts).__name__}"
            ) from None
        counts = [_check_int("each section count", c, 0) for c in items]
    if not counts:
        raise ValueError("section_counts must not be empty")
    for c in counts:
        if c < 0:
            raise ValueError(f"section counts must be >= 0, got {c}")
    if sum(counts) == 0:
        raise ValueError(f"section_counts {section_counts!r} ask for 0 steps in total")
    return counts


def respaced_timesteps(
    num_train_timesteps: int, section_counts: str | Sequence[int]
) -> torch.Tensor:
    """improved-diffusion's timestep respacing (Nichol & Dhariwal 2021), descending.

    - Section counts (``"10,15,20"`` or ``[10, 15, 20]``): the train timesteps are cut into
      as many equal sections as counts (the first ``T % len`` sections one step longer);
      a section of ``size`` steps asked for ``n`` steps takes ``round(k * (size-1)/(n-1))``
      (accumulated in floating point, rounding half to even, as improved-diffusion) for
      ``k = 0..n-1``, so its first and last timesteps are always visited; ``n == 1`` takes
      the first timestep of the section, ``n == 0`` none.
      E.g. T=300, ``"10,15,20"``: 10 steps over 0..99, 15 over 100..199, 20 over 200..299.
    - ``"ddimN"``: the smallest integer stride ``s`` for which ``range(0, T, s)`` has exactly
      ``N`` timesteps (the even striding of Song et al. 2021, DDIM).

    Args:
        num_train_timesteps: ``T`` (>= 1).
        section_counts: ``"ddimN"``, comma-separated counts, or a sequence of ints (>= 0).

    Returns:
        int64 CPU tensor, strictly decreasing, in ``[0, T-1]``.

    Raises:
        ValueError: a section asked for more steps than it has, no integer stride giving
            exactly ``N`` steps, malformed strings, empty / negative / all-zero counts.
        TypeError: non-int counts.

    Example:
        >>> respaced_timesteps(1000, "ddim4")
        tensor([750, 500, 250,   0])
    """
    T = _check_int("num_train_timesteps", num_train_timesteps, 1)
    if isinstance(section_counts, str) and section_counts.strip().startswith("ddim"):
        text = section_counts.strip()[len("ddim") :]
        try:
            N = int(text)
        except ValueError:
            raise ValueError(f"expected 'ddimN' with an int N, got {section_counts!r}") from None
        if N < 1:
            raise ValueError(f"'ddimN' needs N >= 1, got {section_counts!r}")
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == N:
                return torch.arange(0, T, stride, dtype=torch.long).flip(0)
        raise ValueError(
            f"cannot get exactly {N} timesteps out of {T} with an integer stride "
            f"({section_counts!r})"
        )

    counts = _section_counts(section_counts)
    base, extra = divmod(T, len(counts))
    start = 0
    visited: set[int] = set()
    for i, n in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if n > size:
            raise ValueError(
                f"section {i} ({start}..{start + size - 1}) has {size} timesteps, "
                f"cannot take {n} steps from it"
            )
        stride = (size - 1) / (n - 1) if n > 1 else 1.0
        position = 0.0
        for _ in range(n):
            visited.add(start + round(position))
            position += stride
        start += size
    return torch.tensor(sorted(visited, reverse=True), dtype=torch.long)


def _check_explicit_plan(T: int, plan: torch.Tensor) -> None:
    """Check an explicit plan: non-empty, 1-D, strictly decreasing, in [0, T-1]."""
    if plan.dim() != 1:
        raise ValueError(f"an explicit plan must be 1-D, got shape {tuple(plan.shape)}")
    if plan.numel() == 0:
        raise ValueError("an explicit plan must not be empty")
    if plan.numel() > 1 and not bool((plan[1:] < plan[:-1]).all()):
        raise ValueError(f"an explicit plan must be strictly decreasing, got {plan.tolist()}")
    lo, hi = int(plan.min()), int(plan.max())
    if lo < 0 or hi > T - 1:
        bad = lo if lo < 0 else hi
        raise ValueError(f"explicit plan timestep {bad} out of range [0, {T - 1}]")


def make_plan(
    num_train_timesteps: int,
    steps: int | str | Sequence[int] | torch.Tensor,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> torch.Tensor:
    """The train timesteps a sampler visits, chosen by the type of ``steps``.

    - ``int``: ``steps`` evenly spaced timesteps, :func:`spaced_timesteps` with
      ``timestep_spacing`` and ``steps_offset``.
    - ``str``: improved-diffusion respacing, :func:`respaced_timesteps` (``"ddim50"``,
      ``"10,15,20"``).
    - a sequence / 1-D tensor / array of ints: an explicit plan, which must be non-empty,
      strictly decreasing and in ``[0, T-1]``.

    ``timestep_spacing`` is checked but only used for an int ``steps``; a non-zero
    ``steps_offset`` with a str or explicit plan is an error.

    Args:
        num_train_timesteps: ``T`` (>= 1).
        steps: the step count, the respacing string, or the explicit timesteps.
        timestep_spacing: one of :data:`TIMESTEP_SPACINGS`.
        steps_offset: see :func:`spaced_timesteps`.

    Returns:
        int64 CPU tensor, strictly decreasing, in ``[0, T-1]`` (a fresh copy).

    Raises:
        ValueError: as :func:`spaced_timesteps` / :func:`respaced_timesteps`; an explicit
            plan that is empty, not strictly decreasing or out of range; ``steps_offset``
            with a non-int ``steps``.
        TypeError: ``steps`` of another type (float, bool, non-int entries).

    Example:
        >>> make_plan(1000, [999, 500, 0])
        tensor([999, 500,   0])
    """
    T = _check_int("num_train_timesteps", num_train_timesteps, 1)
    if not isinstance(timestep_spacing, str) or timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"unknown timestep_spacing {timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}"
        )
    if isinstance(steps, bool):
        raise TypeError("steps must be an int, a str or a sequence of ints, got a bool")
    if isinstance(steps, numbers.Integral):
        return spaced_timesteps(T, int(steps), timestep_spacing, steps_offset)
    offset = _check_int("steps_offset", steps_offset, 0)
    if offset != 0:
        raise ValueError(
            f"steps_offset={offset} only applies to an int number of steps, not to {steps!r}"
        )
    if isinstance(steps, str):
        return respaced_timesteps(T, steps)
    if isinstance(steps, torch.Tensor):
        if steps.dtype == torch.bool or steps.is_floating_point() or steps.is_complex():
            raise TypeError(f"an explicit plan must hold ints, got dtype {steps.dtype}")
        if steps.dim() != 1:
            raise ValueError(f"an explicit plan must be 1-D, got shape {tuple(steps.shape)}")
        plan = steps.detach().to(device="cpu", dtype=torch.long).clone()
    elif isinstance(steps, (Sequence, np.ndarray)):
        if isinstance(steps, np.ndarray) and steps.ndim != 1:
            raise ValueError(f"an explicit plan must be 1-D, got shape {steps.shape}")
        items = steps.tolist() if isinstance(steps, np.ndarray) else list(steps)
        values = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                raise TypeError(f"an explicit plan must hold ints, got {item!r} in {steps!r}")
            values.append(int(item))
        plan = torch.tensor(values, dtype=torch.long)
    else:
        raise TypeError(
            f"steps must be an int, a str or a sequence of ints, got {type(steps).__name__}"
        )
    _check_explicit_plan(T, plan)
    return plan
