"""The plan and the tables of the fused diffusers schedulers (mixed into
``FusedSchedulerMixin``): diffusers' plan kept on the host after ``set_timesteps``, the
coefficient tables built from it once per step-time options and uploaded once per device,
and the table rows a step reads.

Rows and host syncs. A row is chosen either on the host (a python int step index or
timestep: a slice of a cached device ``arange``, no copy) or on the device (a timestep given
as a CUDA tensor: integer arithmetic or a gather on the device, never ``nonzero()`` or
``.item()``). Tables end in NaN "poison" rows that a timestep missing from the plan maps to,
so a device lookup that finds nothing gives NaN instead of a silently wrong step.

The plan memo. A ``set_timesteps`` call whose arguments are all scalars or devices
(``memo_key``) is planned by diffusers the first two times; the second time diffusers' call
is traced (the scheduler's class swapped for a subclass that logs attribute reads and
writes) and recorded: the attributes it wrote (a list: a new copy each time) and the plan
bookkeeping. Later calls with the same key put those attributes back without diffusers'
computation (``_plan_changed`` still runs, on the recorded host plan) when the call would
read the same things: the same config object with the same attributes, the same instance
attributes that diffusers read before writing them (tensors: not changed in place since),
the same class attributes that are data, and the recorded tensors unchanged. A call that
changes the config's attributes, reads or writes anything else (another object, a dict, a
deleted attribute, a property), or fails, is not recorded.

Example:
    >>> tabs = self._device_tables(("ddim", eta), x.device, lambda: self._build(eta))
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fastdiff.diffusers._common import upload
from fastdiff.kernels.fused_step import COLUMNS

__all__ = ["MEMO_ENTRIES", "PlanTablesMixin"]

MEMO_ENTRIES = 16  # plans recorded per scheduler and config (0: no memo)
_MISSING = object()
_LOCAL = threading.local()  # .active: the traces of this thread's traced calls (innermost last)
_TRACERS: dict[type, type] = {}


def _immutable(value: Any) -> bool:
    return value is None or type(value) in (bool, int, float, str) or isinstance(value, np.generic)


def _same_vars(a: dict, b: dict) -> bool:
    """``a == b`` for two attribute dicts (False where a value has no truth: an array)."""
    try:
        return a == b
    except Exception:
        return False


class _Trace:
    """What a traced diffusers set_timesteps read and wrote on the scheduler."""

    __slots__ = ("reads", "class_reads", "writes", "bad")

    def __init__(self) -> None:
        self.reads: dict[str, Any] = {}  # instance attributes read before written
        self.class_reads: dict[str, Any] = {}  # class attributes that are data
        self.writes: dict[str, None] = {}
        self.bad = False  # an attribute deleted


def _traced_getattribute(self, name):
    value = object.__getattribute__(self, name)
    trace = _LOCAL.active[-1]
    if name not in trace.writes and name not in trace.reads and name not in trace.class_reads:
        if object.__getattribute__(self, "__dict__").get(name, _MISSING) is value:
            trace.reads[name] = value
        else:
            static = getattr(type(self).__mro__[1], name, _MISSING)
            if static is value and not callable(value):
                trace.class_reads[name] = value
    return value


def _traced_setattr(self, name, value):
    _LOCAL.active[-1].writes[name] = None
    object.__setattr__(self, name, value)


def _traced_delattr(self, name):
    _LOCAL.active[-1].bad = True
    object.__delattr__(self, name)


def _tracer(cls: type) -> type:
    """``cls`` with attribute reads and writes logged (the class of a traced call)."""
    tracer = _TRACERS.get(cls)
    if tracer is None:
        members = {
            "__getattribute__": _traced_getattribute,
            "__setattr__": _traced_setattr,
            "__delattr__": _traced_delattr,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        tracer = _TRACERS[cls] = type(cls.__name__, (cls,), members)
    return tracer


def _refresh(entry: _Entry) -> None:
    """The entry's tensors replaced by copies (the same sharing among them): a plan recalled
    after another one gets new tensors, as diffusers makes them, while a repeated call keeps
    the ones it handed out (as ``_plan_changed`` keeps an uploaded plan)."""
    copies: dict[int, torch.Tensor] = {}

    def fresh(tensor: torch.Tensor) -> torch.Tensor:
        copy = copies.get(id(tensor))
        if copy is None:
            copy = copies[id(tensor)] = tensor.clone()
        return copy

    entry.fixed = {
        name: fresh(value) if isinstance(value, torch.Tensor) else value
        for name, value in entry.fixed.items()
    }
    entry.host, entry.placed = fresh(entry.host), fresh(entry.placed)
    entry.tensors = [(tensor, tensor._version) for tensor in copies.values()]


class _Entry:
    """A recorded set_timesteps call (see the module docstring)."""

    __slots__ = (
        "fixed",
        "lists",
        "inputs",
        "class_inputs",
        "tensors",
        "config_vars",
        "device",
        "host",
        "values",
        "planned_on_host",
        "placed",
    )


class PlanTablesMixin:
    """The plan on the host and the device tables (see the module docstring)."""

    def _planning_device(self, device: torch.device | str | None) -> torch.device | str | None:
        """The device to hand diffusers' set_timesteps: None (plan on the host; ``_plan_changed``
        then uploads the timesteps, asynchronously, and nothing is read back from the device)
        unless diffusers computes plan values on the device."""
        return None

    def _plan_changed(self, device: torch.device | str | None) -> None:
        """After diffusers' set_timesteps: keep the plan's values on the host (python floats
        or ints, and the host tensor), put ``self.timesteps`` where the caller wants it, draw
        a new noise seed at the next stochastic step. Tables are kept when the plan is the
        same as before (a loop that calls set_timesteps again, e.g. before a CUDA graph
        capture, uploads nothing)."""
        hit = vars(self).pop("_plan_hit", None)  # a recorded call (``_plan_recall``)
        if hit is None:
            host = self.timesteps
            planned_on_host = host.is_cpu
            if not planned_on_host:  # planned on the device (``_planning_device``)
                host = host.cpu()
            values = host.tolist()
        else:
            host, values, planned_on_host = hit.host, hit.values, hit.planned_on_host
        sigmas = vars(self).get("sigmas")  # (getattr of a missing attribute costs microseconds)
        state = (values, host.dtype, self._plan_signature())
        previous = self._plan_sigmas
        same = state == self._plan_state and (
            previous is sigmas
            or (sigmas is not None and previous is not None and torch.equal(sigmas, previous))
        )
        if planned_on_host and device is not None and hit is not None:
            self.timesteps = hit.placed  # (recorded for this device; copied after another plan)
        elif planned_on_host and device is not None:
            # the same plan on the same device: the uploaded timesteps again (no copy)
            target = torch.device(device)
            if target.type == "cuda" and target.index is None:
                target = torch.device("cuda", torch.cuda.current_device())
            kept = self._plan_tensor if same else None
            if kept is not None and kept.device == target and kept.dim() == 1:
                self.timesteps = kept
            else:
                self.timesteps = upload(host, target)
        if not same:
            self._tables.clear()
            self._launches.clear()  # (keyed by the tables, among others)
            self._last_tables = None
            self._plan_device.clear()
        self._plan_state = state
        self._plan_host = host
        # diffusers' set_timesteps makes new sigmas each time (it never changes them in place)
        self._plan_sigmas = sigmas
        self._plan_values = values
        self._plan_len = len(values)
        plan = self.timesteps  # the tensor the pipeline iterates
        if plan is not self._plan_tensor:  # (the same tensor kept: the same address)
            self._plan_tensor = plan
            self._plan_address = (
                plan.data_ptr(),
                plan.stride(0) * plan.element_size() if plan.dim() == 1 else 0,
                plan.dtype,
                plan.device,
            )
        self._seeds_cache.clear()
        self._seed = None

    # -- the plan memo (see the module docstring) -------------------------------------------

    def _plan_recall(self, key: tuple) -> bool:
        """set_timesteps for a recorded call: diffusers' attributes put back and the plan
        kept (``_plan_changed`` on the recorded host plan); False when there is none, or when
        the call could plan otherwise (the checks in the module docstring)."""
        attributes = vars(self)
        memo = attributes.get("_plan_memo")
        if memo is None:
            return False
        config, entries, _ = memo
        entry = entries.get(key)
        if entry is None or config is not attributes.get("_internal_dict"):
            return False
        if not _same_vars(vars(config), entry.config_vars):
            return False
        for name, value, version in entry.inputs:
            if attributes.get(name, _MISSING) is not value:
                return False
            if version is not None and value._version != version:
                return False
        cls = type(self)
        for name, value in entry.class_inputs:
            if getattr(cls, name, _MISSING) is not value:
                return False
        for tensor, version in entry.tensors:
            if tensor._version != version:  # changed in place: planned again
                del entries[key]
                return False
        if attributes.get("_plan_host") is not entry.host:  # another plan since: new tensors
            _refresh(entry)
        attributes.update(entry.fixed)
        for name, items in entry.lists:
            attributes[name] = list(items)
        attributes["_plan_hit"] = entry
        try:
            self._plan_changed(entry.device)
        finally:
            attributes.pop("_plan_hit", None)
        return True

    def _plan_memo_for(self, config: Any) -> tuple:
        memo = vars(self).get("_plan_memo")
        if memo is None or memo[0] is not config:  # (keeps the config alive: keyed by identity)
            memo = self._plan_memo = (config, {}, set())
        return memo

    def _plan_wanted(self, key: tuple) -> bool:
        """Whether to trace and record this call: its key was seen before (a call with
        arguments that never come back costs a set insertion, not a trace)."""
        if MEMO_ENTRIES <= 0:
            return False
        seen = self._plan_memo_for(self.config)[2]
        if key in seen:
            return True
        if len(seen) >= 4 * MEMO_ENTRIES:
            seen.clear()
        seen.add(key)
        return False

    def _plan_traced(self, plan: Callable, args: tuple, kwargs: dict) -> tuple | None:
        """diffusers' ``plan(self, *args, **kwargs)`` traced: (trace, config, the config's
        attributes before, the attributes written with their values after); None: run
        untraced (a class with its own attribute access or slots)."""
        cls = type(self)
        if (
            cls.__getattribute__ is not object.__getattribute__
            or cls.__setattr__ is not object.__setattr__
            or cls.__delattr__ is not object.__delattr__
            or "__slots__" in vars(cls)
        ):  # (a class with its own attribute access: not traced, not recorded)
            plan(self, *args, **kwargs)
            return None
        config = self.config
        before = dict(vars(config))
        trace = _Trace()
        active = vars(_LOCAL).setdefault("active", [])
        active.append(trace)
        object.__setattr__(self, "__class__", _tracer(cls))
        try:
            plan(self, *args, **kwargs)
        finally:
            object.__setattr__(self, "__class__", cls)
            active.pop()
        attributes = vars(self)
        written = {name: attributes.get(name, _MISSING) for name in trace.writes}
        return trace, config, before, written

    def _plan_record(self, key: tuple, device: Any, record: tuple) -> None:
        """After ``_plan_changed``: the traced call recorded, if it can be (the module
        docstring)."""
        trace, config, before, written = record
        if trace.bad or self.config is not config or not _same_vars(vars(config), before):
            return
        entry = _Entry()
        entry.inputs = inputs = []
        for name, value in trace.reads.items():
            if name == "_internal_dict":  # the config: the memo's key
                continue
            if isinstance(value, torch.Tensor):
                inputs.append((name, value, value._version))
            elif _immutable(value):
                inputs.append((name, value, None))
            else:  # (another object's state, a scheduler's solver_p, ...)
                return
        entry.class_inputs = list(trace.class_reads.items())
        cls = type(self)
        entry.fixed, entry.lists, entry.tensors = fixed, lists, tensors = {}, [], []
        for name, value in written.items():
            if value is _MISSING or hasattr(type(getattr(cls, name, None)), "__set__"):
                return  # (deleted, or a property)
            if isinstance(value, torch.Tensor):
                fixed[name] = value
                tensors.append((value, value._version))
            elif type(value) is list and all(_immutable(item) for item in value):
                lists.append((name, tuple(value)))
            elif _immutable(value):
                fixed[name] = value
            else:
                return
        entry.config_vars = before
        entry.device = device
        entry.host, entry.values = self._plan_host, self._plan_values
        entry.planned_on_host = fixed.get("timesteps", self._plan_host).is_cpu
        entry.placed = self._plan_tensor
        for tensor in (entry.host, entry.placed):
            tensors.append((tensor, tensor._version))
        entries = self._plan_memo_for(config)[1]
        if len(entries) >= MEMO_ENTRIES:
            del entries[next(iter(entries))]  # the oldest
        entries[key] = entry

    def _plan_signature(self) -> tuple:
        """Plan state besides the timesteps and sigmas that the tables depend on."""
        return (self.num_inference_steps, vars(self).get("custom_timesteps"))

    # -- tables ------------------------------------------------------------------------------

    def _device_tables(
        self, key: tuple, device: torch.device, build: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The tables for ``key`` on ``device`` (built on the host once per key, uploaded once
        per device). ``build`` returns CPU tensors: "table" float64 ``[R, len(COLUMNS)]`` and
        per-row schedule values ``[R]`` for the reference path."""
        last = self._last_tables  # the common case: the same tables as the previous step
        if last is not None and last[0] == key and last[1] == device:
            return last[2]
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        per_key = self._tables.get(key)
        if per_key is None:
            host = build()
            table = host["table"]
            if table.dim() != 2 or table.shape[1] != len(COLUMNS):
                raise AssertionError("internal: coefficient table has the wrong shape")
            per_key = self._tables[key] = {"host": host}
        cached = per_key.get(device)
        if cached is None:
            host = per_key["host"]
            cached = {
                name: upload(value.float().contiguous() if name == "table" else value, device)
                for name, value in host.items()
            }
            cached["arange"] = torch.arange(len(host["table"]), dtype=torch.int64, device=device)
            cached["row_views"] = {}
            per_key[device] = cached
        self._last_tables = (key, device, cached)
        return cached

    @staticmethod
    def _row(tables: dict[str, torch.Tensor], row: int) -> torch.Tensor:
        """Row ``row`` as the kernel takes it: ``tables["arange"][row : row + 1]``, a view
        made once per row (slicing a tensor costs microseconds)."""
        views = tables["row_views"]
        view = views.get(row)
        if view is None:
            view = views[row] = tables["arange"][row : row + 1]
        return view
