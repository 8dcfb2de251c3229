"""Drop-in diffusers schedulers backed by fastdiff's fused step kernels.

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

__all__ = [
    "FusedDDIMScheduler",
    "FusedDDPMScheduler",
    "FusedDPMSolverMultistepScheduler",
    "FusedEulerAncestralDiscreteScheduler",
    "FusedEulerDiscreteScheduler",
]
