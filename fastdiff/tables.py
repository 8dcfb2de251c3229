"""Per-step coefficient tables: each sampler as a rule from schedule values to table rows.

A row holds the coefficients of ``fastdiff.kernels.fused_step`` (``COLUMNS``)::

    x0     = process(x0_x * x + x0_m * m)
    x_next = x * x + x0 * x0 + m * m + x0_prev * x0_prev + std * z

Every function takes float64 CPU tensors ``[n]`` of schedule values of the n steps (``ab``:
alpha_bar at the step, ``ab_next`` at the step it goes to, 1 for clean) and returns a float64
``[n, len(COLUMNS)]`` table. They are used by ``fastdiff.samplers`` (VP-space state) and by
the diffusers adapter (diffusers' own timestep rules, sigma-space Euler). The flow-matching
tables (``x = alpha x0 + sigma eps`` states) are in ``fastdiff.flow_tables``.
"""

from __future__ import annotations

import torch

from fastdiff.kernels.fused_step import COLUMNS
from fastdiff.reference import ancestral_sigmas

__all__ = [
    "COL",
    "churn_table",
    "ddim_table",
    "ddpm_table",
    "dpmpp_2m_sde_table",
    "dpmpp_2m_table",
    "eps_coefficients",
    "euler_churn_table",
    "euler_table",
    "heun_correction_table",
    "heun_table",
    "lcm_table",
    "x0_coefficients",
]

COL = {name: k for k, name in enumerate(COLUMNS)}


def _empty(n: int) -> torch.Tensor:
    return torch.zeros(n, len(COLUMNS), dtype=torch.float64)


def x0_coefficients(ab: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x0 = x0_x x + x0_m m`` in VP space (Ho et al. 2020 eq. 15; v-prediction of Salimans
    & Ho 2022: ``x0 = sqrt(ab) x - sqrt(1 - ab) v``)."""
    if prediction_type == "epsilon":
        return 1.0 / ab.sqrt(), -(1.0 - ab).sqrt() / ab.sqrt()
    if prediction_type == "sample":
        return torch.zeros_like(ab), torch.ones_like(ab)
    if prediction_type == "v_prediction":
        return ab.sqrt(), -(1.0 - ab).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def eps_coefficients(ab: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``eps = e_x x + e_m m`` from the raw model output (eq. 4 solved for eps)."""
    if prediction_type == "epsilon":
        return torch.zeros_like(ab), torch.ones_like(ab)
    if prediction_type == "sample":
        return 1.0 / (1.0 - ab).sqrt(), -ab.sqrt() / (1.0 - ab).sqrt()
    if prediction_type == "v_prediction":
        return (1.0 - ab).sqrt(), ab.sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def _with_x0(ab: torch.Tensor, prediction_type: str) -> torch.Tensor:
    table = _empty(len(ab))
    table[:, COL["x0_x"]], table[:, COL["x0_m"]] = x0_coefficients(ab, prediction_type)
    return table


def ddpm_table(
    ab: torch.Tensor,
    ab_next: torch.Tensor,
    prediction_type: str,
    variance_type: str,
    add_noise: torch.Tensor,
) -> torch.Tensor:
    """DDPM posterior q(x_t' | x_t, x0) (Ho et al. 2020 eq. 6-7) with the respaced
    ``beta' = 1 - ab / ab_next``.

    Args:
        ab, ab_next: alpha_bar at the step and at the step it goes to.
        prediction_type: "epsilon", "sample" or "v_prediction".
        variance_type: fixed_small(_log), fixed_large(_log), learned, learned_range.
        add_noise: bool [n]: whether the step adds noise.

    Returns:
        The float64 table; for learned variances ``std`` is the 0/1 noise flag and the
        kernel multiplies it by ``exp(log_var / 2)``.
    """
    beta = 1.0 - ab / ab_next
    table = _with_x0(ab, prediction_type)
    table[:, COL["x"]] = (ab / ab_next).sqrt() * (1.0 - ab_next) / (1.0 - ab)
    table[:, COL["x0"]] = ab_next.sqrt() * beta / (1.0 - ab)
    var_small = ((1.0 - ab_next) / (1.0 - ab) * beta).clamp_min(1e-20)
    if variance_type in ("fixed_small", "fixed_small_log"):
        std = var_small.sqrt()
    elif variance_type in ("fixed_large", "fixed_large_log"):
        std = beta.sqrt()
    elif variance_type in ("learned", "learned_range"):
        std = torch.ones_like(ab)
        if variance_type == "learned_range":
            # Nichol & Dhariwal 2021 eq. 15 interpolates log(var_small) and log(beta');
            # log(beta') is -inf only where beta' = 0, a step that adds no noise.
            ok = add_noise & (beta > 0)
            table[:, COL["log_var_min"]] = torch.where(ok, var_small.log(), 0.0)
            table[:, COL["log_var_max"]] = torch.where(ok, beta.clamp_min(1e-300).log(), 0.0)
    else:
        raise ValueError(f"unknown variance_type {variance_type!r}")
    table[:, COL["std"]] = torch.where(add_noise, std, 0.0)
    return table


def ddim_table(
    ab: torch.Tensor,
    ab_next: torch.Tensor,
    prediction_type: str,
    eta: float,
    use_clipped_model_output: bool,
) -> torch.Tensor:
    """DDIM (Song et al. 2021 eq. 12, sigma of eq. 16 scaled by eta)::

        x' = sqrt(ab') x0 + sqrt(1 - ab' - s^2) eps + s z

    with eps from the raw model output, or re-derived from the processed x0
    (``use_clipped_model_output``).
    """
    sigma = eta * ((1.0 - ab_next) / (1.0 - ab) * (1.0 - ab / ab_next)).sqrt()
    direction = (1.0 - ab_next - sigma**2).clamp_min(0.0).sqrt()
    table = _with_x0(ab, prediction_type)
    if use_clipped_model_output:
        # eps = (x - sqrt(ab) x0) / sqrt(1 - ab)
        table[:, COL["x"]] = direction / (1.0 - ab).sqrt()
        table[:, COL["x0"]] = ab_next.sqrt() - direction * ab.sqrt() / (1.0 - ab).sqrt()
    else:
        e_x, e_m = eps_coefficients(ab, prediction_type)
        table[:, COL["x"]] = direction * e_x
        table[:, COL["x0"]] = ab_next.sqrt()
        table[:, COL["m"]] = direction * e_m
    table[:, COL["std"]] = sigma
    return table


def euler_table(
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    prediction_type: str,
    eta: float = 0.0,
    space: str = "vp",
) -> torch.Tensor:
    """Euler / Euler ancestral (Karras et al. 2022 Alg. 2; k-diffusion) in sigma space,
    ``x_s' = x_s + (sigma_down - sigma) (x_s - x0) / sigma + sigma_up z``.

    Args:
        sigma, sigma_next: k-diffusion noise levels ``sqrt((1 - ab) / ab)`` (inf allowed for
            sigma, 0 for clean).
        prediction_type: "epsilon", "sample" or "v_prediction".
        eta: ancestral noise scale (0: plain Euler).
        space: "vp": the state is ``x = x_s / sqrt(1 + sigma^2)`` (fastdiff's samplers);
            "sigma": the state is ``x_s`` (diffusers' Euler schedulers, k-diffusion).
    """
    sigma_down, sigma_up = (
        ancestral_sigmas(sigma, sigma_next, eta)
        if eta > 0
        else (sigma_next, torch.zeros_like(sigma))
    )
    finite = torch.isfinite(sigma)
    # ratio = sigma_down / sigma, 0 when sigma is infinite (zero terminal SNR).
    ratio = torch.where(finite, sigma_down / torch.where(finite, sigma, 1.0), 0.0)
    if space == "vp":
        ab = torch.where(finite, 1.0 / (1.0 + sigma**2), 0.0)
        ab_next = 1.0 / (1.0 + sigma_next**2)
        table = _with_x0(ab, prediction_type)
        # x_s = x / sqrt(ab) and x' = sqrt(ab') x_s', so X = sqrt(ab') ratio / sqrt(ab)
        # = sqrt(ab') sigma_down / sqrt(1 - ab) (finite at ab = 0).
        table[:, COL["x"]] = ab_next.sqrt() * sigma_down / (1.0 - ab).sqrt()
        table[:, COL["x0"]] = ab_next.sqrt() * (1.0 - ratio)
        table[:, COL["std"]] = ab_next.sqrt() * sigma_up
        return table
    if space != "sigma":
        raise ValueError(f"space must be 'vp' or 'sigma', got {space!r}")
    table = _empty(len(sigma))
    if prediction_type == "epsilon":
        table[:, COL["x0_x"]], table[:, COL["x0_m"]] = 1.0, -sigma
    elif prediction_type == "v_prediction":
        table[:, COL["x0_x"]] = 1.0 / (sigma**2 + 1.0)
        table[:, COL["x0_m"]] = -sigma / (sigma**2 + 1.0).sqrt()
    elif prediction_type == "sample":
        table[:, COL["x0_m"]] = 1.0
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    table[:, COL["x"]] = ratio
    table[:, COL["x0"]] = 1.0 - ratio
    table[:, COL["std"]] = sigma_up
    return table


def dpmpp_2m_table(
    ab: torch.Tensor,
    ab_next: torch.Tensor,
    ab_prev: torch.Tensor,
    prediction_type: str,
    first_order: torch.Tensor,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022 Alg. 2, midpoint form as diffusers' "midpoint").

    With ``lambda = log(alpha / sigma)``, ``alpha = sqrt(ab)``, ``sigma = sqrt(1 - ab)``,
    ``h = lambda' - lambda`` and ``r = h_prev / h``::

        x' = (sigma' / sigma) x + alpha' (1 - e^-h) (x0 + (x0 - x0_prev) / (2 r))

    first order (no x0_prev term) where ``first_order`` is set.

    Args:
        ab, ab_next: alpha_bar at the step and at the next one (1 for clean).
        ab_prev: alpha_bar of the previous visited step (ignored on first-order steps).
        prediction_type: "epsilon", "sample" or "v_prediction".
        first_order: bool [n].
    """
    alpha, sigma = ab.sqrt(), (1.0 - ab).sqrt()
    alpha_n, sigma_n = ab_next.sqrt(), (1.0 - ab_next).sqrt()
    exp_neg_h = alpha * sigma_n / (sigma * alpha_n)  # exp(lambda - lambda'), finite at the ends
    gain = alpha_n * (1.0 - exp_neg_h)
    table = _with_x0(ab, prediction_type)
    table[:, COL["x"]] = sigma_n / sigma
    table[:, COL["x0"]] = gain
    second = ~first_order
    if second.any():
        # log-SNRs of the previous, current and next step; only second-order rows are read.
        def lam(a):
            return 0.5 * (a / (1.0 - a)).log()

        ap = torch.where(second, ab_prev, 0.5)
        an = torch.where(second, ab_next, 0.5)
        h = lam(an) - lam(ab)
        h_prev = lam(ab) - lam(ap)
        half_inv_r = torch.where(second, 0.5 * h / h_prev, 0.0)
        table[:, COL["x0"]] = gain * (1.0 + half_inv_r)
        table[:, COL["x0_prev"]] = -gain * half_inv_r
    return table


# -- k-diffusion's samplers on a denoiser D in sigma space (``fastdiff.k_diffusion``) ---------
# The state is x = x0 + sigma eps and the model output m is D (x0_m = 1): every row below is
# the update of ``fastdiff.reference.sigma`` solved for the tensors the kernel reads.


def _denoiser_rows(n: int) -> torch.Tensor:
    table = _empty(n)
    table[:, COL["x0_m"]] = 1.0
    return table


def churn_table(sigma: torch.Tensor, sigma_hat: torch.Tensor, s_noise: float) -> torch.Tensor:
    """Karras et al. 2022 Alg. 2 lines 5-6, ``x_hat = x + S_noise sqrt(sigma_hat^2 - sigma^2) z``
    (the kernel's model output is unread: ``x0_x = x0_m = 0``)."""
    table = _empty(len(sigma))
    table[:, COL["x"]] = 1.0
    table[:, COL["std"]] = s_noise * (sigma_hat**2 - sigma**2).clamp_min(0.0).sqrt()
    return table


def euler_churn_table(
    sigma: torch.Tensor,
    sigma_hat: torch.Tensor,
    sigma_next: torch.Tensor,
    prediction_type: str,
    s_noise: float,
) -> torch.Tensor:
    """diffusers' ``EulerDiscreteScheduler.step`` with churn (Karras et al. 2022 Alg. 2 lines
    5-8, an Euler step) in one launch, on the kernel's inputs: ``x`` the sample before churn,
    ``m`` the model output (diffusers' step reads the one made at x) and ``z``. With
    ``x_hat = x + c z`` (:func:`churn_table`'s ``c``), x0 from m at x_hat (``sigma_hat`` for
    epsilon, ``sigma`` for v_prediction, as diffusers) and ``r = sigma' / sigma_hat``::

        x' = r x_hat + (1 - r) x0 = r x + (1 - r) x0(x, m) + c (r + (1 - r) x0_x) z

    and the x0 of x_hat that diffusers returns, ``x0(x, m) + c x0_x z``: the ``x0_z`` column,
    which the kernel adds to the x0 it writes with ``x0_noise=True``. ``sigma_hat = sigma``
    (gamma = 0) is :func:`euler_table`'s row.
    """
    table = euler_table(sigma_hat, sigma_next, prediction_type, 0.0, "sigma")
    if prediction_type == "v_prediction":  # diffusers' c_skip, c_out of sigma, not sigma_hat
        x0_cols = [COL["x0_x"], COL["x0_m"]]
        table[:, x0_cols] = euler_table(sigma, sigma, prediction_type, 0.0, "sigma")[:, x0_cols]
    c = churn_table(sigma, sigma_hat, s_noise)[:, COL["std"]]
    table[:, COL["x0_z"]] = c * table[:, COL["x0_x"]]
    table[:, COL["std"]] = c * table[:, COL["x"]] + table[:, COL["x0"]] * table[:, COL["x0_z"]]
    return table


def heun_table(sigma_hat: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """The second stage of Heun's step (Karras et al. 2022 Alg. 2 line 11) in the kernel's
    inputs ``x = x_2`` (the Euler-predicted sample), ``m = D_2`` and ``x0_prev = D_1``:
    ``x' = x_2 + dt (D_1 - D_2) / (2 sigma')``, ``dt = sigma' - sigma_hat``, the rule of
    :func:`heun_correction_table` (its one-launch form) for a denoiser output
    (``prediction_type="sample"``) from ``sigma_hat``. Rows with ``sigma' = 0`` (a plain
    Euler step) are NaN: never read.
    """
    table = heun_correction_table(sigma_hat, sigma_next, "sample")
    return torch.where((sigma_next > 0)[:, None], table, float("nan"))


def dpmpp_2m_sde_table(
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_prev: torch.Tensor,
    first_order: torch.Tensor,
    eta: float,
    s_noise: float,
    solver_type: str,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, SDE-DPM-Solver++(2M); k-diffusion's
    ``sample_dpmpp_2m_sde``), ``h = log(sigma / sigma')``, ``eta_h = eta h``::

        x' = (sigma'/sigma) e^-eta_h x + g D + (c / r) (D - D_prev)
             + sigma' sqrt(1 - e^(-2 eta_h)) S_noise z

    with ``g = 1 - e^(-h - eta_h)``, ``r = h_prev / h`` and ``c = g / 2`` (midpoint) or
    ``g / (-h - eta_h) + 1`` (heun); first order where ``first_order`` is set; ``x' = D`` on
    the step to ``sigma' = 0``.

    Args:
        sigma, sigma_next, sigma_prev: float64 [n] (sigma_prev unread on first-order rows).
        first_order: bool [n].
        eta, s_noise: the SDE's noise scale and k-diffusion's extra noise factor.
        solver_type: "midpoint" or "heun".
    """
    table = _denoiser_rows(len(sigma))
    last = sigma_next == 0
    s_next = torch.where(last, 1.0, sigma_next)  # placeholders on the last row
    h = sigma.log() - s_next.log()
    eta_h = eta * h
    gain = -torch.expm1(-h - eta_h)
    table[:, COL["x"]] = torch.where(last, 0.0, s_next / sigma * torch.exp(-eta_h))
    table[:, COL["x0"]] = torch.where(last, 1.0, gain)
    table[:, COL["std"]] = torch.where(
        last, 0.0, s_next * (-torch.expm1(-2.0 * eta_h)).sqrt() * s_noise
    )
    second = ~first_order & ~last
    h_prev = torch.where(second, sigma_prev, 1.0).log() - sigma.log()
    c = 0.5 * gain if solver_type == "midpoint" else gain / (-h - eta_h) + 1.0
    c_over_r = torch.where(second, c * h / torch.where(second, h_prev, 1.0), 0.0)
    table[:, COL["x0"]] += c_over_r
    table[:, COL["x0_prev"]] = -c_over_r
    return table


def lcm_table(sigma_next: torch.Tensor) -> torch.Tensor:
    """The LCM step (Luo et al. 2023 Alg. 1) in sigma space, ``x' = D + sigma' z``."""
    table = _denoiser_rows(len(sigma_next))
    table[:, COL["x0"]] = 1.0
    table[:, COL["std"]] = sigma_next
    return table


# -- Consistency models: LCM (Luo et al. 2023) and TCD (Zheng et al. 2024) -------------------
#
# One step predicts y = c_skip x + c_out x_s, with x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) eps the
# DDIM jump to level ab_s (LCM: ab_s = 1, so x_s = x0 and y is the consistency function;
# TCD: c_skip = 0, c_out = 1 and s its intermediate timestep), then re-noises it to ab_next:
# x' = sqrt(ab_next / ab_s) y + sqrt(1 - ab_next / ab_s) z (ab_next = ab_s: no noise).


def _consistency_renoise(table: torch.Tensor, ab_s: torch.Tensor, ab_next: torch.Tensor):
    ratio = ab_next / ab_s
    table[:, COL["x0"]] = ratio.sqrt()
    table[:, COL["std"]] = (1.0 - ratio).clamp_min(0.0).sqrt()
    return table


def consistency_tables(
    ab: torch.Tensor,
    ab_s: torch.Tensor,
    ab_next: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
    prediction_type: str,
    processed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LCM / TCD (see the section comment). One launch: the x0 column is ``y``, linear in x
    and m, and ``x' = sqrt(ab_next / ab_s) y + sqrt(1 - ab_next / ab_s) z``; returns
    ``(table, None)``. With x0 clipped / thresholded in the kernel (``processed``), two: the
    first writes ``y = c_skip x + c_out (sqrt(ab_s) process(x0) + sqrt(1 - ab_s) eps)`` (eps
    from the raw output) as its next sample, the second re-noises ``y`` (its x0 column is the
    input itself); returns ``(denoise, renoise)``.

    Args:
        ab, ab_s, ab_next: float64 [n] alpha_bar at the step, of the prediction and at the
            step it goes to (``ab_next = ab_s`` on rows that add no noise).
        c_skip, c_out: float64 [n] boundary scalings (TCD: 0 and 1).
        prediction_type: "epsilon", "sample" or "v_prediction".
        processed: x0 is clipped or thresholded.
    """
    table = _with_x0(ab, prediction_type)
    e_x, e_m = eps_coefficients(ab, prediction_type)
    a_s, s_s = ab_s.sqrt(), (1.0 - ab_s).sqrt()
    if not processed:
        x0_x, x0_m = table[:, COL["x0_x"]].clone(), table[:, COL["x0_m"]].clone()
        table[:, COL["x0_x"]] = c_skip + c_out * (a_s * x0_x + s_s * e_x)
        table[:, COL["x0_m"]] = c_out * (a_s * x0_m + s_s * e_m)
        return _consistency_renoise(table, ab_s, ab_next), None
    table[:, COL["x"]] = c_skip + c_out * s_s * e_x
    table[:, COL["x0"]] = c_out * a_s
    table[:, COL["m"]] = c_out * s_s * e_m
    renoise = _empty(len(ab))
    renoise[:, COL["x0_x"]] = 1.0
    return table, _consistency_renoise(renoise, ab_s, ab_next)


# -- Heun's 2nd-order method (Karras et al. 2022 Alg. 1) in sigma space ----------------------


def heun_correction_table(
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    prediction_type: str,
    midpoint: bool = False,
    processed: bool = False,
) -> torch.Tensor:
    """The second (correction) half of a Heun step (Karras et al. 2022 Alg. 1 lines 7-8) in
    sigma space, the first half being :func:`euler_table` ``(sigma, sigma_next, space="sigma")``:
    ``x_next = x_s + (s' - s) (d + d') / 2`` with ``d = (x_s - D) / s`` (D: the first half's x0),
    ``d' = (x - x0) / s'``, x0 predicted at ``s'`` from the model output at x; ``c = (s' - s) /
    (2 s')``.

    ``midpoint=False``: x is the first half's own Euler prediction ``x_s + (s' - s) d``, and
    ``x0_prev`` is D; eliminating ``x_s = (s x + (s' - s) D) / s'`` gives
    ``x_next = x + c (D - x0)`` (float32 loses ``|c|`` ulps of x and D: for ``|c|`` small).

    ``midpoint=True``: any x (e.g. blended by an inpainting loop between the halves), and
    ``x0_prev`` is the midpoint ``P = x_s + (s' - s) d / 2``: ``x_next = P + c (x - x0)``, with
    ``x - x0`` formed from x and the model output unless x0 is ``processed`` (clipped).

    Args:
        sigma, sigma_next: float64 ``[n]`` noise levels of the step (``sigma_next > 0``).
        prediction_type: "epsilon", "sample" or "v_prediction".
        midpoint: the form whose ``x0_prev`` is P (else D).
        processed: x0 is clipped in the kernel (midpoint form: through x0).
    """
    # x0 predicted at sigma_next: euler_table's x0 columns of a step from sigma_next
    table = euler_table(sigma_next, sigma_next, prediction_type, 0.0, "sigma")
    c = (sigma_next - sigma) / (2.0 * sigma_next)
    if not midpoint:
        table[:, COL["x"]] = 1.0
        table[:, COL["x0"]] = -c
        table[:, COL["x0_prev"]] = c
        return table
    table[:, COL["x0_prev"]] = 1.0
    if processed:
        table[:, COL["x"]] = c
        table[:, COL["x0"]] = -c
    else:  # c (x - x0_x x - x0_m m): epsilon gives (s' - s) m / 2, no cancellation
        table[:, COL["x"]] = c * (1.0 - table[:, COL["x0_x"]])
        table[:, COL["m"]] = -c * table[:, COL["x0_m"]]
    return table
