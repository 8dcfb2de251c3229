"""The VP samplers on the fused step: DDPM, DDIM, Euler, Euler ancestral and
DPM-Solver++(2M) (the base class ``Sampler`` and ``StepOutput`` are in
``fastdiff.sampler_base``, re-exported here).

Example:
    >>> sampler = DDIMSampler(NoiseSchedule.create("linear", 1000), 50)
"""

from __future__ import annotations

import torch

from fastdiff import reference, tables
from fastdiff.checks import check_choice, check_number
from fastdiff.sampler_base import Sampler, StepOutput, broadcast_over

__all__ = [
    "SAMPLERS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "Sampler",
    "StepOutput",
]


class DDPMSampler(Sampler):
    """Ancestral sampling with the DDPM posterior (Ho et al. 2020, eq. 6-7; respaced betas
    ``beta' = 1 - ab_t / ab_next`` as improved-diffusion does).

    Args:
        variance_type: "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
            "learned" (the model's extra channels are the log variance, improved-diffusion) or
            "learned_range" (Nichol & Dhariwal 2021, eq. 15).
        **kwargs: see ``Sampler``.
    """

    stochastic = True

    def __init__(self, schedule, steps=1000, *, variance_type="fixed_small", **kwargs) -> None:
        self.variance_type = check_choice("variance_type", variance_type, reference.VARIANCE_TYPES)
        super().__init__(schedule, steps, **kwargs)

    def _variance_mode(self) -> str:
        return self.variance_type if self.variance_type.startswith("learned") else "fixed"

    def _build_table(self) -> torch.Tensor:
        # no noise on the step to clean data
        ab, ab_next = self.alpha_bar, self.alpha_bar_next
        return tables.ddpm_table(
            ab, ab_next, self.prediction_type, self.variance_type, add_noise=ab_next < 1.0
        )

    def _reference_step(self, x, m, v, i, x0_prev, noise, grad):
        model_output = m if v is None else torch.cat([m, v], dim=1)
        return self._reference_call(
            reference.ddpm_step, x, model_output, *self._ab(x, i),
            variance_type=self.variance_type, noise=noise, grad=grad,
        )  # fmt: skip


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12 with sigma of eq. 16 scaled by ``eta``).

    Args:
        eta: 0 for the deterministic DDIM, 1 for DDPM-like ancestral noise.
        use_clipped_model_output: re-derive eps from the processed x0 (as diffusers).
        **kwargs: see ``Sampler``.
    """

    def __init__(self, schedule, steps=50, *, eta=0.0, use_clipped_model_output=False, **kwargs):
        self.eta = check_number("eta", eta, low=0.0)
        self.use_clipped_model_output = bool(use_clipped_model_output)
        self.stochastic = self.eta > 0
        super().__init__(schedule, steps, **kwargs)

    def _build_table(self) -> torch.Tensor:
        ab, ab_next = self.alpha_bar, self.alpha_bar_next
        return tables.ddim_table(
            ab, ab_next, self.prediction_type, self.eta, self.use_clipped_model_output
        )

    def _reference_step(self, x, m, v, i, x0_prev, noise, grad):
        return self._reference_call(
            reference.ddim_step, x, m, *self._ab(x, i), eta=self.eta,
            use_clipped_model_output=self.use_clipped_model_output, noise=noise, grad=grad,
        )  # fmt: skip


def _sigma(ab: torch.Tensor) -> torch.Tensor:
    """k-diffusion's noise level ``sigma = sqrt((1 - ab) / ab)`` (0 for clean)."""
    return ((1.0 - ab) / ab).sqrt()


class EulerSampler(Sampler):
    """Euler in sigma space (Karras et al. 2022, Alg. 2 without churn), run in VP space.

    In sigma space ``x_s = x / sqrt(ab)``, ``d = (x_s - x0) / sigma`` and
    ``x_s' = x_s + (sigma_down - sigma) d + sigma_up z``; the VP state is ``sqrt(ab') x_s'``.
    Plain Euler has ``sigma_down = sigma'`` and no noise.
    """

    eta = 0.0

    def _build_table(self) -> torch.Tensor:
        return tables.euler_table(
            _sigma(self.alpha_bar), _sigma(self.alpha_bar_next), self.prediction_type, self.eta
        )

    def _reference_step(self, x, m, v, i, x0_prev, noise, grad):
        ab, an = self._ab(x, i)
        x_sigma = x / broadcast_over(ab.sqrt(), x)
        x_next, x0 = self._sigma_space_step(x_sigma, m, _sigma(ab), _sigma(an), noise)
        x_next = x_next * broadcast_over(an.sqrt(), x_next).to(x_next.dtype)
        if grad is not None:  # condition_mean: + (variance of the step's VP noise) x grad
            _, sigma_up = reference.ancestral_sigmas(_sigma(ab), _sigma(an), self.eta)
            x_next = x_next + broadcast_over(an * sigma_up**2, x_next).to(x_next.dtype) * grad
        return x_next, x0

    def _sigma_space_step(self, x_sigma, m, sigma, sigma_next, noise):
        return self._reference_call(reference.euler_step, x_sigma, m, sigma, sigma_next)


class EulerAncestralSampler(EulerSampler):
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``), run in VP space.

    Args:
        eta: scales the ancestral noise (``sigma_up``); 1 is k-diffusion's default.
        **kwargs: see ``Sampler``.
    """

    def __init__(self, schedule, steps=50, *, eta=1.0, **kwargs):
        self.eta = check_number("eta", eta, low=0.0)
        self.stochastic = self.eta > 0
        super().__init__(schedule, steps, **kwargs)

    def _sigma_space_step(self, x_sigma, m, sigma, sigma_next, noise):
        return self._reference_call(
            reference.euler_ancestral_step, x_sigma, m, sigma, sigma_next, eta=self.eta, noise=noise
        )


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form), first order on the first
    and the last step (the step to clean data has an infinite log-SNR step ``h``).

    Pass the previous step's x0 as ``x0_prev``; without it (a chain's first step) the step
    is first order. Prefer ``timestep_spacing="trailing"`` (or "linspace"): a "leading" plan
    ends at t = 0, and its last second-order step (r ~ 0.34 for 20 steps) inflates the
    variance of the samples (diffusers' own "leading" for this solver never visits t = 0).
    """

    multistep = True

    def _build_table(self) -> torch.Tensor:
        first_order = torch.zeros(self.num_steps, dtype=torch.bool)
        first_order[0] = first_order[-1] = True
        return tables.dpmpp_2m_table(
            self.alpha_bar,
            self.alpha_bar_next,
            self.alpha_bar_prev,
            self.prediction_type,
            first_order,
        )

    def _reference_step(self, x, m, v, i, x0_prev, noise, grad):
        first_order = self._first_order(i, x)
        ab, ab_next = self._ab(x, i)
        x1, x0 = self._reference_call(reference.dpmpp_multistep_step, x, m, ab, ab_next)
        if x0_prev is None or first_order is True:
            return x1, x0
        ab_prev = self._values(x, i)["alpha_bar_prev"]
        ab_prev = torch.where(ab_prev < 1.0, ab_prev, 0.5)
        x2, _ = self._reference_call(
            reference.dpmpp_multistep_step, x, m, ab, ab_next, history=[(x0_prev, ab_prev)]
        )
        if first_order is False:
            return x2, x0
        return torch.where(broadcast_over(first_order, x), x1, x2), x0

    def _first_order(self, i, x):
        """True / False for an int step, a per-sample bool tensor otherwise."""
        if isinstance(i, int):
            return i == 0 or i == self.num_steps - 1
        return (i == 0) | (i == self.num_steps - 1)


SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "euler": EulerSampler,
    "euler_ancestral": EulerAncestralSampler,
    "dpmpp_2m": DPMSolverPP2MSampler,
}
