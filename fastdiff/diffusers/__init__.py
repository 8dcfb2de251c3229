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

Noise. By default (``noise="torch"``) the step noise is drawn exactly as diffusers draws it,
from the ``generator`` or, without one, from torch's global RNG: the same images as the stock
scheduler for the same seed (``torch.manual_seed(0); pipe(...)`` included), and the global
stream in the same state afterwards. ``FusedX.from_config(config, noise="philox")`` (or
``scheduler.noise = "philox"``) opts in to in-kernel noise when no generator is passed:
counter-based Philox keyed by (per-sample seed, step, element), seeded from the global RNG
once per ``set_timesteps``. That saves the ``randn`` launch and the noise tensor's pass over
memory on every stochastic step, and it is the only mode in which a stochastic scheduler's
loop can be captured in a CUDA graph (``uses_philox_noise``; a graph replay cannot repeat
torch's RNG draws). The price: other images than the stock scheduler's for the same seed
(same distribution, another stream). ``backend=`` ("triton", "reference", "auto"; default:
``FASTDIFF_BACKEND`` or auto) picks the kernels or the plain PyTorch reference. Neither
option is saved to the config.

Steps. Every ``step`` has the signature of the diffusers ``step`` it replaces, and its
arguments mean what they mean there: ``model_output`` is like ``sample``; ``timestep`` is one
of ``self.timesteps``; ``generator`` draws the noise as diffusers does (None: the global RNG,
or in-kernel noise with ``noise="philox"``; unused by the deterministic steps);
``return_dict`` returns the scheduler's output class, else a tuple. A ``step``'s docstring
lists only the arguments it says more about.

Pipelines. ``save_pretrained`` records a fused scheduler in model_index.json as
``["fastdiff.diffusers", "FusedDDIMScheduler"]`` (the classes' ``__module__`` is this public
module); ``DiffusionPipeline.from_pretrained`` loads it back once ``fastdiff.diffusers`` is
imported (diffusers resolves a non-diffusers library from ``sys.modules`` only), and accepts
a fused scheduler passed as ``scheduler=``.

diffusers is an optional dependency: ``pip install "fastdiff[diffusers]"``.
"""

try:
    import diffusers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        'fastdiff.diffusers needs the diffusers package: pip install "fastdiff[diffusers]"'
    ) from err

from fastdiff.diffusers.consistency import FusedLCMScheduler, FusedTCDScheduler
from fastdiff.diffusers.ddim import FusedDDIMScheduler
from fastdiff.diffusers.ddpm import FusedDDPMScheduler
from fastdiff.diffusers.dpm import FusedDPMSolverMultistepScheduler
from fastdiff.diffusers.euler import (
    FusedEulerAncestralDiscreteScheduler,
    FusedEulerDiscreteScheduler,
)
from fastdiff.diffusers.flow_match import FusedFlowMatchEulerDiscreteScheduler
from fastdiff.diffusers.graph import DenoisingLoopGraph, capture_denoising_loop
from fastdiff.diffusers.heun import FusedHeunDiscreteScheduler
from fastdiff.diffusers.unipc import FusedUniPCMultistepScheduler

__all__ = [
    "DenoisingLoopGraph",
    "FusedFlowMatchEulerDiscreteScheduler",
    "FusedUniPCMultistepScheduler",
    "capture_denoising_loop",
    "FusedDDIMScheduler",
    "FusedDDPMScheduler",
    "FusedDPMSolverMultistepScheduler",
    "FusedEulerAncestralDiscreteScheduler",
    "FusedEulerDiscreteScheduler",
    "FusedHeunDiscreteScheduler",
    "FusedLCMScheduler",
    "FusedTCDScheduler",
]

# diffusers' pipeline loader looks the component's base class up by name in the library that
# model_index.json names (this module): SchedulerMixin must be found here
from diffusers import SchedulerMixin  # noqa: E402, F401

for _name in __all__:  # the public path, recorded by save_pretrained (see the docstring)
    _obj = globals()[_name]
    if isinstance(_obj, type) and issubclass(_obj, SchedulerMixin):
        _obj.__module__ = __name__
del _name, _obj
