"""Which model a rank samples with: a ``model(x, cond)``, ``"gmm"`` or ``"module:callable"``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FACTORY_KWARGS", "gmm_model", "model_id_of", "resolve_model"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# The keyword arguments a "module:callable" model factory is called with.
FACTORY_KWARGS = ("device", "dtype", "sampler")


def gmm_model(*, device: torch.device, dtype: torch.dtype, sampler: Any) -> Model:
    """``--model gmm``: the exact denoiser of :func:`fastdiff.gmm.demo_mixture` (samples of
    shape ``[B, 2]``) in the sampler's prediction type and conditioning."""
    from fastdiff.gmm import demo_mixture

    del device, dtype  # the denoiser follows its input
    return demo_mixture().denoiser(
        sampler.schedule,
        getattr(sampler, "prediction_type", "epsilon"),
        getattr(sampler, "conditioning", "timestep"),
    )


def _import(spec: str) -> Callable[..., Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model spec {spec!r}: use 'gmm' or 'package.module:callable'")
    try:
        factory: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model spec {spec!r} does not import: {err}") from err
    if not callable(factory):
        raise TypeError(f"model spec {spec!r} names a {type(factory).__name__}, not a callable")
    return factory


def resolve_model(
    model: Model | str, sampler: Any, device: torch.device, dtype: torch.dtype
) -> tuple[Model, str]:
    """The model a rank samples with, and its default id for the manifest.

    ``model`` is a ``model(x, cond) -> output`` (used as it is: a function, an ``nn.Module``),
    or a spec string:

    * ``"gmm"``: the built-in 2-D Gaussian mixture with its exact denoiser;
    * ``"package.module:callable"``: imported on each rank and called once there, after
      ``torch.cuda.set_device``, as ``callable(device=device, dtype=dtype, sampler=sampler)``
      (:data:`FACTORY_KWARGS`; take ``**kwargs`` for those you do not use). It returns the
      model on that device, in eval mode.

    Args:
        model: as above.
        sampler: the sampler.
        device: this rank's device.
        dtype: the samples' dtype.

    Returns:
        ``(model, id)``: the id is the spec string, or the model's qualified name.

    Example::

        # mypackage/models.py; then --model mypackage.models:build
        def build(device, dtype, **_):
            return load_unet("ckpt.pt").to(device, dtype).eval()
    """
    if not isinstance(model, str):
        if not callable(model):
            raise TypeError(
                f"model must be a model(x, cond) or a spec string, got {type(model).__name__}"
            )
        return model, model_id_of(model)
    factory = gmm_model if model == "gmm" else _import(model)
    try:
        built = factory(device=device, dtype=dtype, sampler=sampler)
    except TypeError as err:
        raise TypeError(
            f"{model}(device=..., dtype=..., sampler=...) failed: {err} (a model factory takes "
            "these keyword arguments; accept **kwargs for those it does not use)"
        ) from err
    if not callable(built):
        raise TypeError(f"{model} returned a {type(built).__name__}, not a model(x, cond)")
    return built, model


def model_id_of(model: Model | str) -> str:
    """A model's default id: the spec string, or ``module.qualname`` of the function or class
    (of the object's class for other callables)."""
    if isinstance(model, str):
        return model
    target = model if hasattr(model, "__qualname__") else type(model)
    return f"{getattr(target, '__module__', None) or '?'}.{target.__qualname__}"
