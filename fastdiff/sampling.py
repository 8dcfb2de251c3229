"""The sampling loop: noise in, samples out, with any fastdiff sampler and any model.

Every sample has an int64 seed; its initial noise and every step's noise come from the
counter-based Philox stream of :mod:`fastdiff.philox` keyed by that seed, so a sample does not
depend on its batch, its position in it, or the device count. The loop never synchronizes
the host with the device. Design notes: ``docs/graphs.md``.

Example::

    x = sample(model, DDIMSampler(schedule, 50), shape=(16, 4, 64, 64), seed=1, device="cuda")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fastdiff import philox
from fastdiff.loop import Model, SamplingStep

__all__ = ["INITIAL_NOISE_STREAM", "guidance_pair", "initial_noise", "sample", "start_index"]

# Stream of the initial noise x_T in fastdiff.philox (0 is the steps' noise).
INITIAL_NOISE_STREAM = 1


def initial_noise(
    seeds: torch.Tensor, shape: Sequence[int], *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The initial noise ``x_T`` of a chain: ``philox.randn(seeds, 0, shape, stream=1)``, dense.

    Args:
        seeds: int64 ``[B]`` per-sample seeds (on the device to sample on).
        shape: the samples' shape, batch first (``shape[0] == B``).
        dtype: dtype of the noise.

    Returns:
        Standard-normal noise of ``shape``, contiguous, on the seeds' device.
    """
    noise = philox.randn(seeds, 0, tuple(shape), stream=INITIAL_NOISE_STREAM, dtype=dtype)
    return noise.contiguous()  # a strided view when a sample's size is not a multiple of 4


def start_index(num_steps: int, strength: float) -> int:
    """First step index of a truncated chain (img2img / SDEdit) of the given strength.

    The chain runs the last ``max(1, round(strength * num_steps))`` steps (round half up), so
    it starts at ``start = num_steps - that``: strength 1 runs every step, strength 0.5 of 50
    steps starts at step 25, and a tiny strength still runs the last step.

    Args:
        num_steps: the sampler's number of steps.
        strength: in (0, 1].

    Returns:
        The start index in ``[0, num_steps - 1]``.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError(f"strength must be a number in (0, 1], got {type(strength).__name__}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    run = max(1, int(strength * num_steps + 0.5))
    return num_steps - min(run, num_steps)


def guidance_pair(uncond_model: Model, cond_model: Model) -> Model:
    """Joins an unconditional and a conditional model into one for classifier-free guidance.

    The returned ``model(x, cond)`` takes the doubled batch :func:`sample` builds with
    ``guidance_scale`` (``[2B, ...]``, the two halves equal) and returns
    ``cat([uncond_model(first half), cond_model(second half)])``: the unconditional half
    first, as fastdiff's samplers expect.

    Args:
        uncond_model: ``model(x, cond)`` without the condition (e.g. a GMM's denoiser).
        cond_model: the conditional model (e.g. ``gmm.denoiser(..., component=k)``).

    Returns:
        The joined model.

    Example::

        model = guidance_pair(gmm.denoiser(s), gmm.denoiser(s, component=2))
        x = sample(model, sampler, shape=(100, 2), guidance_scale=3.0)
    """
    for name, m in (("uncond_model", uncond_model), ("cond_model", cond_model)):
        if not callable(m):
            raise TypeError(f"{name} must be callable, got {type(m).__name__}")

    def joined(x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % 2:
            raise ValueError(f"guidance_pair model needs an even (doubled) batch, got {x.shape[0]}")
        b = x.shape[0] // 2
        c_u, c_c = (cond[:b], cond[b:]) if cond.ndim else (cond, cond)
        return torch.cat([uncond_model(x[:b], c_u), cond_model(x[b:], c_c)])

    return joined


def _resolve_shape(
    shape: Sequence[int] | None, x: torch.Tensor | None, init_image: torch.Tensor | None
) -> tuple[int, ...]:
    if shape is not None and x is not None:
        raise ValueError("give either shape or x (the initial noise), not both")
    if x is not None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point tensor (the initial noise)")
        out = tuple(x.shape)
    elif shape is not None:
        if isinstance(shape, torch.Size):
            shape = tuple(shape)
        if not isinstance(shape, (tuple, list)) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in shape
        ):
            raise TypeError(f"shape must be a tuple of ints, got {shape!r}")
        out = tuple(shape)
    elif init_image is not None:
        out = tuple(init_image.shape)
    else:
        raise ValueError(
            "give shape (or x, the initial noise, or init_image) to say what to sample"
        )
    if len(out) < 1 or any(s < 1 for s in out):
        raise ValueError(f"shape must be non-empty with positive sizes, batch first; got {out}")
    if init_image is not None and tuple(init_image.shape) != out:
        raise ValueError(
            f"init_image has shape {tuple(init_image.shape)} but the samples have shape {out}"
        )
    return out


def _resolve_seeds(seed: int, seeds: torch.Tensor | None, batch: int, device: torch.device):
    if seeds is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        return philox.seeds_from(seed, batch, device)
    if not isinstance(seeds, torch.Tensor) or seeds.ndim != 1:
        raise TypeError("seeds must be a 1-D integer tensor with one seed per sample")
    if seeds.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"seeds must be an integer tensor, got dtype {seeds.dtype}")
    if seeds.shape[0] != batch:
        raise ValueError(f"got {seeds.shape[0]} seeds for a batch of {batch} samples")
    return seeds.to(device=device, dtype=torch.int64)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t itself if contiguous or channels_last (what the fused kernels take), else a copy."""
    return t.contiguous(memory_format=philox.memory_format_of(t))


def sample(
    model: Model,
    sampler: Any,
    *,
    shape: Sequence[int] | None = None,
    x: torch.Tensor | None = None,
    seed: int = 0,
    seeds: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    cond_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    init_image: torch.Tensor | None = None,
    strength: float = 1.0,
    progress: bool = True,
    callback: Callable[[int, torch.Tensor, torch.Tensor], Any] | None = None,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Runs a sampler's reverse chain with ``model`` and returns the samples.

    Sample ``b`` is seeded by ``seeds[b]`` (default ``seed * 2**32 + b``); ``x_T`` is
    :func:`initial_noise` of the seeds. Each step is one :class:`fastdiff.loop.SamplingStep`:
    ``m = model(x, cond)`` (with ``guidance_scale``: on ``cat([x, x])``, returning ``[2B, ...]``,
    unconditional half first; :func:`guidance_pair`), then ``x = sampler.step(x, m, i, ...)``.
    With ``init_image`` the chain starts at ``start_index(num_steps, strength)`` from
    ``schedule.add_noise(init_image, x_T, timesteps[start])``; a chain's first step takes no
    previous x0 (a multistep sampler's first-order step).

    Args:
        model: ``model(x, cond) -> output`` in the sampler's prediction type.
        sampler: a ``fastdiff.Sampler``.
        shape: the samples' shape, batch first; or give ``x`` (or ``init_image``).
        x: explicit initial noise instead of the Philox draw (with ``init_image``: the noise
            added to it).
        seed: seeds the batch as above; ignored when ``seeds`` is given.
        seeds: int64 ``[B]``, one seed per sample.
        device: default: x's or init_image's device, else CUDA when available, else CPU.
        dtype: dtype of the samples (the model's input).
        guidance_scale: classifier-free guidance weight (None: no guidance).
        guidance_rescale: Lin et al. 2023 guidance rescale in [0, 1] (needs guidance_scale).
        cond_fn: classifier guidance: ``cond_fn(x, cond)`` returns the scaled gradient of
            log p(y | x_t), like x (stochastic samplers).
        init_image: clean data to start a truncated chain from (img2img, SDEdit).
        strength: fraction of the chain to run with ``init_image``, in (0, 1].
        progress: show a tqdm progress bar.
        callback: ``callback(i, x, x0)`` after each step (device tensors).
        cuda_graph: replay one captured step as a CUDA graph (:class:`fastdiff.SamplingGraph`):
            bitwise the same samples, without the model's launch overhead. Needs CUDA and a
            capturable model, which may be a ``torch.compile``d one in the default or
            ``"max-autotune-no-cudagraphs"`` mode (the fastest path; ``"reduce-overhead"``
            is refused, ValueError); else ``fastdiff.GraphCaptureError`` says why. The
            callback then gets static buffers.

    Returns:
        The samples, ``[B, ...]`` in ``dtype`` on ``device``.

    Raises:
        TypeError: a non-callable model, a non-sampler, wrongly typed seeds or shape.
        ValueError: shape and x both or neither, seeds of the wrong length, a model output of
            the wrong batch, a bad strength or init_image shape, guidance_rescale alone.

    Example::

        x = sample(gmm.denoiser(schedule), DDPMSampler(schedule, 1000), shape=(4000, 2))
    """
    guidance = {"guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale}
    body = SamplingStep(model, sampler, cond_fn=cond_fn, with_x0=callback is not None, **guidance)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if init_image is not None and not (
        isinstance(init_image, torch.Tensor) and init_image.is_floating_point()
    ):
        raise TypeError("init_image must be a floating-point tensor")
    if init_image is None and strength != 1.0:
        raise ValueError("strength applies only with init_image")
    num_steps = sampler.num_steps
    start = start_index(num_steps, strength) if init_image is not None else 0

    out_shape = _resolve_shape(shape, x, init_image)
    if device is None:
        given = x if x is not None else init_image
        if given is not None:
            device = given.device
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    batch = out_shape[0]
    seeds = _resolve_seeds(seed, seeds, batch, device)

    if x is not None:
        noise = _dense(x.to(device=device, dtype=dtype))
    else:
        noise = initial_noise(seeds, out_shape, dtype=dtype)
    if init_image is not None:
        image = _dense(init_image.to(device=device, dtype=dtype))
        x = sampler.schedule.add_noise(
            image, noise, sampler.timesteps[start]
        )  # a flow t is a float
        x = x.to(dtype)
    else:
        x = noise

    if cuda_graph:
        from fastdiff.graph import sample_graphed

        return sample_graphed(
            body, x, seeds=seeds, start=start, progress=progress, callback=callback
        )

    x0 = None
    steps = tqdm(
        range(start, num_steps),
        total=num_steps - start,
        disable=not progress,
        desc=type(sampler).__name__,
        leave=False,
    )
    for i in steps:
        result = body(x, i, seeds=seeds, x0_prev=x0, first=i == start)
        x, x0 = result.prev_sample, result.pred_original_sample
        if callback is not None:
            callback(i, x, x0)
    return x
