"""k-diffusion's samplers with the update of every step as one fused kernel launch.

The same names and signatures as ``k_diffusion.sampling`` (Crowson's k-diffusion; the
functional interface ComfyUI and A1111/Forge call): ``sample_*(model, x, sigmas,
extra_args=None, callback=None, disable=None, ...)`` where ``model(x, sigma * s_in,
**extra_args)`` returns the denoised x0 of a state ``x = x0 + sigma eps``. The math of each
step is ``fastdiff.reference.sigma`` (and ``reference.euler_step``); its rows are built once
per call from ``sigmas`` in float64 (``fastdiff.tables``: one host copy of sigmas at the
start, none per step) and applied by ``fastdiff.kernels.fused_step``.

Noise is what k-diffusion draws for the same torch seed: ``torch.randn_like(x)`` in the same
order (Euler / Heun churn: one draw per step whenever ``s_churn > 0``, as k-diffusion; no
draw without churn, where k-diffusion draws and discards one), and for
``sample_dpmpp_2m_sde`` k-diffusion's default Brownian tree (needs ``torchsde``). Each
function also takes ``backend=`` ("triton", "reference", "auto"; see ``fastdiff.backend``).

Example:
    >>> from fastdiff import k_diffusion as K
    >>> sigmas = K.get_sigmas_karras(20, 0.03, 14.6, device="cuda")
    >>> x = K.sample_dpmpp_2m(model, torch.randn(1, 4, 64, 64, device="cuda") * sigmas[0], sigmas)
"""

from fastdiff.k_diffusion import sampling
from fastdiff.k_diffusion.sampling import *  # noqa: F403  (the sample_* of sampling.__all__)
from fastdiff.k_diffusion.schedules import (
    BrownianTreeNoiseSampler,
    default_noise_sampler,
    get_sigmas_exponential,
    get_sigmas_karras,
)

__all__ = [
    "BrownianTreeNoiseSampler",
    "default_noise_sampler",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    *sampling.__all__,
]
