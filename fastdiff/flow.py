"""Flow matching (rectified flow): the noise path, the sigma plans, the exact mixture velocity.

The state at noise level ``s`` in [0, 1] (s = 1: pure noise, s = 0: data) is::

    x_s = (1 - s) x0 + s eps                    # Esser et al. 2024, Sec. 3.1 (rectified flow)

(Liu et al. 2023, eq. 1 and Lipman et al. 2023, eq. 20-22 with sigma_min = 0, their time being
``1 - s``). The model predicts the velocity ``v = dx_s/ds = eps - x0`` (diffusers'
``prediction_type="flow_prediction"``) and is conditioned on ``t = s * num_train_timesteps``.
The step math is in ``fastdiff.reference`` (flow section), the coefficient rules in
``fastdiff.tables``, the samplers in ``fastdiff.flow_samplers``.

A sigma plan is a float64 tensor ``[n + 1]``: the n levels the model is called at, then the
terminal level 0. :func:`flow_sigmas` builds the plans of diffusers' flow schedulers from the
small pieces below (shift, dynamic shift with ``mu``, ``shift_terminal``, Karras /
exponential / beta spacing).

Example::

    sigmas = flow_sigmas(28, shift=3.0)                          # SD3
    mu = calculate_shift(4096)                                   # Flux at 1024x1024
    sigmas = flow_sigmas(28, sigmas=torch.linspace(1, 1 / 28, 28), mu=mu)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastdiff.checks import check_choice, check_number

__all__ = [
    "FLOW_CONDITIONINGS",
    "FLOW_GRIDS",
    "FLOW_PREDICTION_TYPES",
    "SIGMA_SPACINGS",
    "TIME_SHIFT_TYPES",
    "FlowSchedule",
    "beta_sigmas",
    "calculate_shift",
    "check_flow_sigmas",
    "exponential_sigmas",
    "flow_sigmas",
    "karras_sigmas",
    "mixture_velocity",
    "shift_sigmas",
    "stretch_to_terminal",
    "time_shift",
]

# What a flow model may predict: the velocity v = eps - x0, the noise, or x0 itself. (The VP
# velocity "v_prediction" of Salimans & Ho 2022 is a different quantity: not on a flow path.)
FLOW_PREDICTION_TYPES = ("flow_prediction", "epsilon", "sample")
# What a flow model is conditioned on: t = s * num_train_timesteps, or s itself.
FLOW_CONDITIONINGS = ("timestep", "sigma")
TIME_SHIFT_TYPES = ("exponential", "linear")
SIGMA_SPACINGS = ("karras", "exponential", "beta")
# The unshifted grids of diffusers' flow schedulers (see flow_sigmas).
FLOW_GRIDS = ("flow_match", "dpm", "unipc")

_F64 = torch.float64


def _as_sigmas(values: Any) -> torch.Tensor:
    return torch.as_tensor(values, dtype=_F64).detach().reshape(-1).cpu()


def check_flow_sigmas(sigmas: Any, name: str = "sigmas", high: float = 1.0) -> torch.Tensor:
    """A flow plan given by hand: strictly decreasing levels in ``[0, high]``.

    Args:
        sigmas: a sequence or 1-D tensor of numbers.
        name: the argument's name, for the error.
        high: the largest level allowed (1 for sigmas, ``num_train_timesteps`` for timesteps).

    Returns:
        The values as a float64 CPU tensor.

    Raises:
        ValueError: empty, not finite, outside ``[0, high]`` or not strictly decreasing.
    """
    try:
        values = _as_sigmas(sigmas)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a sequence of numbers: {err}") from err
    if values.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if not torch.isfinite(values).all() or (values < 0).any() or (values > high).any():
        raise ValueError(f"{name} must be finite values in [0, {high:g}], got {values.tolist()}")
    if (values[1:] >= values[:-1]).any():
        raise ValueError(f"{name} must be strictly decreasing, got {values.tolist()}")
    return values


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The resolution shift of Esser et al. 2024 (Sec. 5.3.2, eq. 23, ``shift = sqrt(m/n)``)::

        s <- shift s / (1 + (shift - 1) s)

    Args:
        sigmas: float64 levels in [0, 1].
        shift: > 0 (1: unchanged; SD3 uses 3).

    Returns:
        The shifted levels (0 and 1 stay fixed).

    Example:
        >>> shift_sigmas(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), 3.0)  # 1, .75, 0
    """
    shift = check_number("shift", shift, low=0.0, low_open=True)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def time_shift(
    sigmas: torch.Tensor, mu: float, time_shift_type: str = "exponential", exponent: float = 1.0
) -> torch.Tensor:
    """Dynamic (resolution-dependent) shifting with ``mu`` (Flux)::

        exponential: s <- e^mu / (e^mu + (1/s - 1)^exponent)
        linear:      s <- mu / (mu + (1/s - 1)^exponent)

    With ``exponent = 1`` this is :func:`shift_sigmas` with ``shift = e^mu`` (or ``mu``).

    Args:
        sigmas: float64 levels in [0, 1].
        mu: the shift exponent (see :func:`calculate_shift`); > 0 for "linear".
        time_shift_type: "exponential" or "linear".
        exponent: the exponent of ``1/s - 1`` (1 in every diffusers scheduler).

    Returns:
        The shifted levels.
    """
    check_choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
    low = 0.0 if time_shift_type == "linear" else None
    mu = check_number("mu", mu, low=low, low_open=True)
    scale = math.exp(mu) if time_shift_type == "exponential" else mu
    return scale / (scale + (1.0 / sigmas - 1.0) ** exponent)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's ``mu`` for an image of ``image_seq_len`` latent tokens: linear in the sequence
    length, ``base_shift`` at ``base_seq_len`` and ``max_shift`` at ``max_seq_len``.

    Args:
        image_seq_len: latent tokens of the image ((H / 16) * (W / 16) for Flux).
        base_seq_len, max_seq_len: the two anchor lengths (the scheduler config's
            ``base_image_seq_len`` / ``max_image_seq_len``).
        base_shift, max_shift: mu at the two anchors.

    Returns:
        mu, a python float.

    Example:
        >>> calculate_shift(4096)  # 1.15: a 1024x1024 Flux image
    """
    if base_seq_len == max_seq_len:
        raise ValueError("base_seq_len and max_seq_len must differ")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(image_seq_len * slope + base_shift - slope * base_seq_len)


def stretch_to_terminal(sigmas: torch.Tensor, shift_terminal: float) -> torch.Tensor:
    """Stretch a plan so that its last level is ``shift_terminal`` (LTX-Video)::

        1 - s <- (1 - s) (1 - shift_terminal) / (1 - s_last)

    Args:
        sigmas: float64 levels, the last one < 1.
        shift_terminal: the last level wanted, in (0, 1).

    Returns:
        The stretched levels.
    """
    shift_terminal = check_number("shift_terminal", shift_terminal, low=0.0, high=1.0)
    one_minus = 1.0 - sigmas
    if not float(one_minus[-1]) > 0:
        raise ValueError("shift_terminal needs a plan whose last level is below 1")
    return 1.0 - one_minus * (1.0 - shift_terminal) / one_minus[-1]


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: ``(max^(1/rho) + k/(n-1) (min^(1/rho) - max^(1/rho)))^rho``.

    Returns:
        float64 ``[n]`` from ``sigma_max`` down to ``sigma_min``.
    """
    ramp = torch.linspace(0, 1, n, dtype=_F64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
    """Levels evenly spaced in log: ``exp(linspace(log max, log min, n))``, float64 ``[n]``."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=_F64).exp()


def beta_sigmas(
    sigma_max: float, sigma_min: float, n: int, alpha: float = 0.6, beta: float = 0.6
) -> torch.Tensor:
    """Lee et al. 2024 ("Beta Sampling is All You Need"): ``min + (max - min) F^-1(1 - k/(n-1))``
    with ``F`` the Beta(alpha, beta) CDF (needs scipy).

    Returns:
        float64 ``[n]`` from ``sigma_max`` down to ``sigma_min``.
    """
    import scipy.stats

    levels = 1.0 - torch.linspace(0, 1, n, dtype=_F64)
    ppf = torch.as_tensor(scipy.stats.beta.ppf(levels.numpy(), alpha, beta), dtype=_F64)
    return sigma_min + ppf * (sigma_max - sigma_min)


_SPACINGS: dict[str, Callable[[float, float, int], torch.Tensor]] = {
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "beta": beta_sigmas,
}


def _base_grid(n: int, grid: str, num_train_timesteps: int, shift: float, dynamic: bool):
    """The unshifted levels of each diffusers flow scheduler, float64 ``[n]``."""
    T = num_train_timesteps
    if grid == "flow_match":
        # FlowMatchEulerDiscreteScheduler: from 1 down to its smallest train level 1/T, which
        # its __init__ has already shifted (without dynamic shifting): it is shifted twice.
        low = torch.tensor([1.0 / T], dtype=_F64)
        low = low if dynamic else shift_sigmas(low, shift)
        return torch.linspace(1.0, float(low), n, dtype=_F64)
    if grid == "dpm":  # DPMSolverMultistepScheduler(use_flow_sigmas=True)
        return torch.linspace(1.0 - 1.0 / T, 0.0, n + 1, dtype=_F64)[:-1]
    return torch.linspace(1.0, 1.0 / T, n + 1, dtype=_F64)[:-1]  # UniPC(use_flow_sigmas=True)


def flow_sigmas(
    num_steps: int | None = None,
    *,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    timesteps: Sequence[float] | torch.Tensor | None = None,
    grid: str = "flow_match",
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
    mu: float | None = None,
    time_shift_type: str = "exponential",
    shift_terminal: float | None = None,
    spacing: str | None = None,
    invert: bool = False,
) -> torch.Tensor:
    """The sigma plan of diffusers' flow schedulers, in float64.

    1. base levels: ``sigmas`` or ``timesteps / T`` as given, else the ``grid`` of n levels:
       "flow_match" (FlowMatchEulerDiscreteScheduler: ``linspace(1, shift(1/T), n)``),
       "dpm" (DPM-Solver++ with ``use_flow_sigmas``: ``linspace(1 - 1/T, 0, n + 1)[:-1]``) or
       "unipc" (UniPC with ``use_flow_sigmas``: ``linspace(1, 1/T, n + 1)[:-1]``);
    2. shifted: :func:`time_shift` with ``mu`` (dynamic shifting) or :func:`shift_sigmas`;
    3. :func:`stretch_to_terminal` with ``shift_terminal``;
    4. respaced by ``spacing`` between the first and last level ("karras", "exponential",
       "beta"; flow_match only); "unipc" moves a first level of 1 to ``1 - 1e-6``;
    5. the terminal level 0 appended (with ``invert``: every level ``s -> 1 - s``, terminal 1,
       as Mochi; flow_match only).

    Args:
        num_steps: n, the number of model calls (may be omitted with ``sigmas``/``timesteps``).
        sigmas: custom base levels, strictly decreasing in [0, 1].
        timesteps: custom base timesteps in [0, T], strictly decreasing (not with ``sigmas``).
        grid: one of :data:`FLOW_GRIDS`.
        num_train_timesteps: T.
        shift: the static shift (ignored when ``mu`` is given).
        mu: dynamic shifting exponent (:func:`calculate_shift`).
        time_shift_type: "exponential" or "linear" (with ``mu``).
        shift_terminal: the last level wanted, in (0, 1), or None.
        spacing: None, "karras", "exponential" or "beta".
        invert: Mochi's inverted levels.

    Returns:
        float64 CPU tensor ``[n + 1]``.

    Raises:
        ValueError: both ``sigmas`` and ``timesteps``, lengths that disagree with
            ``num_steps``, levels not decreasing or outside [0, 1], bad option values.

    Example:
        >>> flow_sigmas(4, shift=3.0)  # SD3's plan for 4 steps, ending in 0
    """
    check_choice("grid", grid, FLOW_GRIDS)
    T = int(check_number("num_train_timesteps", num_train_timesteps, low=1))
    shift = check_number("shift", shift, low=0.0, low_open=True)
    if sigmas is not None and timesteps is not None:
        raise ValueError("give sigmas or timesteps, not both")
    if spacing is not None:
        check_choice("spacing", spacing, SIGMA_SPACINGS)
    if (spacing is not None or invert) and grid != "flow_match":
        raise ValueError(f"spacing and invert apply to the flow_match grid, not {grid!r}")
    if sigmas is not None:
        base = check_flow_sigmas(sigmas, "sigmas")
    elif timesteps is not None:
        base = check_flow_sigmas(timesteps, "timesteps", high=T) / T
    else:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        base = _base_grid(num_steps, grid, T, shift, mu is not None)
    if num_steps is not None and num_steps != len(base):
        raise ValueError(f"num_steps={num_steps} but {len(base)} custom levels were given")
    s = time_shift(base, mu, time_shift_type) if mu is not None else shift_sigmas(base, shift)
    if shift_terminal:
        s = stretch_to_terminal(s, shift_terminal)
    if spacing is not None:
        s = _SPACINGS[spacing](float(s[0]), float(s[-1]), len(s))
    if grid == "unipc" and abs(float(s[0]) - 1.0) < 1e-6:
        s[0] -= 1e-6  # UniPC's guard against log(alpha = 0) in its first update
    if invert:
        return torch.cat([1.0 - s, torch.ones(1, dtype=_F64)])
    return torch.cat([s, torch.zeros(1, dtype=_F64)])


@dataclass(frozen=True)
class FlowSchedule:
    """The training side of a flow model: ``x_s = (1 - s) x0 + s eps``, conditioned on
    ``t = s * num_train_timesteps``.

    Args:
        num_train_timesteps: T (1000 for every diffusers flow model).

    Example:
        >>> FlowSchedule().add_noise(x0, torch.randn_like(x0), 500.0)  # s = 0.5
    """

    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        n = self.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_train_timesteps must be an int >= 1, got {n!r}")

    def conditioning(self, t: torch.Tensor, kind: str = "timestep") -> torch.Tensor:
        """What a model is conditioned on at train timestep ``t = s T``: ``t`` itself
        ("timestep") or ``s`` ("sigma"), float64 on t's device."""
        check_choice("conditioning", kind, FLOW_CONDITIONINGS)
        t = torch.as_tensor(t).to(_F64)
        return t if kind == "timestep" else t / self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Any) -> torch.Tensor:
        """The flow path at train timestep ``t`` (one for the batch or one per sample):
        ``(1 - s) x0 + s noise`` with ``s = t / T``, in x0's dtype."""
        s = torch.as_tensor(t, dtype=_F64, device=x0.device) / self.num_train_timesteps
        if s.dim() == 1:
            s = s.reshape(-1, *([1] * (x0.dim() - 1)))
        return ((1.0 - s) * x0.to(_F64) + s * noise.to(_F64)).to(x0.dtype)


def mixture_velocity(
    gmm: Any,
    schedule: FlowSchedule | None = None,
    conditioning: str = "timestep",
    *,
    component: int | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The exact velocity model of a Gaussian mixture (``fastdiff.gmm``) on the flow path.

    ``x_s`` is a VP state scaled by ``c = sqrt((1 - s)^2 + s^2)``: ``x_s / c`` has
    ``alpha_bar = (1 - s)^2 / c^2``; so ``x0 = E[x0 | x_s]`` is the mixture's VP posterior mean
    there and ``v = (x_s - x0) / s`` (finite at s = 1, where ``x0 = E[x0]``).

    Args:
        gmm: a ``fastdiff.gmm.GaussianMixture``.
        schedule: the :class:`FlowSchedule` (default: T = 1000).
        conditioning: what ``cond`` is: "timestep" (``t = s T``) or "sigma" (``s``).
        component: the class-conditional velocity of one component.

    Returns:
        ``model(x, cond) -> v``: x ``[B, d]``, cond ``[B]`` or a scalar; v in x's dtype.

    Example:
        >>> model = mixture_velocity(gmm)
        >>> x = fastdiff.sample(model, FlowMatchEulerSampler(FlowSchedule(), 50), shape=(4, 2))
    """
    schedule = schedule if schedule is not None else FlowSchedule()
    check_choice("conditioning", conditioning, FLOW_CONDITIONINGS)
    T = schedule.num_train_timesteps

    def velocity(x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(cond, device=x.device).to(_F64).expand(x.shape[0])
        s = s / T if conditioning == "timestep" else s
        one_minus = 1.0 - s
        c2 = one_minus**2 + s**2
        x64 = x.to(_F64)
        x0 = gmm.posterior_mean(x64 / c2.sqrt()[:, None], one_minus**2 / c2, component)
        return ((x64 - x0) / s[:, None]).to(x.dtype)

    return velocity
