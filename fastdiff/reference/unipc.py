"""UniPC reference (Zhao et al. 2023): the UniP predictor and the UniC corrector.

Example:
    >>> x1, xc0, m0 = unipc_step(x, eps, (a[1], a[0]), (s[1], s[0]))
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiff.checks import PREDICTION_TYPES
from fastdiff.reference.common import ScheduleValue, X0Options, compute_dtype_of, schedule_like

#
# Zhao et al. 2023 ("UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
# Diffusion Models", arXiv:2302.04867), in the notation of its Sec. 2-3: the state is
# x_t = alpha_t x0 + sigma_t eps (VP: alpha^2 + sigma^2 = 1; rectified flow: alpha = 1 - s,
# sigma = s), lambda = log(alpha / sigma), and a step goes from s to t with
# h = lambda_t - lambda_s. Every visited point keeps its model output converted to the data
# prediction x0 ("predict_x0", the data-prediction form of the paper's appendix) or to the
# noise prediction eps: its "converted output" M. With hh = -h (data) or hh = h (noise) and
# the point's own prediction m0 = M_s, UniP-p and UniC-p (Sec. 3.1 / 3.2) are
#
#     x_t = R x_s - A_t (e^hh - 1) m0 - A_t B(hh) (sum_m a_m D_m  [+ a_p (M_t - m0)])   (*)
#
# with R = sigma_t / sigma_s, A_t = alpha_t (data) or R = alpha_t / alpha_s, A_t = sigma_t
# (noise); D_m = (M_{s_m} - m0) / r_m the divided differences of the earlier points s_m,
# r_m = (lambda_{s_m} - lambda_s) / h; the bracketed term only in the corrector UniC, whose
# new point is t itself (M_t: the model output at the predicted x_t, r_p = 1). B(h) is
# bh1: B(h) = h, or bh2: B(h) = e^h - 1 (Sec. 3.3), and the weights a solve the order
# condition of Theorem 3.1, R_p(h) a = phi_p(h) / B(h) (``unipc_rhos``). The first term
# alone, p = 1, is DDIM / DPM-Solver-1; UniP-2 with bh2 is DPM-Solver++(2M).

UNIPC_SOLVER_TYPES = ("bh1", "bh2")
UNIPC_PREDICTION_TYPES = (*PREDICTION_TYPES, "flow_prediction")


def unipc_phi_terms(hh: Tensor, count: int) -> list[Tensor]:
    """``i! hh phi_{i+1}(hh)`` for i = 1..count (the right-hand side of Theorem 3.1 before
    the division by B), with ``phi_1(z) = (e^z - 1) / z`` and ``phi_{k+1}(z) = (phi_k(z) -
    1/k!) / z``, by the same recursion as the reference implementation."""
    terms = []
    g = torch.expm1(hh) / hh - 1.0  # hh phi_2(hh)
    factorial = 1.0
    for i in range(1, count + 1):
        terms.append(g * factorial)
        factorial *= i + 1
        g = g / hh - 1.0 / factorial  # hh phi_{i+2}(hh)
    return terms


def unipc_b(hh: Tensor, solver_type: str) -> Tensor:
    """B(h) of UniPC (Zhao et al. 2023, Sec. 3.3): ``bh1``: B(h) = h; ``bh2``: e^h - 1."""
    return hh if solver_type == "bh1" else torch.expm1(hh)


def unipc_rhos(r: Tensor, hh: Tensor, order: int, solver_type: str, corrector: bool) -> Tensor:
    """The weights ``a`` of the divided differences in a UniP-p / UniC-p update, from the
    order condition of Zhao et al. 2023 Theorem 3.1: ``R_m a = phi_m(hh) / B(hh)``, where
    row i of ``R_m`` is the points' ratios to the power i and ``phi_m(hh)_i = i! hh
    phi_{i+1}(hh)`` (``unipc_phi_terms``).

    UniC-p has m = p points (the history ratios and r_p = 1 for the new output); UniP-p has
    m = p - 1 (the history only). With one point (UniC-1, UniP-2) the weight is 1/2, as in
    the authors' code and diffusers (the solve gives 1/2 + O(h)).

    Args:
        r: ``[..., order - 1]`` ratios ``(lambda_{s_m} - lambda_s) / h`` of the history points.
        hh: ``[...]`` the signed step: -h (data prediction) or h (noise prediction).
        order: p >= 1.
        solver_type: "bh1" or "bh2".
        corrector: UniC (True) or UniP (False).

    Returns:
        ``[..., m]``: one weight per point (the corrector's last one is the new output's).

    Example:
        >>> unipc_rhos(torch.tensor([[-1.0, -2.0]]), torch.tensor([-0.5]), 3, "bh2", False)
    """
    points = torch.cat([r, torch.ones_like(hh)[..., None]], dim=-1) if corrector else r
    m = points.shape[-1]
    if m <= 1:
        return torch.full_like(points, 0.5)
    rows = torch.stack([points**i for i in range(m)], dim=-2)  # row i: points^i
    rhs = torch.stack(unipc_phi_terms(hh, m), dim=-1) / unipc_b(hh, solver_type)[..., None]
    # solve_ex without error checks: checking the info flag would sync with the device
    return torch.linalg.solve_ex(rows, rhs, check_errors=False)[0]


def unipc_convert(
    x: Tensor, model_output: Tensor, alpha: Tensor, sigma: Tensor, predict_x0: bool, **x0_options
) -> Tensor:
    """The converted output M of UniPC: the data prediction x0 (processed if asked) or the
    noise prediction eps, of the point ``x = alpha x0 + sigma eps``.

    epsilon: ``x0 = (x - sigma m) / alpha``; v_prediction (Salimans & Ho 2022, VP):
    ``x0 = alpha x - sigma m``, ``eps = alpha m + sigma x``; sample: ``x0 = m``; flow_prediction
    (velocity ``v = eps - x0`` of ``x = (1 - s) x0 + s eps``): ``x0 = x - s v``.

    Args: x, model_output: compute-dtype tensors; alpha, sigma: broadcastable schedule values
    of x's point; predict_x0: x0 or eps; x0_options: ``prediction_type`` (one of
    ``UNIPC_PREDICTION_TYPES``, default "epsilon") and the clipping / dynamic thresholding of
    x0 (data prediction only), as :class:`X0Options`.
    """
    opts = X0Options.of(x0_options)
    m, prediction_type = model_output, opts.prediction_type
    if predict_x0:
        if prediction_type == "epsilon":
            x0 = (x - sigma * m) / alpha
        elif prediction_type == "sample":
            x0 = m
        elif prediction_type == "v_prediction":
            x0 = alpha * x - sigma * m
        else:
            x0 = x - sigma * m
        return opts.process(x0)
    if prediction_type == "epsilon":
        return m
    if prediction_type == "sample":
        return (x - alpha * m) / sigma
    if prediction_type == "v_prediction":
        return alpha * m + sigma * x
    return x + alpha * m  # flow: eps = x + (1 - s) v


def _per_point(value: ScheduleValue, name: str, xc: Tensor) -> Tensor:
    """A schedule value as a compute-dtype tensor of shape [] or [B] on x's device."""
    t = schedule_like(value, name, xc, 0.0)
    return t.reshape(-1) if t.dim() else t


def _over_x(value: Tensor, x: Tensor) -> Tensor:
    """A [] or [B] value shaped to broadcast over x."""
    return value.view(-1, *([1] * (x.dim() - 1))) if value.dim() else value


def unipc_update(
    x: Tensor,
    m0: Tensor,
    earlier: tuple | list,
    lam: tuple | list,
    alpha_t: Tensor,
    sigma_t: Tensor,
    alpha_s: Tensor,
    sigma_s: Tensor,
    *,
    predict_x0: bool,
    solver_type: str,
    model_t: Tensor | None = None,
) -> Tensor:
    """One UniP-p (``model_t`` None) or UniC-p update (*) from the point s to t.

    Args:
        x: the sample at s, compute dtype.
        m0: the converted output of s.
        earlier: converted outputs of the earlier points s_1, s_2, ... (p - 1 of them).
        lam: ``(lambda_t, lambda_s, lambda_{s_1}, ...)``, each ``[]`` or ``[B]``.
        alpha_t, sigma_t, alpha_s, sigma_s: ``[]`` or ``[B]`` schedule values of t and s.
        predict_x0: data (True) or noise prediction.
        solver_type: "bh1" or "bh2".
        model_t: UniC: the converted output at t (the predicted x_t's model output).

    Returns:
        x_t in the compute dtype.
    """
    lam_t, lam_s = lam[0], lam[1]
    h = lam_t - lam_s
    hh = -h if predict_x0 else h
    order = len(earlier) + 1
    if predict_x0:
        ratio, a_t = sigma_t / sigma_s, alpha_t
        # alpha_t (e^-h - 1) written without e^-h: finite at sigma_t = 0 (the step to clean)
        first = sigma_t * alpha_s / sigma_s - alpha_t
    else:
        ratio, a_t = alpha_t / alpha_s, sigma_t
        first = alpha_t * sigma_s / alpha_s - sigma_t  # sigma_t (e^h - 1)
    x_t = _over_x(ratio, x) * x - _over_x(first, x) * m0
    if order == 1 and model_t is None:
        return x_t
    r = torch.stack([(lam_m - lam_s) / h for lam_m in lam[2:]], dim=-1) if order > 1 else None
    if r is None:
        r = hh.new_zeros((*hh.shape, 0))
    rhos = unipc_rhos(r, hh, order, solver_type, corrector=model_t is not None)
    gain = a_t * unipc_b(hh, solver_type)  # A_t B(hh)
    correction = torch.zeros_like(x)
    for k, m_k in enumerate(earlier):
        d_k = (m_k - m0) / _over_x(r[..., k], x)  # D_k, divided difference
        correction = correction + _over_x(rhos[..., k], x) * d_k
    if model_t is not None:
        correction = correction + _over_x(rhos[..., -1], x) * (model_t - m0)
    return x_t - _over_x(gain, x) * correction


def unipc_step(
    x: Tensor,
    model_output: Tensor,
    alpha: tuple | list,
    sigma: tuple | list,
    *,
    history: tuple | list = (),
    last_sample: Tensor | None = None,
    corrector_order: int = 0,
    predictor_order: int = 1,
    predict_x0: bool = True,
    solver_type: str = "bh2",
    **x0_options,
) -> tuple[Tensor, Tensor, Tensor]:
    """One UniPC step k: the corrector UniC of the sample ``x`` the last predictor made, then
    the predictor UniP of the next sample (Zhao et al. 2023, Sec. 3; the order of diffusers'
    ``UniPCMultistepScheduler.step``).

    ``M_k`` is the model output at ``x`` converted (``unipc_convert``, from the uncorrected
    ``x``). UniC-q (``corrector_order`` q >= 1) recomputes the step from the previous
    point: ``x^c = UniC(last_sample; M_{k-1}, ..., M_{k-q}; M_k)``; then UniP-p
    (``predictor_order`` p) steps from ``x^c``: ``x_next = UniP(x^c; M_k, M_{k-1}, ...,
    M_{k-p+1})``. Without the corrector (q = 0: a chain's first step, ``disable_corrector``)
    ``x^c = x``.

    Args:
        x: the sample at step k ``[B, ...]`` (the last predictor's output).
        model_output: the model output at ``x``.
        alpha, sigma: schedule values of the points, newest first: ``t_{k+1}`` (the target),
            ``t_k`` (x's point), then ``t_{k-1}, t_{k-2}, ...`` (those of ``history``); each
            a float or a ``[]`` / ``[B]`` tensor. ``sigma = 0`` is clean data.
        history: the converted outputs ``M_{k-1}, M_{k-2}, ...`` of the earlier points,
            newest first (``max(q, p - 1)`` of them).
        last_sample: the corrected sample of step k - 1 (the previous predictor's input);
            needed with a corrector.
        corrector_order: q (0: no corrector).
        predictor_order: p >= 1.
        predict_x0: keep data predictions (True) or noise predictions.
        solver_type: "bh1" or "bh2".
        x0_options: ``prediction_type`` (one of ``UNIPC_PREDICTION_TYPES``, default
            "epsilon"), ``clip_range`` / ``thresholding`` (the x0 processing of the data
            prediction): :class:`X0Options`.

    Returns:
        ``(x_next, x_corrected, M_k)`` in ``x.dtype``: the next sample, the corrected sample
        (the next step's ``last_sample``) and the converted output (its ``history[0]``).

    Example:
        >>> x1, xc0, m0 = unipc_step(x, eps, (a[1], a[0]), (s[1], s[0]))
        >>> x2, xc1, m1 = unipc_step(x1, eps1, (a[2], a[1], a[0]), (s[2], s[1], s[0]),
        ...                          history=(m0,), last_sample=xc0, corrector_order=1,
        ...                          predictor_order=2)
    """
    q, p = int(corrector_order), int(predictor_order)
    if p < 1 or q < 0 or len(history) < max(q, p - 1) or len(alpha) < 2 + max(q, p - 1):
        raise ValueError(
            f"corrector order {q} / predictor order {p} need {max(q, p - 1)} history entries "
            f"and {2 + max(q, p - 1)} points, got {len(history)} and {len(alpha)}"
        )
    if len(sigma) != len(alpha):
        raise ValueError("alpha and sigma must list the same points")
    if q and last_sample is None:
        raise ValueError("the corrector needs last_sample")
    dtype = compute_dtype_of(x)
    xc = x.to(dtype)
    alphas = [_per_point(v, f"alpha[{j}]", xc) for j, v in enumerate(alpha)]
    sigmas = [_per_point(v, f"sigma[{j}]", xc) for j, v in enumerate(sigma)]
    # lambda = log(alpha / sigma): +inf at sigma = 0 (clean), -inf at alpha = 0
    lam = [torch.log(a) - torch.log(s) for a, s in zip(alphas, sigmas)]
    hist = [h.to(dtype) for h in history]
    kw = dict(predict_x0=predict_x0, solver_type=solver_type)

    alpha_k, sigma_k = _over_x(alphas[1], xc), _over_x(sigmas[1], xc)
    converted = unipc_convert(
        xc, model_output.to(dtype), alpha_k, sigma_k, predict_x0, **x0_options
    )
    corrected = xc
    if q:  # UniC-q from t_{k-1} to t_k with M_k as the new point
        corrected = unipc_update(
            last_sample.to(dtype),
            hist[0],
            hist[1:q],
            [lam[1], *lam[2 : 2 + q]],
            alphas[1],
            sigmas[1],
            alphas[2],
            sigmas[2],
            model_t=converted,
            **kw,
        )
    # UniP-p from t_k to t_{k+1}
    x_next = unipc_update(
        corrected,
        converted,
        hist[: p - 1],
        [lam[0], *lam[1 : p + 1]],
        alphas[0],
        sigmas[0],
        alphas[1],
        sigmas[1],
        **kw,
    )
    return x_next.to(x.dtype), corrected.to(x.dtype), converted.to(x.dtype)
