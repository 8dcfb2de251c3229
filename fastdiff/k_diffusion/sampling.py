"""The ``sample_*`` functions of ``fastdiff.k_diffusion`` (its docstring has the contract)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import trange

from fastdiff import flow_tables, reference, tables
from fastdiff.backend import check_backend
from fastdiff.checks import check_churn, check_like, check_number, check_tensor
from fastdiff.k_diffusion.schedules import (
    BrownianTreeNoiseSampler,
    NoiseSampler,
    default_noise_sampler,
)
from fastdiff.stepping import run_step

__all__ = [
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
]


# -- one call: the checked plan, its device rows and the step ---------------------------------


class _Plan:
    """One sampling call: the host sigmas (one copy: in their own dtype and in float64),
    the call's coefficient table on x's device and the step that applies a row of it."""

    def __init__(self, model, x, sigmas, extra_args, callback, backend: str | None):
        check_tensor("x", x)
        check_tensor("sigmas", sigmas)
        if sigmas.ndim != 1 or len(sigmas) < 1:
            raise ValueError(f"sigmas must be a 1-D tensor, got shape {tuple(sigmas.shape)}")
        self.host = sigmas.detach().cpu()  # the one host copy of the call
        s = self.host.to(torch.float64)
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or bool((s[:-1] <= 0).any()):
            raise ValueError(
                "sigmas must be finite and >= 0, and > 0 but for the last, got "
                f"{self.host.tolist()}"
            )
        self.sigma, self.sigma_next = s[:-1], s[1:]
        self.n = len(s) - 1
        self.s = s.tolist()  # python floats for the reference steps (host, no sync)
        # the multistep solvers' previous sigma (a placeholder on the first, first-order step)
        self.sigma_prev = torch.cat([s[:1], s[:-2]])[: self.n]
        self.first = torch.arange(self.n) == 0
        self.x, self.sigmas = x, sigmas
        self.model, self.extra_args = model, {} if extra_args is None else extra_args
        self.callback = callback
        self.s_in = x.new_ones([x.shape[0]])
        self.backend = check_backend(backend)
        self.table: Tensor | None = None
        self.rows: list[Tensor] = []

    def denoise(self, i: int, x: Tensor, sigma: Tensor | None = None) -> Tensor:
        """``model(x, sigma * s_in, **extra_args)`` at step i (sigma: ``sigmas[i]``), and the
        callback with k-diffusion's dict."""
        sigma = self.sigmas[i] if sigma is None else sigma
        denoised = self.model(x, sigma * self.s_in, **self.extra_args)
        if self.callback is not None:
            self.callback(
                {"x": x, "i": i, "sigma": self.sigmas[i], "sigma_hat": sigma, "denoised": denoised}
            )
        return denoised

    def is_last(self, i: int) -> bool:
        return self.s[i + 1] == 0.0

    def upload(self, *parts: Tensor) -> None:
        """The call's table (the row blocks ``parts``, each [n, COLUMNS]) on x's device."""
        table = torch.cat(parts).to(torch.float32)
        if self.x.device.type == "cuda":  # pinned and asynchronous: no host sync
            table = table.pin_memory().to(self.x.device, non_blocking=True)
        else:
            table = table.to(self.x.device)
        rows = torch.arange(len(table), dtype=torch.int64, device=self.x.device)
        self.table, self.rows = table, [rows[k : k + 1] for k in range(len(table))]

    def step(self, row, x, denoised, ref, *, x0_prev=None, noise=None) -> Tensor:
        """``x_next`` of table row ``row`` (one launch), or ``ref(x, m, x0_prev, noise,
        grad)`` on the reference backend."""

        def check():
            check_like("denoised", denoised, x)
            if noise is not None:
                check_like("noise", noise, x)

        x_next, _ = run_step(
            self.backend,
            x,
            denoised,
            self.table,
            self.rows[row],
            ref,
            x0_prev=x0_prev,
            noise=noise,
            write_x0=False,
            check=check,
        )
        return x_next

    def loop(self, disable, body, draw=None) -> Tensor:
        """x after every step from the call's x: ``x = body(i, x, denoised, noise,
        old_denoised)`` with ``denoised = denoise(i, x)``, ``noise = draw(i)`` (None on the
        step to 0 or without ``draw``) and the previous step's denoised (None on the first)."""
        x, old_denoised = self.x, None
        for i in trange(self.n, disable=disable):
            denoised = self.denoise(i, x)
            noise = None if draw is None or self.is_last(i) else draw(i)
            x = body(i, x, denoised, noise, old_denoised)
            old_denoised = denoised
        return x

    def ends(self, i: int) -> tuple[float, float, float]:
        """Step i's host sigma, sigma_next and previous sigma (sigma on the first step)."""
        return self.s[i], self.s[i + 1], self.s[max(i - 1, 0)]


def _check_noise_args(eta: float, s_noise: float) -> tuple[float, float]:
    return check_number("eta", eta, low=0.0), check_number("s_noise", s_noise)


def _churn_plan(plan: _Plan, s_churn, s_tmin, s_tmax, s_noise) -> tuple[list[float], Tensor]:
    """Karras et al. 2022 Alg. 2's gamma_i on the host: gamma of every step, sigma_hat."""
    s_churn, s_tmin, s_tmax, s_noise = check_churn(s_churn, s_tmin, s_tmax, s_noise)
    gammas = [reference.churn_gamma(s, plan.n, s_churn, s_tmin, s_tmax) for s in plan.s[:-1]]
    return gammas, plan.sigma * (1.0 + torch.tensor(gammas, dtype=torch.float64))


def _draws(plan: _Plan, noise_sampler: NoiseSampler | None):
    """Step i's noise ``noise_sampler(sigmas[i], sigmas[i + 1])`` (default: k-diffusion's
    ``default_noise_sampler(x)``)."""
    sigmas = plan.sigmas
    noise_sampler = default_noise_sampler(plan.x) if noise_sampler is None else noise_sampler

    def draw(i: int) -> Tensor:
        return noise_sampler(sigmas[i], sigmas[i + 1])

    return draw


_PARAMETER = inspect.Parameter
# k-diffusion's own leading parameters of every sample_* function, and fastdiff's backend
_K_PARAMETERS = [
    _PARAMETER("model", _PARAMETER.POSITIONAL_OR_KEYWORD),
    _PARAMETER("x", _PARAMETER.POSITIONAL_OR_KEYWORD, annotation=Tensor),
    _PARAMETER("sigmas", _PARAMETER.POSITIONAL_OR_KEYWORD, annotation=Tensor),
    *(_PARAMETER(name, _PARAMETER.POSITIONAL_OR_KEYWORD, default=None) for name in (
        "extra_args", "callback", "disable"
    )),
]  # fmt: skip
_BACKEND = _PARAMETER("backend", _PARAMETER.KEYWORD_ONLY, default=None, annotation="str | None")


def _k_sampler(impl: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """k-diffusion's ``sample_*(model, x, sigmas, extra_args=None, callback=None,
    disable=None, <options>, *, backend=None)`` around ``impl(plan, disable, <options>)``:
    the options (names, defaults, order), the name and the docstring are ``impl``'s, ``plan``
    the call's checked :class:`_Plan`; no autograd, as k-diffusion's."""
    signature = inspect.Signature(
        [*_K_PARAMETERS, *list(inspect.signature(impl).parameters.values())[2:], _BACKEND],
        return_annotation=Tensor,
    )

    @functools.wraps(impl)
    def sampler(*args, **kwargs) -> Tensor:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        plan = _Plan(a.pop("model"), a.pop("x"), a.pop("sigmas"), a.pop("extra_args"),
                     a.pop("callback"), a.pop("backend"))  # fmt: skip
        with torch.no_grad():
            return impl(plan, a.pop("disable"), **a)

    sampler.__signature__ = signature
    return sampler


# -- the samplers -----------------------------------------------------------------------------


def _euler_loop(plan: _Plan, disable, churn, heun: bool) -> Tensor:
    """Euler (Karras et al. 2022 Alg. 2 with Euler steps) or Heun (Alg. 2), with churn."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    x, sigmas = plan.x, plan.sigmas
    gammas, hat = _churn_plan(plan, s_churn, s_tmin, s_tmax, s_noise)
    n = plan.n
    euler = tables.euler_table(hat, plan.sigma_next, "sample", 0.0, "sigma")
    blocks = [euler, tables.churn_table(plan.sigma, hat, s_noise)]
    if heun:
        blocks.append(tables.heun_table(hat, plan.sigma_next))
    plan.upload(*blocks)
    sigma_hat = hat.tolist()
    for i in trange(n, disable=disable):
        s, s_h, s_next = plan.s[i], sigma_hat[i], plan.s[i + 1]
        sigma_in = sigmas[i]
        if s_churn > 0:  # k-diffusion draws one normal per step whenever churn is on
            eps = torch.randn_like(x)
            if gammas[i] > 0:
                sigma_in = sigmas[i] * (gammas[i] + 1)

                def churn(xc, m, xp, z, g, s=s, s_h=s_h):
                    return (reference.churn_step(xc, z, s, s_h, s_noise),) * 2

                x = plan.step(n + i, x, x, churn, noise=eps)
        denoised = plan.denoise(i, x, sigma_in)

        def ref_euler(xc, m, xp, z, g, s_h=s_h, s_next=s_next):
            return reference.euler_step(xc, m, s_h, s_next, prediction_type="sample")

        x_2 = plan.step(i, x, denoised, ref_euler)
        if not heun or plan.is_last(i):
            x = x_2
            continue
        denoised_2 = plan.model(x_2, sigmas[i + 1] * plan.s_in, **plan.extra_args)

        def ref_heun(xc, m, xp, z, g, x_hat=x, d1=denoised, s_h=s_h, s_next=s_next):
            return reference.heun_step(x_hat, d1, m, s_h, s_next)

        x = plan.step(2 * n + i, x_2, denoised_2, ref_heun, x0_prev=denoised)
    return x


@_k_sampler
def sample_euler(plan, disable, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler steps of the probability-flow ODE with churn (Karras et al. 2022 Alg. 2, Euler
    in place of Heun): ``x' = x_hat + (sigma' - sigma_hat) (x_hat - D) / sigma_hat``.

    Example:
        >>> x = sample_euler(model, torch.randn(1, 4, 64, 64) * sigmas[0], sigmas)
    """
    return _euler_loop(plan, disable, (s_churn, s_tmin, s_tmax, s_noise), heun=False)


@_k_sampler
def sample_heun(plan, disable, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's 2nd-order method with churn (Karras et al. 2022 Alg. 2): two model calls per
    step (one on the step to 0), each update one launch (the second: ``tables.heun_table``).

    Example:
        >>> x = sample_heun(model, torch.randn(1, 4, 64, 64) * sigmas[0], sigmas)
    """
    return _euler_loop(plan, disable, (s_churn, s_tmin, s_tmax, s_noise), heun=True)


@_k_sampler
def sample_euler_ancestral(plan, disable, eta=1.0, s_noise=1.0, noise_sampler=None):
    """Ancestral Euler steps: ``x' = x + (sigma_down - sigma) (x - D) / sigma + S_noise
    sigma_up z`` (``reference.ancestral_sigmas``; no noise on the step to 0).

    Example:
        >>> x = sample_euler_ancestral(model, torch.randn(1, 4, 64, 64) * sigmas[0], sigmas)
    """
    eta, s_noise = _check_noise_args(eta, s_noise)
    table = tables.euler_table(plan.sigma, plan.sigma_next, "sample", eta, "sigma")
    table[:, tables.COL["std"]] *= s_noise
    plan.upload(table)

    def body(i, x, denoised, noise, old_denoised):
        s, s_next, _ = plan.ends(i)

        def ref(xc, m, xp, z, g):
            z = None if z is None else s_noise * z
            return reference.euler_ancestral_step(
                xc, m, s, s_next, eta=eta, prediction_type="sample", noise=z
            )

        return plan.step(i, x, denoised, ref, noise=noise)

    return plan.loop(disable, body, _draws(plan, noise_sampler))


@_k_sampler
def sample_dpmpp_2m(plan, disable):
    """DPM-Solver++(2M) (Lu et al. 2022 Alg. 2) in sigma space, k-diffusion's form: first
    order on the first step and on the step to 0 (``reference.dpmpp_multistep_step``, VE).

    Example:
        >>> x = sample_dpmpp_2m(model, torch.randn(1, 4, 64, 64) * sigmas[0], sigmas)
    """
    ones = torch.ones_like(plan.sigma)
    table = flow_tables.dpmpp_2m_table_as(
        ones, plan.sigma, ones, plan.sigma_next, ones, plan.sigma_prev, "sample", plan.first
    )
    plan.upload(table)

    def body(i, x, denoised, noise, old_denoised):
        s, s_next, s_prev = plan.ends(i)

        def ref(xc, m, xp, z, g):
            history = () if xp is None else [(xp, s_prev)]
            return reference.dpmpp_multistep_step(xc, m, s, s_next, history=history, space="ve")

        return plan.step(i, x, denoised, ref, x0_prev=old_denoised)

    return plan.loop(disable, body)


@_k_sampler
def sample_dpmpp_2m_sde(
    plan, disable, eta=1.0, s_noise=1.0, noise_sampler=None, solver_type="midpoint"
):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, SDE-DPM-Solver++(2M);
    ``reference.dpmpp_2m_sde_step``), the "DPM++ 2M SDE" of the UIs. The default
    ``noise_sampler`` is k-diffusion's :class:`BrownianTreeNoiseSampler` over ``[min positive
    sigma, max sigma]`` (needs torchsde), seeded from the global generator as k-diffusion
    seeds it.

    Example:
        >>> x = sample_dpmpp_2m_sde(model, torch.randn(1, 4, 64, 64) * sigmas[0], sigmas)
    """
    if solver_type not in reference.SDE_SOLVER_TYPES:
        raise ValueError(
            f"solver_type must be one of {reference.SDE_SOLVER_TYPES}, got {solver_type!r}"
        )
    eta, s_noise = _check_noise_args(eta, s_noise)
    plan.upload(
        tables.dpmpp_2m_sde_table(
            plan.sigma, plan.sigma_next, plan.sigma_prev, plan.first, eta, s_noise, solver_type
        )
    )
    if noise_sampler is None:  # k-diffusion's default, called with the host sigmas: no sync
        host = plan.host
        tree = BrownianTreeNoiseSampler(plan.x, host[host > 0].min(), host.max())

        def draw(i):
            return tree(host[i], host[i + 1])
    else:
        draw = _draws(plan, noise_sampler)

    def body(i, x, denoised, noise, old_denoised):
        s, s_next, s_prev = plan.ends(i)

        def ref(xc, m, xp, z, g):
            return reference.dpmpp_2m_sde_step(
                xc,
                m,
                s,
                s_next,
                denoised_prev=xp,
                sigma_prev=s_prev,
                eta=eta,
                s_noise=s_noise,
                solver_type=solver_type,
                noise=z,
            )

        return plan.step(i, x, denoised, ref, x0_prev=old_denoised, noise=noise)

    return plan.loop(disable, body, draw if eta else None)


@_k_sampler
def sample_lcm(plan, disable, noise_sampler=None):
    """The LCM sampler (Luo et al. 2023 Alg. 1; ComfyUI's k-diffusion ``sample_lcm``):
    ``x' = D + sigma' z``, no noise on the step to 0 (``reference.lcm_step``).

    Example:
        >>> x = sample_lcm(model, torch.randn(1, 4, 64, 64) * sigmas[0], sigmas)
    """
    plan.upload(tables.lcm_table(plan.sigma_next))

    def body(i, x, denoised, noise, old_denoised):
        s_next = plan.s[i + 1]

        def ref(xc, m, xp, z, g):
            return reference.lcm_step(xc, m, s_next, z)

        return plan.step(i, x, denoised, ref, noise=noise)

    return plan.loop(disable, body, _draws(plan, noise_sampler))
