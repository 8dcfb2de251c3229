"""Drop-in diffusers schedulers backed by fastdiff's fused step kernels.

Each class subclasses the diffusers scheduler it replaces (same config, ``from_config``,
``save_pretrained`` / ``from_pretrained``, ``set_timesteps``, ``scale_model_input``,
``add_noise``, outputs) and runs every ``step`` as one fused kernel launch with no host sync,
so a denoising loop can be captured in a CUDA graph. Results match the diffusers class for
the options it supports; an unsupported option raises ValueError when the scheduler is built
(or when a patched config is stepped). See ``fastdiff.diffusers._base`` for the design.

Example:
    >>> from fastdiff.diffusers import FusedDPMSolverMultistepScheduler
    >>> pipe.scheduler = FusedDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    >>> image = pipe(prompt, generator=torch.Generator("cuda").manual_seed(0)).images[0]

With a ``generator`` the step noise is drawn exactly as diffusers draws it (same images for
the same seed); without one it is made inside the kernel (Philox, seeded from torch's
global RNG once per ``set_timesteps``). ``backend=`` ("triton", "reference", "auto"; default:
``FASTDIFF_BACKEND`` or auto) picks the kernels or the plain PyTorch reference.

diffusers is an optional dependency: ``pip install "fastdiff[diffusers]"``.
"""

try:
    import diffusers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        'fastdiff.diffusers needs the diffusers package: pip install "fastdiff[diffusers]"'
    ) from err

from fastdiff.diffusers.ddim import FusedDDIMScheduler
from fastdiff.diffusers.ddpm import FusedDDPMScheduler
from fastdiff.diffusers.dpm import FusedDPMSolverMultistepScheduler
from fastdiff.diffusers.euler import (
    FusedEulerAncestralDiscreteScheduler,
    FusedEulerDiscreteScheduler,
)
from fastdiff.diffusers.flow_match import FusedFlowMatchEulerDiscreteScheduler
from fastdiff.diffusers.graph import DenoisingLoopGraph, capture_denoising_loop

__all__ = [
    "DenoisingLoopGraph",
    "FusedFlowMatchEulerDiscreteScheduler",
    "capture_denoising_loop",
    "FusedDDIMScheduler",
    "FusedDDPMScheduler",
    "FusedDPMSolverMultistepScheduler",
    "FusedEulerAncestralDiscreteScheduler",
    "FusedEulerDiscreteScheduler",
]
