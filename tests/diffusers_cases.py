"""What test_diffusers_adapter.py and test_diffusers_pipelines.py both run over: every fused
scheduler with the diffusers scheduler it replaces, the two backends, and the device.

Imported by those files after their ``pytest.importorskip("diffusers")`` (this module needs
diffusers). benchmarks/bench_pipeline.py keeps its own table: it runs in the ``benchmarks``
package, and tests/ is not a package (it could only be imported as a namespace package
``tests``, which any installed top-level ``tests`` package would shadow).
"""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from fastdiff.diffusers import (
    FusedDDIMScheduler,
    FusedDDPMScheduler,
    FusedDPMSolverMultistepScheduler,
    FusedEulerAncestralDiscreteScheduler,
    FusedEulerDiscreteScheduler,
    FusedHeunDiscreteScheduler,
)

__all__ = ["BACKENDS", "DEVICE", "PAIRS"]

# name -> (diffusers class, fused class that replaces it)
PAIRS = {
    "ddpm": (DDPMScheduler, FusedDDPMScheduler),
    "ddim": (DDIMScheduler, FusedDDIMScheduler),
    "euler": (EulerDiscreteScheduler, FusedEulerDiscreteScheduler),
    "euler_a": (EulerAncestralDiscreteScheduler, FusedEulerAncestralDiscreteScheduler),
    "dpm": (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler),
    "heun": (HeunDiscreteScheduler, FusedHeunDiscreteScheduler),  # two step calls per step
}
BACKENDS = ["triton", "reference"]
# the card when there is one (the kernels run there), else the CPU (Triton interpreter)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
