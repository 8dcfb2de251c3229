"""Helpers of the fused diffusers schedulers that hold no scheduler state: the fused
``__init__``, the device-side index lookup, host-to-device uploads, the kernel's memory
layout, dtype promotion, diffusers output objects and the poison row.

Example:
    >>> rows = device_index(plan, timestep, miss=len(plan))
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from fastdiff.kernels.fused_step import COLUMNS

__all__ = [
    "dense",
    "device_index",
    "fused_init",
    "fused_set_timesteps",
    "host_index",
    "make_output",
    "memo_key",
    "mirrored_step",
    "nan_row",
    "step_output",
    "promote",
    "upload",
]


def fused_init(diffusers_cls: type) -> Callable[..., None]:
    """An ``__init__`` for a fused subclass of ``diffusers_cls``: diffusers' own parameters
    (registered to the config by diffusers' decorator) plus two keyword-only runtime choices
    that are not part of the config (so saved configs stay loadable by diffusers):
    ``backend`` and ``noise`` (see ``FusedSchedulerMixin``).

    Args:
        diffusers_cls: the diffusers scheduler class being subclassed.

    Returns:
        The ``__init__`` function, with a signature that ``from_config`` understands.
    """

    def __init__(
        self, *args: Any, backend: str | None = None, noise: str = "torch", **kwargs: Any
    ) -> None:
        diffusers_cls.__init__(self, *args, **kwargs)
        self._setup_fused(backend, noise)

    signature = inspect.signature(diffusers_cls.__init__)
    extra = [
        inspect.Parameter(
            "backend", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None"
        ),
        inspect.Parameter(
            "noise", inspect.Parameter.KEYWORD_ONLY, default="torch", annotation="str"
        ),
    ]
    __init__.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    __init__.__doc__ = (
        f"Same parameters as ``diffusers.{diffusers_cls.__name__}``, plus ``backend``: "
        '"triton", "reference", "auto" or None (``FASTDIFF_BACKEND``, else auto), and '
        '``noise``: "torch" (the step noise diffusers draws, the default) or "philox" '
        "(in-kernel noise; see ``fastdiff.diffusers``)."
    )
    return __init__


def fused_set_timesteps(diffusers_cls: type) -> Callable[..., None]:
    """A ``set_timesteps`` for a fused subclass of ``diffusers_cls``: diffusers' own plan, with
    diffusers' signature (pipelines inspect it for ``timesteps`` / ``sigmas``). Before it: the
    config check and the class's ``_check_plan(arguments)`` (if it has one; the bound arguments
    by name); diffusers plans on ``_planning_device(device)`` (on its error the scheduler's
    attributes are put back as they were); after it ``_plan_changed(device)``. Tables are
    built at the next step. Called by diffusers' ``__init__`` (before the fused setup): its
    plan alone.

    Args:
        diffusers_cls: the diffusers scheduler class being subclassed.

    Returns:
        The ``set_timesteps`` method.
    """
    plan = diffusers_cls.set_timesteps
    signature = inspect.signature(plan)
    names = list(signature.parameters)[1:]  # self excluded
    at = names.index("device")
    defaults = {
        name: p.default for name, p in signature.parameters.items() if p.default is not p.empty
    }

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        if "_plan_state" not in vars(self):  # diffusers' __init__ plans before the fused setup
            plan(self, *args, **kwargs)
            return
        self.check_config()
        key = memo_key(args, kwargs)  # (None: arguments the plan memo does not key on)
        if key is not None and self._plan_recall(key):
            return  # the same call as a recorded one: diffusers' attributes put back
        # (looked up on the class: a missing instance attribute goes through diffusers'
        # ConfigMixin.__getattr__, which costs a microsecond)
        check = getattr(type(self), "_check_plan", None)
        if check is not None:  # by name, without inspect's bind (diffusers' call checks them)
            check(self, {**defaults, **dict(zip(names, args)), **kwargs})
        if "device" in kwargs:
            device = kwargs["device"]
            kwargs["device"] = self._planning_device(device)
        elif len(args) > at:
            device = args[at]
            args = (*args[:at], self._planning_device(device), *args[at + 1 :])
        else:
            device = None
        saved = vars(self).copy()  # diffusers sets some attributes before its own checks
        record = key is not None and self._plan_wanted(key)
        try:
            if record:  # (a key seen before: diffusers' call traced, then recorded)
                record = self._plan_traced(plan, args, kwargs)
            else:
                plan(self, *args, **kwargs)
        except Exception:
            vars(self).clear()
            vars(self).update(saved)
            raise
        self._plan_changed(device)
        if record:
            self._plan_record(key, device, record)

    set_timesteps.__signature__ = signature
    set_timesteps.__doc__ = (
        f"diffusers' ``{diffusers_cls.__name__}.set_timesteps`` (same arguments); the fused "
        "step's tables are built at the next step."
    )
    return set_timesteps


_SCALARS = frozenset({type(None), bool, int, str})


def memo_key(args: tuple, kwargs: dict) -> tuple | None:
    """The plan memo's key for a ``set_timesteps`` call (``PlanTablesMixin._plan_recall``):
    each argument with its exact type (``50`` and ``50.0`` differ; a float with its sign, for
    -0.0), a device with the CUDA device it means when it names none, and torch's default
    dtype (diffusers makes some tensors in it); None when an argument is anything else (a
    list, an array, a tensor: such calls are planned by diffusers every time).

    Args:
        args: the positional arguments of the call, ``self`` excluded.
        kwargs: its keyword arguments.

    Returns:
        A hashable key, or None.
    """
    key = [torch.get_default_dtype()]
    for name, value in (*enumerate(args), *kwargs.items()):
        kind = type(value)
        if kind in _SCALARS:
            if kind is str and value != "cpu" and ":" not in value:
                try:
                    value = _device_part(torch.device(value))
                except RuntimeError:  # (not a device: diffusers' own error, unkeyed)
                    return None
                if value is None:
                    return None
            key.append((name, kind, value))
        elif kind is float:
            key.append((name, kind, value, math.copysign(1.0, value)))
        elif kind is torch.device:
            part = value if value.type == "cpu" or value.index is not None else _device_part(value)
            if part is None:
                return None
            key.append((name, kind, part))
        else:
            return None
    return tuple(key)


def _device_part(device: torch.device) -> tuple | None:
    """A device that names no index, as a key: CUDA's current device; None for others."""
    if device.type == "cuda" and torch.cuda.is_available():
        return ("cuda", torch.cuda.current_device())
    return None


def mirrored_step(diffusers_cls: type, extras: dict[str, Any], doc: str | None) -> Callable:
    """A ``step`` for a fused subclass of ``diffusers_cls``, with diffusers' signature
    (pipelines inspect it for ``eta`` / ``generator``) plus the keyword-only ``extras`` (name
    -> default). It binds the call by name, fills in the defaults, and returns
    ``self._step(model_output, timestep, sample, call)``, ``call`` the dict of the other
    arguments by name. An argument diffusers' step does not take is a TypeError, as there.

    Args:
        diffusers_cls: the diffusers scheduler class being subclassed.
        extras: keyword-only arguments the fused step takes besides diffusers' ones.
        doc: the class's ``_step`` docstring (what the step adds to diffusers' contract).

    Returns:
        The ``step`` method.
    """
    signature = inspect.signature(diffusers_cls.step)
    params = list(signature.parameters.values())[4:]  # after self, model_output, timestep, sample
    names = [p.name for p in params]
    defaults = {p.name: p.default for p in params}
    defaults.update(extras)
    accepted = frozenset(defaults)

    def step(self, model_output, timestep, sample, *args, **kwargs):
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            bad = "model_output" if not isinstance(model_output, torch.Tensor) else "sample"
            raise TypeError(f"step(): {bad} must be a tensor, got {type(locals()[bad]).__name__}")
        if not kwargs and not args:  # (the common call: the defaults, copied)
            return self._step(model_output, timestep, sample, defaults.copy())
        if args:
            if len(args) > len(names):
                raise TypeError(
                    f"{type(self).__name__}.step() takes at most {len(names) + 3} positional "
                    f"arguments besides self ({len(args) + 3} given)"
                )
            given = dict(zip(names, args))
            twice = given.keys() & kwargs.keys()
            if twice:
                raise TypeError(f"step() got multiple values for argument {sorted(twice)[0]!r}")
            kwargs.update(given)
        if not accepted.issuperset(kwargs):
            unknown = sorted(set(kwargs) - accepted)[0]
            raise TypeError(f"step() got an unexpected keyword argument {unknown!r}")
        return self._step(model_output, timestep, sample, {**defaults, **kwargs})

    keyword = inspect.Parameter.KEYWORD_ONLY
    added = [inspect.Parameter(name, keyword, default=value) for name, value in extras.items()]
    step.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *added])
    step.__doc__ = (
        f"diffusers' ``{diffusers_cls.__name__}.step`` (same arguments"
        + (f"; also {', '.join(f'``{name}``' for name in extras)}" if extras else "")
        + "): one fused kernel launch.\n\n"
        + inspect.cleandoc(doc or "")
    )
    return step


def device_index(schedule: torch.Tensor, timestep: torch.Tensor, miss: int) -> torch.Tensor:
    """Position of ``timestep`` in ``schedule`` computed on the device, without a sync.

    Same rule as diffusers' ``index_for_timestep``: the first match, or the second when the
    timestep occurs more than once (so an img2img loop starting at a repeated timestep does
    not skip a step); ``miss`` when it does not occur.

    Args:
        schedule: the plan's timesteps ``[n]`` on the device.
        timestep: 0-d or ``[B]`` tensor on the same device.
        miss: the index returned for a timestep not in the plan.

    Returns:
        int64 tensor of ``timestep``'s shape.
    """
    eq = schedule[None, :] == timestep.reshape(-1, 1)
    count = eq.sum(dim=1)
    wanted = torch.where(count > 1, 2, 1)
    hit = eq & (eq.cumsum(dim=1) == wanted[:, None])
    index = torch.where(count > 0, hit.to(torch.int32).argmax(dim=1).long(), miss)
    return index.reshape(timestep.shape)


def host_index(schedule: torch.Tensor, timestep: Any, miss: int | None) -> int:
    """``device_index`` on the host (CPU schedule, host timestep); ``miss=None`` raises."""
    found = (schedule == timestep).nonzero().flatten().tolist()
    if not found:
        if miss is None:
            raise ValueError(
                f"timestep {timestep} is not in the scheduler's timesteps; pass one of "
                "scheduler.timesteps (after set_timesteps) or call set_begin_index"
            )
        return miss
    return found[1] if len(found) > 1 else found[0]


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to ``device`` without a host sync: through pinned memory,
    asynchronously, for CUDA (PyTorch keeps the pinned block until the copy is done)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def dense(x: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """``x`` as the kernel takes it: contiguous or channels_last (a copy only if neither, or
    if ``contiguous`` is asked)."""
    if contiguous or not (
        x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    ):
        return x.contiguous()
    return x


_PROMOTED: dict[tuple[torch.dtype, torch.dtype], torch.dtype] = {}


def promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types(a, b)``, memoized (the call costs over a microsecond)."""
    dtype = _PROMOTED.get((a, b))
    if dtype is None:
        dtype = _PROMOTED[(a, b)] = torch.promote_types(a, b)
    return dtype


_OUTPUT_FIELDS: dict[type, tuple[str, ...]] = {}
_set_item = OrderedDict.__setitem__  # BaseOutput.__setitem__ would also set the attribute


def _field_names(cls: type) -> tuple[str, ...]:
    names = _OUTPUT_FIELDS[cls] = tuple(field.name for field in dataclasses.fields(cls))
    return names


def step_output(cls: type, return_dict: bool, prev: Any, x0: Any) -> Any:
    """A step's result as diffusers returns it: ``cls(prev_sample[, pred_original_sample])``
    (x0 only when the class has that field) or, without ``return_dict``, the tuple of the
    same values. The object is built directly: the one the dataclass constructor builds
    (every field an attribute, the non-None ones also items of the ``BaseOutput``
    OrderedDict, in field order), without the constructor's ``__post_init__`` walk over
    ``dataclasses.fields`` (~10 microseconds a step)."""
    names = _OUTPUT_FIELDS.get(cls)
    if names is None:
        names = _field_names(cls)
    two = len(names) == 2
    if not return_dict:
        return (prev, x0) if two else (prev,)
    out = cls.__new__(cls)
    attributes = out.__dict__  # (the fields unrolled: a loop costs a microsecond here)
    attributes[names[0]] = prev
    if prev is not None:
        _set_item(out, names[0], prev)
    if two:
        attributes[names[1]] = x0
        if x0 is not None:
            _set_item(out, names[1], x0)
    return out


def make_output(cls: type, *values: Any) -> Any:
    """``cls(*values)`` for a diffusers output dataclass, built as ``step_output`` builds it.

    Args:
        cls: a ``diffusers.utils.BaseOutput`` dataclass with one or two fields.
        *values: its fields' values, in field order (all of them).

    Returns:
        The output object.
    """
    names = _OUTPUT_FIELDS.get(cls)
    if names is None:
        names = _field_names(cls)
    if len(values) != len(names) or len(names) > 2:
        raise AssertionError(f"internal: {cls.__name__} has fields {names}")
    return step_output(cls, True, values[0], values[1] if len(values) == 2 else None)


def nan_row() -> torch.Tensor:
    """A poison row: a step that lands on it gives NaN instead of a wrong result."""
    return torch.full((1, len(COLUMNS)), float("nan"), dtype=torch.float64)
