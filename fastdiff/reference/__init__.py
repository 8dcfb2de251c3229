"""Reference sampler steps in plain PyTorch: the spec the fused kernels are tested against.

One small function per paper formula, with its equation number. VP notation (Ho et al. 2020
eq. 4): ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``; a step goes from ``ab_t`` to ``ab_next``
(the next, less noisy, visited step; 1.0 is clean). Euler works in sigma space (Karras et
al. 2022): ``sigma = sqrt((1 - ab) / ab)``, ``x_sigma = x_t / sqrt(ab) = x0 + sigma eps``.

Contract of every step: float64 ``x`` computes in float64, any other float dtype in float32,
and results come back in ``x.dtype``; schedule values are python floats or tensors ``[]`` /
``[B]`` (any float dtype and device), broadcast over x's trailing dims; no host sync (no
``.item()``, no branch on a tensor value). Steps return ``(x_next, x0)``. Arguments are not
validated here: ``fastdiff.checks`` does that at the public boundary (``Sampler``, the
drop-ins).

Modules: ``common`` (dtype, schedule values, x0 processing, guidance, and ``X0Options``: the
``prediction_type``, ``clip_range`` and ``thresholding`` keywords every step takes), ``vp``
(DDPM, DDIM, Euler, the Heun correction), ``consistency`` (LCM, TCD), ``flow`` (flow
matching), ``unipc`` (UniPC), ``dpm`` (DPM-Solver++ multistep, orders 1-3, ODE and SDE, in
the VP, flow and VE spaces: DPM-Solver++(2M) is its order 2), ``sigma`` (k-diffusion's
samplers on a denoiser: churn, Heun, the SDE form of DPM-Solver++(2M), LCM).

Example:
    >>> x_next, x0 = ddim_step(x, eps_hat, ab[t], ab[t_next], eta=0.0)
"""

from fastdiff.checks import PREDICTION_TYPES
from fastdiff.reference.common import (
    ScheduleValue,
    X0Options,
    cfg_combine,
    compute_dtype_of,
    process_x0,
    process_x0_compute,
    schedule_like,
)
from fastdiff.reference.consistency import consistency_step, renoise
from fastdiff.reference.dpm import DPM_SOLVER_TYPES, DPM_SPACES, dpmpp_multistep_step
from fastdiff.reference.flow import (
    flow_eps,
    flow_euler_step,
    flow_forward,
    flow_stochastic_step,
    flow_x0,
)
from fastdiff.reference.sigma import (
    SDE_SOLVER_TYPES,
    churn_gamma,
    churn_step,
    dpmpp_2m_sde_step,
    heun_step,
    lcm_step,
)
from fastdiff.reference.unipc import (
    UNIPC_PREDICTION_TYPES,
    UNIPC_SOLVER_TYPES,
    unipc_b,
    unipc_convert,
    unipc_phi_terms,
    unipc_rhos,
    unipc_step,
    unipc_update,
)
from fastdiff.reference.vp import (
    VARIANCE_TYPES,
    ancestral_sigmas,
    ddim_step,
    ddpm_step,
    ddpm_variance,
    euler_ancestral_step,
    euler_churn_step,
    euler_step,
    heun_correction_step,
    posterior_mean_coefficients,
    predict_eps,
    predict_x0,
    split_learned_variance,
)

__all__ = [
    "DPM_SOLVER_TYPES",
    "DPM_SPACES",
    "PREDICTION_TYPES",
    "SDE_SOLVER_TYPES",
    "ScheduleValue",
    "UNIPC_PREDICTION_TYPES",
    "UNIPC_SOLVER_TYPES",
    "VARIANCE_TYPES",
    "X0Options",
    "ancestral_sigmas",
    "cfg_combine",
    "churn_gamma",
    "churn_step",
    "compute_dtype_of",
    "consistency_step",
    "ddim_step",
    "ddpm_step",
    "ddpm_variance",
    "dpmpp_2m_sde_step",
    "dpmpp_multistep_step",
    "euler_ancestral_step",
    "euler_churn_step",
    "euler_step",
    "flow_eps",
    "flow_euler_step",
    "flow_forward",
    "flow_stochastic_step",
    "flow_x0",
    "heun_correction_step",
    "heun_step",
    "lcm_step",
    "posterior_mean_coefficients",
    "predict_eps",
    "predict_x0",
    "process_x0",
    "process_x0_compute",
    "renoise",
    "schedule_like",
    "split_learned_variance",
    "unipc_b",
    "unipc_convert",
    "unipc_phi_terms",
    "unipc_rhos",
    "unipc_step",
    "unipc_update",
]
