"""Native flow-matching samplers: Euler (deterministic or stochastic) and DPM-Solver++(2M) on
the flow path ``x_s = (1 - s) x0 + s eps`` (``fastdiff.flow``).

They are ``fastdiff.samplers.Sampler`` subclasses: the same ``step`` (one fused kernel launch
gathering a row of a float64-built coefficient table, or the plain reference), the same use
with ``fastdiff.sample``, guidance and CUDA graphs. What differs from the VP base is the plan:
a descending sigma plan ``1 >= s_0 > ... > s_{n-1} > s_n = 0`` (:func:`fastdiff.flow.flow_sigmas`)
instead of train timesteps; the state starts at pure noise N(0, I) (s = 1); the model is
conditioned on ``t = s T`` ("timestep") or on ``s`` ("sigma").

``alpha_bar`` (and ``_next`` / ``_prev``) hold the VP noise level of each step's state:
``x_s / sqrt((1 - s)^2 + s^2)`` is a VP state with ``alpha_bar = (1 - s)^2 / ((1 - s)^2 + s^2)``.

Example::

    sampler = FlowMatchEulerSampler(FlowSchedule(), 28, shift=3.0)
    x = fastdiff.sample(transformer_velocity, sampler, shape=(1, 16, 128, 128), seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff import flow_tables, reference
from fastdiff.flow import (
    FLOW_CONDITIONINGS,
    FLOW_PREDICTION_TYPES,
    FlowSchedule,
    flow_sigmas,
)
from fastdiff.samplers import Sampler
from fastdiff.unipc import UniPCMixin

__all__ = [
    "FLOW_SAMPLERS",
    "FlowDPMSolverPP2MSampler",
    "FlowMatchEulerSampler",
    "FlowSampler",
    "FlowUniPCSampler",
]


def _vp_alpha_bar(s: torch.Tensor) -> torch.Tensor:
    return (1.0 - s) ** 2 / ((1.0 - s) ** 2 + s**2)


class FlowSampler(Sampler):
    """Base class of the flow samplers: the sigma plan, the table, and ``Sampler.step``.

    Args:
        schedule: the :class:`fastdiff.flow.FlowSchedule` (None: T = 1000).
        steps: number of steps n, or the custom base levels (a strictly decreasing sequence
            in (0, 1], shifted like the grid: diffusers' ``sigmas=``).
        shift: static shift (SD3: 3.0); ignored with ``mu``.
        mu: dynamic shifting (Flux: :func:`fastdiff.flow.calculate_shift`).
        time_shift_type: "exponential" or "linear" (with ``mu``).
        shift_terminal: stretch the plan to end at this level before 0 (LTX).
        sigma_spacing: None, "karras", "exponential" or "beta" (flow_match grid).
        grid: the unshifted grid: "flow_match", "dpm" or "unipc" (see ``flow_sigmas``).
        prediction_type: "flow_prediction" (velocity), "epsilon" or "sample".
        conditioning: "timestep" (``t = s T``) or "sigma" (``s``).
        **options: ``Sampler``'s clip_sample_range, thresholding (processing of the predicted
            x0) and backend.
    """

    _default_grid = "flow_match"

    def __init__(
        self,
        schedule: FlowSchedule | None = None,
        steps: int | Sequence[float] | torch.Tensor = 28,
        *,
        shift: float = 1.0,
        mu: float | None = None,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        sigma_spacing: str | None = None,
        grid: str | None = None,
        prediction_type: str = "flow_prediction",
        conditioning: str = "timestep",
        **options,
    ) -> None:
        schedule = FlowSchedule() if schedule is None else schedule
        if not isinstance(schedule, FlowSchedule):
            raise TypeError(
                f"schedule must be a fastdiff.flow.FlowSchedule, got {type(schedule).__name__}"
                " (a flow sampler needs a flow schedule; VP schedules go with the VP samplers)"
            )
        if prediction_type == "v_prediction":
            raise ValueError(
                "prediction_type 'v_prediction' is the VP velocity of Salimans & Ho 2022, not "
                "a flow model's output; a flow model predicts 'flow_prediction' (eps - x0)"
            )
        self._set_options(
            schedule, prediction_type, conditioning, **options,
            prediction_types=FLOW_PREDICTION_TYPES, conditionings=FLOW_CONDITIONINGS,
        )  # fmt: skip
        custom = not isinstance(steps, int) or isinstance(steps, bool)
        sigmas = flow_sigmas(
            None if custom else steps,
            sigmas=steps if custom else None,
            grid=grid or self._default_grid,
            num_train_timesteps=schedule.num_train_timesteps,
            shift=shift,
            mu=mu,
            time_shift_type=time_shift_type,
            shift_terminal=shift_terminal,
            spacing=sigma_spacing,
        )
        self.sigmas = sigmas  # float64 [n + 1], the last one 0
        self.sigma, self.sigma_next = sigmas[:-1], sigmas[1:]
        self.sigma_prev = torch.cat([sigmas.new_ones(1), sigmas[:-2]])  # 1 before the first
        self.timesteps = self.sigma * schedule.num_train_timesteps
        self.alpha_bar = _vp_alpha_bar(self.sigma)
        self.alpha_bar_next = _vp_alpha_bar(self.sigma_next)
        self.alpha_bar_prev = _vp_alpha_bar(self.sigma_prev)
        self._set_table()  # (epsilon cannot give x0 at s = 1: refused there)

    def device_tables(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """``Sampler.device_tables`` plus the float64 levels ``sigma``, ``sigma_next`` and
        ``sigma_prev`` of each step (``timesteps`` is ``t = s T``)."""
        cached = super().device_tables(device)
        if "sigma" not in cached:
            target = cached["table"].device
            for name in ("sigma", "sigma_next", "sigma_prev"):
                cached[name] = getattr(self, name).to(target)
        return cached

    def _levels(self, x: torch.Tensor, i) -> tuple[torch.Tensor, ...]:
        """s, s', s_prev of step i on x's device (per sample when i is a tensor)."""
        found = self.device_tables(x.device)
        names = ("sigma", "sigma_next", "sigma_prev")
        if isinstance(i, torch.Tensor):  # take, not [i]: a 0-d index tensor would sync
            return tuple(found[k].take(i) for k in names)
        return tuple(found[k][i] for k in names)

    @property
    def _processed(self) -> bool:
        return self.clip_sample_range is not None or self.thresholding is not None


class FlowMatchEulerSampler(FlowSampler):
    """Euler on the flow ODE (Liu et al. 2023): ``x' = x + (s' - s) v``, as diffusers'
    ``FlowMatchEulerDiscreteScheduler``; with ``stochastic=True`` each step puts the
    predicted x0 back on the path with fresh noise, ``x' = (1 - s') x0 + s' z``.

    Args:
        stochastic: the stochastic form (diffusers' ``stochastic_sampling``).
        **kwargs: see :class:`FlowSampler`.

    Example:
        >>> sampler = FlowMatchEulerSampler(FlowSchedule(), 4, mu=calculate_shift(4096))
    """

    def __init__(self, schedule=None, steps=28, *, stochastic: bool = False, **kwargs) -> None:
        self.stochastic = bool(stochastic)
        super().__init__(schedule, steps, **kwargs)

    def _build_table(self) -> torch.Tensor:
        return flow_tables.flow_euler_table(
            self.sigma, self.sigma_next, self.prediction_type, self.stochastic, self._processed
        )

    def _reference_step(self, x, m, v, i, x0_prev, noise, grad):
        s, s_next, _ = self._levels(x, i)
        if self.stochastic:
            return self._reference_call(
                reference.flow_stochastic_step, x, m, s, s_next, noise=noise, grad=grad
            )
        return self._reference_call(reference.flow_euler_step, x, m, s, s_next)


class FlowDPMSolverPP2MSampler(FlowSampler):
    """DPM-Solver++(2M) (Lu et al. 2022) on the flow path (``alpha = 1 - s``, ``sigma = s``),
    as diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True)`` (Sana); first order on
    the first step (no previous x0: ``s_prev = 1``) and on the last (to s' = 0). The plan's
    first level must be below 1 (log-SNR finite): the default "dpm" grid starts at
    ``shift(1 - 1/T)``.

    Pass the previous step's x0 as ``x0_prev`` (``fastdiff.sample`` does); without it the step
    is first order.

    Example:
        >>> sampler = FlowDPMSolverPP2MSampler(FlowSchedule(), 20, shift=3.0)
    """

    multistep = True
    _default_grid = "dpm"

    def __init__(self, schedule=None, steps=20, **kwargs) -> None:
        super().__init__(schedule, steps, **kwargs)

    def _build_table(self) -> torch.Tensor:
        if not float(self.sigma[0]) < 1.0:
            raise ValueError(
                "FlowDPMSolverPP2MSampler needs a first level below 1 (alpha = 1 - s > 0 for "
                f"the log-SNR), got {float(self.sigma[0])}; use grid='dpm' or custom sigmas < 1"
            )
        s, sn, sp = self.sigma, self.sigma_next, self.sigma_prev
        # first order where there is no previous step (s_prev = 1: lambda_prev = -inf, r = inf)
        # and on the step to clean (s' = 0)
        return flow_tables.dpmpp_2m_table_as(
            1.0 - s, s, 1.0 - sn, sn, 1.0 - sp, sp, self.prediction_type, sp >= 1.0
        )

    def _reference_step(self, x, m, v, i, x0_prev, noise, grad):
        s, s_next, s_prev = self._levels(x, i)
        history = () if x0_prev is None else [(x0_prev, s_prev)]
        return self._reference_call(
            reference.dpmpp_multistep_step, x, m, s, s_next, history=history, space="flow"
        )


class FlowUniPCSampler(UniPCMixin, FlowSampler):
    """UniPC (Zhao et al. 2023) on the flow path (``UniPCMixin`` on a ``FlowSampler`` plan):
    ``alpha_t = 1 - s``, ``sigma_t = s``, then clean data; as diffusers'
    ``UniPCMultistepScheduler(use_flow_sigmas=True)`` (Wan). The default "unipc" grid starts
    below 1 (a finite log-SNR).

    Args:
        schedule, steps: see :class:`FlowSampler`.
        solver_order, solver_type, predict_x0, lower_order_final, disable_corrector: see
            ``fastdiff.unipc.UniPCMixin``.
        **kwargs: :class:`FlowSampler`'s (shift, mu, prediction_type, conditioning, ...).

    Example:
        >>> sampler = FlowUniPCSampler(FlowSchedule(), 20, shift=3.0)
    """

    _default_grid = "unipc"

    def __init__(self, schedule=None, steps=20, **kwargs) -> None:
        super().__init__(schedule, steps, **kwargs)

    def noise_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        return 1.0 - self.sigmas, self.sigmas


FLOW_SAMPLERS: dict[str, type[FlowSampler]] = {
    "flow_euler": FlowMatchEulerSampler,
    "flow_dpmpp_2m": FlowDPMSolverPP2MSampler,
    "flow_unipc": FlowUniPCSampler,
}
