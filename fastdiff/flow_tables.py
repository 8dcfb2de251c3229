"""Per-step coefficient tables on a state ``x = alpha x0 + sigma eps`` (flow matching:
``alpha = 1 - s``, ``sigma = s``), used by ``fastdiff.flow_samplers``, the flow diffusers
drop-ins and DPM-Solver++(2M) in any space. Rows and columns as ``fastdiff.tables``
(``COL``): float64 CPU tensors in and out.

Example:
    >>> table = flow_euler_table(sigma, sigma_next, "flow_prediction", stochastic=False)
"""

from __future__ import annotations

import torch

from fastdiff.kernels.fused_step import COLUMNS
from fastdiff.tables import COL, dpmpp_2m_sde_table

__all__ = [
    "dpmpp_2m_sde_table_as",
    "dpmpp_2m_table_as",
    "dpmpp_3m_table_as",
    "flow_euler_table",
    "x0_coefficients_as",
]


def x0_coefficients_as(
    alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x0 = x0_x x + x0_m m`` for a state ``x = alpha x0 + sigma eps`` (VP: alpha =
    sqrt(ab), sigma = sqrt(1 - ab); flow: alpha = 1 - s, sigma = s).

    "flow_prediction" (v = eps - x0 on the flow path): ``x0 = x - sigma v``; "epsilon":
    ``(x - sigma eps) / alpha``; "sample": ``m``; "v_prediction": ``alpha x - sigma v``
    (diffusers' rule, exact where alpha^2 + sigma^2 = 1).
    """
    if prediction_type == "flow_prediction":
        return torch.ones_like(sigma), -sigma
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "sample":
        return torch.zeros_like(sigma), torch.ones_like(sigma)
    if prediction_type == "v_prediction":
        return alpha, -sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def _flow_rows(alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    table = torch.zeros(len(sigma), len(COLUMNS), dtype=torch.float64)
    table[:, COL["x0_x"]], table[:, COL["x0_m"]] = x0_coefficients_as(alpha, sigma, prediction_type)
    return table


def flow_euler_table(
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    prediction_type: str = "flow_prediction",
    stochastic: bool = False,
    processed: bool = False,
) -> torch.Tensor:
    """Euler on the flow path (Liu et al. 2023), ``x' = x + (s' - s) v``, and its stochastic
    form ``x' = (1 - s') x0 + s' z`` (diffusers' ``stochastic_sampling``).

    A velocity output goes straight into the update (``X = 1, M = s' - s``, as diffusers
    computes it); other outputs, and a processed (clipped / thresholded) x0, go through
    ``v = (x - x0) / s``: ``X = s' / s``, ``X0 = 1 - s' / s``.

    Args:
        sigma, sigma_next: float64 levels [n] of each step and of the next (0: clean).
        prediction_type: "flow_prediction", "epsilon" or "sample".
        stochastic: the stochastic form (``std = s'``).
        processed: x0 is clipped or thresholded in the kernel.
    """
    table = _flow_rows(1.0 - sigma, sigma, prediction_type)
    if stochastic:
        table[:, COL["x0"]] = 1.0 - sigma_next
        table[:, COL["std"]] = sigma_next
    elif prediction_type == "flow_prediction" and not processed:
        table[:, COL["x"]] = 1.0
        table[:, COL["m"]] = sigma_next - sigma
    else:
        table[:, COL["x"]] = sigma_next / sigma
        table[:, COL["x0"]] = 1.0 - sigma_next / sigma
    return table


def dpmpp_2m_table_as(
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    alpha_next: torch.Tensor,
    sigma_next: torch.Tensor,
    alpha_prev: torch.Tensor,
    sigma_prev: torch.Tensor,
    prediction_type: str,
    first_order: torch.Tensor,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022 Alg. 2, midpoint) for any ``x = alpha x0 + sigma eps``
    (:func:`dpmpp_2m_table` is the VP case; flow has alpha = 1 - s, sigma = s)::

        lambda = log(alpha / sigma),  h = lambda' - lambda,  r = h_prev / h
        x' = (sigma' / sigma) x + alpha' (1 - e^-h) (x0 + (x0 - x0_prev) / (2 r))

    first order where ``first_order`` is set (the previous step's values are then unused) and
    on the step to clean (``sigma_next = 0``: h is infinite).

    Args:
        alpha, sigma: float64 [n] of each step; ``alpha_next, sigma_next``: of the step it goes
            to (1, 0 for clean); ``alpha_prev, sigma_prev``: of the previous visited step.
        prediction_type: see :func:`x0_coefficients_as`.
        first_order: bool [n].
    """
    exp_neg_h = alpha * sigma_next / (sigma * alpha_next)  # e^(lambda - lambda'), finite at 0
    gain = alpha_next * (1.0 - exp_neg_h)
    table = _flow_rows(alpha, sigma, prediction_type)
    table[:, COL["x"]] = sigma_next / sigma
    table[:, COL["x0"]] = gain
    second = ~first_order & (sigma_next > 0)
    if second.any():
        # log-SNRs; placeholders (0) where the row is first order and they are not read
        def lam(a, s):
            return torch.where(second, (a / s).log(), 0.0)

        h = lam(alpha_next, sigma_next) - lam(alpha, sigma)
        h_prev = lam(alpha, sigma) - lam(alpha_prev, sigma_prev)
        half_inv_r = torch.where(second, 0.5 * h / torch.where(second, h_prev, 1.0), 0.0)
        table[:, COL["x0"]] = gain * (1.0 + half_inv_r)
        table[:, COL["x0_prev"]] = -gain * half_inv_r
    return table


def dpmpp_2m_sde_table_as(
    levels: tuple[torch.Tensor, ...],
    prediction_type: str,
    first_order: torch.Tensor,
    eta: float,
    solver_type: str,
) -> torch.Tensor:
    """DPM-Solver++(2M), its SDE form and the "heun" form (Lu et al. 2022; diffusers'
    ``sde-dpmsolver++`` is ``eta = 1``, ``dpmsolver++`` with ``solver_type="heun"`` is
    ``eta = 0``) for any ``x = alpha x0 + sigma eps``: :func:`fastdiff.tables.dpmpp_2m_sde_table`
    (the rule in k-diffusion's space ``x / alpha``, levels ``sigma / alpha``) with the state
    scaled back, ``x' = alpha' x_k'``::

        x' = (sigma' / sigma) e^(-eta h) x + alpha' (g x0 + (c / r) (x0 - x0_prev))
             + sigma' sqrt(1 - e^(-2 eta h)) z

    A step with ``h = 0`` is first order (the heun coefficient's limit): ``x' = x``; one with
    ``h < 0`` (to a higher level) adds no noise (its variance would be negative).

    Args:
        levels: ``(alpha, sigma, alpha_next, sigma_next, alpha_prev, sigma_prev)``, float64
            [n] each, as :func:`dpmpp_2m_table_as` takes them.
        prediction_type, first_order: as :func:`dpmpp_2m_table_as`.
        eta: the SDE's noise scale (0: the ODE).
        solver_type: "midpoint" or "heun".
    """
    alpha, sigma, alpha_next, sigma_next, alpha_prev, sigma_prev = levels
    k, k_next = sigma / alpha, sigma_next / alpha_next
    table = dpmpp_2m_sde_table(
        k,
        k_next,
        sigma_prev / alpha_prev,
        first_order | (k_next == k),  # h = 0 (a plan ending at its last level): x' = x
        eta,
        1.0,
        solver_type,
    )
    # h < 0 (a final sigma_min above the plan's last level): the variance 1 - e^(-2 eta h)
    # is negative, diffusers' sqrt is NaN; no noise
    table[:, COL["std"]] = torch.where(k_next > k, 0.0, table[:, COL["std"]])
    table[:, COL["x"]] *= alpha_next / alpha
    for name in ("x0", "x0_prev", "std"):
        table[:, COL[name]] *= alpha_next
    table[:, COL["x0_x"]], table[:, COL["x0_m"]] = x0_coefficients_as(alpha, sigma, prediction_type)
    return table


def dpmpp_3m_table_as(
    levels: tuple[torch.Tensor, ...], prediction_type: str, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Third-order multistep DPM-Solver++ (the 3M update of diffusers' ``DPMSolverMultistep
    Scheduler``; Lu et al. 2022, arXiv:2206.00927 App. B in data prediction) and its SDE form
    (``eta = 1``), for any ``x = alpha x0 + sigma eps``, expanded into coefficients of x0 and
    the two previous x0s (P1, P2). With ``H = (1 + eta) h``, ``phi = 1 - e^-H``,
    ``r0 = h_0 / h``, ``r1 = h_1 / h``, ``q = r0 / (r0 + r1)``::

        D1_0 = (x0 - P1) / r0,  D1_1 = (P1 - P2) / r1,  delta = D1_0 - D1_1
        x' = (sigma' / sigma) e^(-eta h) x + alpha' (phi x0 + c1 (D1_0 + q delta)
             + c2 delta / (r0 + r1)) + sigma' sqrt(1 - e^(-2 eta h)) z

    ``c1 = 1 - phi / H``, ``c2 = (phi - H) / H^2 + 1/2`` (ODE) or ``- 1/2`` (SDE, diffusers'
    coefficient). A row with ``h = 0`` is ``x' = x``.

    Args:
        levels: ``(alpha, sigma, alpha_next, sigma_next, alpha_prev, sigma_prev, alpha_prev2,
            sigma_prev2)``, float64 [n] each: the step, the next, the two previous ones.
        prediction_type: see :func:`x0_coefficients_as`.
        eta: 1 (SDE) or 0 (ODE).

    Returns:
        ``(table, c_prev2)``: the table (P1's coefficient in ``x0_prev``) and P2's [n].
    """
    alpha, sigma, alpha_n, sigma_n, alpha_p, sigma_p, alpha_p2, sigma_p2 = levels
    lam, lam_p, lam_p2 = ((a / s).log() for a, s in ((alpha, sigma), (alpha_p, sigma_p),
                                                     (alpha_p2, sigma_p2)))  # fmt: skip
    h = (alpha_n / sigma_n).log() - lam
    moving = h != 0
    h = torch.where(moving, h, 1.0)  # placeholder: the row is x' = x
    big_h = (1.0 + eta) * h
    phi = -torch.expm1(-big_h)
    r0, r1 = (lam - lam_p) / h, (lam_p - lam_p2) / h
    q = r0 / (r0 + r1)
    c1 = 1.0 - phi / big_h
    c2 = (phi - big_h) / big_h**2 + (-0.5 if eta else 0.5)
    # D1 = D1_0 + q delta and D2 = delta / (r0 + r1), in x0, P1, P2
    delta = (1.0 / r0, -(1.0 / r0 + 1.0 / r1), 1.0 / r1)
    d1_0 = (1.0 / r0, -1.0 / r0, torch.zeros_like(r0))
    coef = [alpha_n * (c1 * (a + q * d) + c2 * d / (r0 + r1)) for a, d in zip(d1_0, delta)]
    table = _flow_rows(alpha, sigma, prediction_type)
    decay = torch.exp(-eta * h)
    table[:, COL["x"]] = torch.where(moving, sigma_n / sigma * decay, 1.0)
    table[:, COL["x0"]] = torch.where(moving, alpha_n * phi + coef[0], 0.0)
    table[:, COL["x0_prev"]] = torch.where(moving, coef[1], 0.0)
    if eta:
        std = sigma_n * (-torch.expm1(-2.0 * eta * h)).clamp_min(0.0).sqrt()
        table[:, COL["std"]] = torch.where(moving, std, 0.0)
    return table, torch.where(moving, coef[2], 0.0)
