"""fastdiff: diffusion-model samplers whose reverse steps run as fused Triton kernels.

Example:
    >>> import fastdiff
    >>> schedule = fastdiff.NoiseSchedule.create("linear", 1000)
    >>> sampler = fastdiff.DDIMSampler(schedule, 50)
    >>> x = fastdiff.sample(model, sampler, shape=(4, 3, 32, 32), seed=0)

Many samples over many GPUs: ``torchrun -m fastdiff.sample_many`` (``fastdiff.sample_many``,
not imported here so that ``-m`` runs it cleanly). The diffusers schedulers:
``fastdiff.diffusers`` (needs diffusers).
"""

from fastdiff import flow_samplers, samplers
from fastdiff.backend import BACKENDS, resolve_backend
from fastdiff.flow import FlowSchedule, calculate_shift, flow_sigmas, mixture_velocity
from fastdiff.flow_samplers import *  # noqa: F403 (its __all__, listed below)
from fastdiff.gmm import GaussianMixture
from fastdiff.graph import GraphCaptureError, SamplingGraph
from fastdiff.philox import seeds_from
from fastdiff.samplers import *  # noqa: F403 (its __all__, listed below)
from fastdiff.sampling import sample
from fastdiff.schedules import NoiseSchedule, make_betas, make_plan, rescale_zero_terminal_snr
from fastdiff.unipc import UniPCSampler

__version__ = "0.1.0"

__all__ = [
    *flow_samplers.__all__,
    *samplers.__all__,
    "BACKENDS",
    "FlowSchedule",
    "GaussianMixture",
    "GraphCaptureError",
    "NoiseSchedule",
    "SamplingGraph",
    "UniPCSampler",
    "calculate_shift",
    "flow_sigmas",
    "make_betas",
    "make_plan",
    "mixture_velocity",
    "rescale_zero_terminal_snr",
    "resolve_backend",
    "sample",
    "seeds_from",
]
