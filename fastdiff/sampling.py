"""The sampling loop: noise in, samples out, with any fastdiff sampler and any model.

``sample(model, sampler, shape=...)`` draws the initial noise, then for each step asks the
sampler what the model is conditioned on, calls the model, and lets the sampler take the
step (one fused kernel launch on the GPU). All noise, the initial ``x_T`` and every step's,
comes from the counter-based Philox stream of :mod:`fastdiff.philox`, keyed by a per-sample
seed, so a sample depends only on its own seed: not on the batch it is drawn in, its position
in the batch, the batch size or the device count.

The loop never synchronizes the host with the device (no ``.item()``, no printing of
tensors): only shapes are checked, so a whole run can be queued ahead of the GPU.

Example::

    sampler = DDIMSampler(schedule, 50)
    x = sample(model, sampler, shape=(16, 4, 64, 64), seed=1, device="cuda")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from fastdiff import philox

__all__ = ["INITIAL_NOISE_STREAM", "guidance_pair", "initial_noise", "sample", "start_index"]

# Stream of the initial noise x_T in fastdiff.philox (0 is the steps' noise).
INITIAL_NOISE_STREAM = 1

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    return _dense(noise)  # a strided view when a sample's size is not a multiple of 4


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


def _check_sampler(sampler: Any) -> None:
    for attr in ("num_steps", "timesteps", "model_condition", "step", "schedule"):
        if not hasattr(sampler, attr):
            raise TypeError(
                f"sampler must be a fastdiff sampler (missing {attr!r}), "
                f"got {type(sampler).__name__}"
            )


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
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous()


def _check_output(out: Any, expected_batch: int, guided: bool) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
    if out.shape[0] != expected_batch:
        if guided:
            raise ValueError(
                f"with guidance_scale the model is called on the doubled batch and must return "
                f"[2B={expected_batch}, ...] (unconditional half first); it returned "
                f"{tuple(out.shape)}"
            )
        raise ValueError(f"the model returned batch {out.shape[0]}, expected {expected_batch}")


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

    Noise: every sample has an int64 seed; with ``seeds=None`` sample ``b`` gets
    ``seed * 2**32 + b`` (:func:`fastdiff.philox.seeds_from`). The initial noise is
    ``philox.randn(seeds, 0, shape, stream=1)`` and each step's noise is drawn by the sampler
    from the same seeds (stream 0, keyed by the step index), so a sample depends on its seed
    alone: sample 0 of a batch of 3 equals sample 0 of a batch of 5 with the same seeds.

    Each step ``i``: ``cond = sampler.model_condition(i, B, device)``; ``m = model(x, cond)``;
    ``x = sampler.step(x, m, i, ...)``. With ``guidance_scale`` (classifier-free guidance) the
    model is called once on ``torch.cat([x, x])`` with ``torch.cat([cond, cond])`` and must
    return ``[2B, ...]`` with the **unconditional half first**, then the conditional half
    (:func:`guidance_pair` builds such a model from two). Multistep samplers (DPM-Solver++(2M))
    get the previous step's x0 (zeros before the first step).

    Truncated chains (img2img, SDEdit): with ``init_image`` the chain starts at step index
    ``start = num_steps - max(1, round(strength * num_steps))`` (:func:`start_index`) from
    ``schedule.add_noise(init_image, noise, timesteps[start])``. A multistep sampler's first
    step there is made first order (its x0_prev is the step's own x0).

    Args:
        model: ``model(x, cond) -> output`` in the sampler's prediction type.
        sampler: a ``fastdiff.samplers.Sampler``.
        shape: the samples' shape, batch first. Give exactly one of ``shape`` and ``x``
            (neither is needed with ``init_image``).
        x: explicit initial standard-normal noise instead of the Philox draw: ``x_T`` itself,
            or with ``init_image`` the noise added to the image. Moved to ``device``/``dtype``.
        seed: seeds the batch as above (an int in ``[0, 2**31)``); ignored when ``seeds`` is
            given.
        seeds: int64 tensor [B]: one seed per sample.
        device: where to sample; default: x's or init_image's device, else CUDA when available,
            else CPU.
        dtype: dtype of the samples (the model's input).
        guidance_scale: classifier-free guidance weight (None: no guidance; 1: the
            conditional model alone).
        guidance_rescale: Lin et al. 2023 guidance rescale in [0, 1] (needs guidance_scale).
        cond_fn: classifier guidance: ``cond_fn(x, cond)`` returns the already-scaled gradient
            of log p(y | x_t), like x; passed to the step as ``grad`` (stochastic samplers).
        init_image: clean data to start a truncated chain from (shape of the samples).
        strength: fraction of the chain to run with ``init_image``, in (0, 1].
        progress: show a tqdm progress bar.
        callback: ``callback(i, x, x0)`` after each step with the new sample and the step's
            predicted x0 (device tensors: do not sync in it if speed matters).
        cuda_graph: capture one step (model call, guidance, fused update) as a CUDA graph and
            replay it for every step (:mod:`fastdiff.graph`): bitwise the same samples, without
            the launch overhead of the model's kernels. Needs a CUDA device and a capturable
            model (else ``fastdiff.graph.GraphCaptureError`` says why); the callback then gets
            static buffers that the next step overwrites.

    Returns:
        The samples, ``[B, ...]`` in ``dtype`` on ``device``.

    Raises:
        TypeError: a non-callable model, a non-sampler, wrongly typed seeds/shape.
        ValueError: shape and x both or neither given, seeds of the wrong length, a guided
            model output that is not [2B, ...], strength outside (0, 1], an init_image whose
            shape differs from the samples', guidance_rescale without guidance_scale.

    Example::

        x = sample(gmm.denoiser(schedule), DDPMSampler(schedule, 1000), shape=(4000, 2))
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, cond), got {type(model).__name__}")
    _check_sampler(sampler)
    if cond_fn is not None and not callable(cond_fn):
        raise TypeError(f"cond_fn must be callable, got {type(cond_fn).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if guidance_scale is None and guidance_rescale:
        raise ValueError("guidance_rescale needs guidance_scale")
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
        x = sampler.schedule.add_noise(image, noise, int(sampler.timesteps[start]))
        x = x.to(dtype)
    else:
        x = noise

    if cuda_graph:
        from fastdiff.graph import sample_graphed

        return sample_graphed(
            model,
            sampler,
            x,
            seeds=seeds,
            start=start,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            cond_fn=cond_fn,
            progress=progress,
            callback=callback,
        )

    guided = guidance_scale is not None
    stochastic = bool(getattr(sampler, "stochastic", False))
    multistep = bool(getattr(sampler, "multistep", False))
    x0_prev = None
    want_x0 = multistep or callback is not None  # else the kernel skips writing x0
    step_kwargs: dict[str, Any] = {}
    if stochastic:
        step_kwargs["seeds"] = seeds
    if guided:
        step_kwargs["guidance_scale"] = guidance_scale
        step_kwargs["guidance_rescale"] = guidance_rescale

    steps = tqdm(
        range(start, num_steps),
        total=num_steps - start,
        disable=not progress,
        desc=type(sampler).__name__,
        leave=False,
    )
    for i in steps:
        cond = sampler.model_condition(i, batch, device)
        if guided:
            out = model(torch.cat([x, x]), torch.cat([cond, cond]))
            _check_output(out, 2 * batch, guided=True)
        else:
            out = model(x, cond)
            _check_output(out, batch, guided=False)
        grad = cond_fn(x, cond) if cond_fn is not None else None
        # A chain's first step has no previous x0: without one, a multistep sampler takes
        # its first-order step (this matters for truncated chains that start past step 0).
        prev = x0_prev if i > start else None
        result = sampler.step(x, out, i, x0_prev=prev, grad=grad, return_x0=want_x0, **step_kwargs)
        x = result.prev_sample
        if multistep:
            x0_prev = result.pred_original_sample
        if callback is not None:
            callback(i, x, result.pred_original_sample)
    return x
