"""The step template of the fused diffusers schedulers (mixed into ``FusedSchedulerMixin``):
``_begin_step`` (plan and config checks, the step index, the kernel's layout), the step's
noise, ``_rule`` (the reference path's step), ``_step_once`` (one step through
``fastdiff.stepping.run_step``, or the launch cached for its input signature) and ``_fused``
(run, ``_end_step``, diffusers' output). These three take their arguments by position only
(binding keywords costs about a microsecond a layer on the hot path).

The launch cache: the first kernel-path step of an input signature (shapes, strides, dtypes,
devices and alignment of the sample, model output, noise and previous x0; the table, seeds
and history buffers by identity; the rows' layout; the step options and output dtypes) is
checked by ``fastdiff.kernels.fused_step.step_config`` and its configuration kept; a later
step of that signature launches it directly (``step_with_config``), unchecked. Any other
input (a new signature, a layout ``run_step`` would copy, the reference backend) takes
``run_step``.

Noise (``noise=``, a keyword-only constructor option like ``backend``, not saved to the
config). "torch", the default: the noise is drawn exactly as the diffusers class draws it
(the same ``randn_tensor`` call, same shape, dtype and device, on the same steps), from the
``generator`` passed to ``step`` or, without one, from torch's global RNG, and passed to the
kernel: the same images as the stock scheduler for the same seed, and the global stream in
the same state afterwards. "philox": without a generator the kernel makes the noise itself,
Philox keyed by (per-sample seed, table row, element); the seeds come from one integer drawn
from torch's global CPU RNG at the first step that needs noise after ``set_timesteps`` (so
deterministic schedulers never touch the global RNG). A ``generator`` or ``variance_noise``
passed to ``step`` is used as diffusers uses it in both modes.

Example:
    >>> x = self._begin_step(timestep, sample)
    >>> return self._fused(x, model_output, tabs, rows, reference_step, return_dict, x.dtype,
    ...                    x.dtype, noise, seeds, None, {})
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from fastdiff import backend as backends
from fastdiff import philox
from fastdiff.diffusers._common import dense, step_output
from fastdiff.kernels import fused_step as fused_kernel
from fastdiff.stepping import run_step

__all__ = ["LaunchCache", "StepTemplateMixin"]

# diffusers' own randn_tensor: _step_noise's inline draw is its exact copy only while the module's
# ``randn_tensor`` is still this one (tests patch ``fastdiff.diffusers._step.randn_tensor``
# to inject noise; a patched one is called).
_DIFFUSERS_RANDN = randn_tensor

# The kernel options a drop-in step passes to _step_once besides the tensors, with
# run_step's defaults.
_KERNEL_OPTIONS = {
    "clip_range": None,
    "thresholding": None,
    "variance_mode": "fixed",
    "write_x0": True,
    "x0_out": None,
    "history": None,
    "last_sample": None,
    "x0_noise": False,
}


class LaunchCache(dict):
    """A scheduler's kernel-path configurations by input signature (``_step_once``). A copy
    of the scheduler (``copy.deepcopy``, as some diffusers pipelines make; pickling) gets an
    empty one: the configurations hold compiled kernels, and the copy checks its inputs
    again at its first step."""

    def __deepcopy__(self, memo):
        return LaunchCache()

    def __reduce__(self):
        return (LaunchCache, ())


def _dtypes(x, model_output, noise, x0_prev, out_dtype, x0_dtype, options) -> tuple:
    """The dtypes run_step resolves an "auto" backend with (those of its outputs, with its
    defaults, and of its inputs)."""
    out_dtype = out_dtype or x.dtype
    x0_out = options.get("x0_out")
    x0_dtype = x0_out.dtype if x0_out is not None else (x0_dtype or out_dtype)
    dtypes = (out_dtype, x0_dtype, model_output.dtype)
    return dtypes + tuple(t.dtype for t in (x0_prev, noise) if t is not None)


class StepTemplateMixin:
    """The step template and the step noise (see the module docstring)."""

    _kernel_table = "table"  # the key of the device table the kernel reads

    # -- noise -------------------------------------------------------------------------------

    def _philox_seeds(self, batch: int, device: torch.device) -> torch.Tensor:
        """Per-sample Philox keys: one integer from torch's global RNG per set_timesteps."""
        if self._seed is None:
            self._seed = int(torch.randint(0, 2**31, (1,)).item())  # CPU RNG: no device sync
        key = (device, batch)
        seeds = self._seeds_cache.get(key)
        if seeds is None:
            seeds = self._seeds_cache[key] = philox.seeds_from(self._seed, batch, device)
        return seeds

    def _step_noise(
        self,
        like: torch.Tensor,
        x: torch.Tensor,
        generator: torch.Generator | None,
        variance_noise: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The noise of a step that adds noise, as ``(noise, seeds)`` for ``_step_once``.

        Drawn as diffusers draws it, ``randn_tensor(like.shape, generator, like.device,
        dtype)``: its common case (no generator, or one generator on the tensor's device
        type) inline, the same ``torch.randn`` call without ``randn_tensor``'s Python around
        it; a CPU generator for a CUDA tensor, a list of generators, another device kind or
        a replaced ``randn_tensor`` (``_DIFFUSERS_RANDN``) through ``randn_tensor`` itself.

        Args:
            like: the tensor whose shape, device and dtype diffusers draws the noise like.
            x: the current sample (its batch size and device key the Philox seeds).
            generator: draws the noise as diffusers does (``randn_tensor``), or None.
            variance_noise: explicit standard-normal noise (taken as it is), or None.
            dtype: the noise's dtype where diffusers draws it in another than ``like``'s.

        Returns:
            ``(variance_noise, None)`` when it is given; ``(None, seeds)``, per-sample Philox
            keys for in-kernel noise, with ``noise="philox"`` and no generator; else
            ``(noise, None)`` drawn as diffusers draws it (from ``generator``, or from torch's
            global RNG without one).
        """
        if variance_noise is not None:
            return variance_noise, None
        if generator is None and self._noise == "philox":
            return None, self._philox_seeds(x.shape[0], x.device)
        device = like.device
        if dtype is None:
            dtype = like.dtype
        if (
            randn_tensor is _DIFFUSERS_RANDN
            and device.type in ("cpu", "cuda")
            and (
                generator is None
                or (type(generator) is torch.Generator and generator.device.type == device.type)
            )
        ):
            return torch.randn(like.shape, generator=generator, device=device, dtype=dtype), None
        return randn_tensor(like.shape, generator=generator, device=device, dtype=dtype), None

    # -- running a step: the template every drop-in's ``step`` follows ---------------------

    _needs_plan = False  # step raises diffusers' "run set_timesteps" error (DDIM, DPM, UniPC)
    # Whether the class keeps diffusers' step index (StepIndexMixin: found at a plan's first
    # step by ``_init_step_index``); without it the row is the timestep itself.
    _indexes_steps = False

    def _begin_step(self, timestep: Any, sample: torch.Tensor, contiguous: bool = False):
        """The step's prologue: diffusers' check for a plan (``_needs_plan``), the config
        check, the step index (``_init_step_index`` when none is set, for the classes that
        keep one: ``_indexes_steps``); returns ``sample`` laid out for the kernel
        (``dense``)."""
        if self._needs_plan and self.num_inference_steps is None:
            self._check_planned()
        if self.config is not self._checked_config:  # (check_config's own test, inline)
            self.check_config()
        if self._indexes_steps and self._step_index is None:  # (inline: a call a step less)
            self._init_step_index(timestep)
        if not contiguous and sample.is_contiguous():  # (dense's common case, inline)
            return sample
        return dense(sample, contiguous)

    def _end_step(self, x0: torch.Tensor | None) -> None:
        """State kept after a step (multistep history, the step index); none by default."""

    def _rule(self, tables, rows, fn, levels, by_row, options):
        """The reference path's step ``(xr, m, noise) -> (prev, x0)`` of a ``fastdiff.reference``
        function: ``fn(xr, m, *levels, noise=noise, **by_row, **options)``, ``noise=`` only
        when the step has noise. By position (a drop-in may also pass these six arguments to
        ``_step_once`` as a tuple in place of the step: the closure is then made only where
        the reference path runs).

        Args:
            tables: the step's device tables (``_device_tables``), name -> tensor.
            rows: the step's table rows.
            fn: the ``fastdiff.reference`` step function, returning ``(prev, x0)``.
            levels: names of the tables whose values at ``rows`` are ``fn``'s positional
                arguments after ``(xr, m)``.
            by_row: keyword -> table name: ``fn``'s keyword arguments read at ``rows``, or
                None.
            options: ``fn``'s further keyword arguments, a dict (``{}`` for none).
        """

        def reference_step(xr, m, noise):
            values = self._values(tables, rows, *levels, *(by_row.values() if by_row else ()))
            kwargs = dict(zip(by_row, values[len(levels) :])) if by_row else {}
            if noise is not None:
                kwargs["noise"] = noise
            return fn(xr, m, *values[: len(levels)], **kwargs, **options)

        return reference_step

    def _fused(
        self, x, model_output, step_tables, rows, reference_step, return_dict, out_dtype,
        x0_dtype, noise, seeds, x0_prev, kernel_kwargs,
    ):  # fmt: skip
        """The step's body and epilogue: ``_step_once``, then ``_end_step(x0)``, then the
        diffusers output: ``self._output_cls(prev_sample[, pred_original_sample])`` (as many
        values as the class has fields), or the tuple without ``return_dict``. By position.

        Args:
            x, model_output, step_tables, rows, reference_step: as ``_step_once`` takes them.
            return_dict: diffusers' ``return_dict``.
            out_dtype, x0_dtype: dtypes of the returned sample and x0 (the caller gives x0
                the model output's dtype for ``prediction_type="sample"``, as diffusers).
            noise, seeds, x0_prev, kernel_kwargs: as ``_step_once`` takes them.
        """
        prev, x0 = self._step_once(
            x, model_output, step_tables, rows, reference_step, out_dtype, x0_dtype, noise,
            seeds, x0_prev, kernel_kwargs,
        )  # fmt: skip
        self._end_step(x0)
        return step_output(self._output_cls, return_dict, prev, x0)

    def _step_once(
        self, x, model_output, step_tables, rows, reference_step, out_dtype, x0_dtype, noise,
        seeds, x0_prev, kernel_kwargs,
    ):  # fmt: skip
        """One step through ``fastdiff.stepping.run_step`` (the dispatch ``Sampler.step``
        uses), returned in the dtypes the diffusers class returns; on the kernel path a step
        of an input signature this scheduler launched before takes the cached launch (see
        the module docstring: the same launch, outputs and bits). By position.

        The reference path runs ``reference_step(xr, m, noise)`` in float64 (it is the
        fallback and the check, not the fast path; float32 would lose digits where
        diffusers' own float32 formulas do not, e.g. ``sqrt(1 - beta')`` for ``beta'`` near
        1 at the end of a cosine schedule), with the in-kernel Philox noise of ``seeds``
        computed in PyTorch; it reads its schedule values of ``rows`` from ``step_tables``
        and takes its own x0_prev.

        Args:
            x: the current sample, as ``dense`` returns it.
            model_output: the model output the step reads.
            step_tables: the step's device tables (``_device_tables``).
            rows: the step's table rows.
            reference_step: the reference path's step ``(xr, m, noise) -> (prev, x0)``, or
                the tuple of ``_rule``'s six arguments (made into the step only where the
                reference path runs).
            out_dtype, x0_dtype: dtypes of the returned sample and x0 prediction (None:
                ``run_step``'s defaults).
            noise: explicit standard-normal noise like ``x``, or None.
            seeds: per-sample Philox keys for in-kernel noise, or None.
            x0_prev: the previous step's x0 for the kernel (multistep), or None.
            kernel_kwargs: a dict of further ``fused_step`` options (``_KERNEL_OPTIONS``:
                clip_range, thresholding, variance_mode, write_x0, x0_out, history,
                last_sample, x0_noise; ``{}`` for none), part of the launch cache's key.

        Returns:
            ``(prev_sample, pred_original_sample)``.
        """
        if noise is not None and noise.device != x.device:  # a generator on another device
            noise = noise.to(x.device)
        if self._graph_advance is not None:  # a graphed loop's step advances it (_base hooks)
            kernel_kwargs = self.graph_kernel_options(
                x, model_output, out_dtype, noise, x0_prev, kernel_kwargs
            )
        table = step_tables[self._kernel_table]
        backend = self._backend
        key = None
        if backend is None:  # FASTDIFF_BACKEND decides at every step (fastdiff.backend reads it)
            try:
                dtypes = _dtypes(
                    x, model_output, noise, x0_prev, out_dtype, x0_dtype, kernel_kwargs
                )
                backend = backends.resolve_backend(None, x, dtypes)  # run_step's resolution
            except AttributeError:  # not a tensor: run_step raises as it does
                pass
        if backend is not None and backend != "reference":
            # What the kernel path depends on besides the options: the backend, everything
            # fused_step checks and specializes on about the inputs (shape, strides, dtype,
            # device, 16-byte alignment), the scheduler's own device tensors by identity
            # (its table and Philox seeds: made once, never reshaped; by id, which no other
            # tensor can take while the entry keeps them alive) and the rows' layout (their
            # alignment is not specialized on). Flat and inline: a call costs a microsecond.
            z, p = noise, x0_prev
            try:
                key = (
                    backend, id(table), id(seeds), rows.shape, rows.stride(), rows.dtype,
                    rows.device, out_dtype, x0_dtype, *kernel_kwargs.items(),
                    x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0,
                    model_output.shape, model_output.stride(), model_output.dtype,
                    model_output.device, model_output.data_ptr() % 16 == 0,
                    None if z is None else (z.shape, z.stride(), z.dtype, z.device),
                    None if z is None else z.data_ptr() % 16 == 0,
                    None if p is None else (p.shape, p.stride(), p.dtype, p.device),
                    None if p is None else p.data_ptr() % 16 == 0,
                )  # fmt: skip
            except AttributeError:  # not a tensor: run_step raises as it does
                pass
        if key is not None:
            launch = self._launches.get(key)
            if launch is not None:  # a signature this scheduler's kernel path took before
                config, out_dtype, x0_dtype, x0_out, clip, thresh, write_x0, ring, last, _ = launch
                # by position (binding keywords costs microseconds)
                return fused_kernel.step_with_config(
                    config, x, model_output, table, rows, None, 0.0, clip, thresh, x0_prev,
                    noise, seeds, None,
                    None if out_dtype is None else torch.empty_like(x, dtype=out_dtype),
                    x0_out if x0_dtype is None else torch.empty_like(x, dtype=x0_dtype),
                    write_x0, ring, last,
                )  # fmt: skip
            out_dtype = out_dtype or x.dtype  # (run_step's defaults)
            x0_dtype = x0_dtype or out_dtype
            if _KERNEL_OPTIONS.keys() >= kernel_kwargs.keys() and self._cacheable(
                backend, x, model_output, noise, x0_prev, out_dtype, x0_dtype, kernel_kwargs
            ):
                return self._first_launch(
                    key, x, model_output, table, rows, noise, seeds, x0_prev, out_dtype,
                    x0_dtype, kernel_kwargs,
                )  # fmt: skip
        if type(reference_step) is tuple:  # a ``_rule`` spec, made into the step only here
            reference_step = self._rule(*reference_step)
        return run_step(
            backend,
            x,
            model_output,
            table,
            rows,
            lambda xr, m, _x0_prev, z, _grad: reference_step(xr, m, z),
            out_dtype=out_dtype,
            x0_dtype=x0_dtype,
            noise=noise,
            seeds=seeds,
            x0_prev=x0_prev,
            compute_dtype=torch.float64,
            **kernel_kwargs,
        )

    # -- the kernel path's launches, cached per signature ------------------------------------

    @staticmethod
    def _cacheable(backend, x, model_output, noise, x0_prev, out_dtype, x0_dtype, options):
        """Whether ``run_step`` would launch the kernel on these inputs as they are (the
        kernel backend; x contiguous and the other inputs strided like it: no copy), so
        that a later step of the same signature can launch it directly."""
        if backend == "auto":  # (decided by x's device and the dtypes: in the key)
            dtypes = _dtypes(x, model_output, noise, x0_prev, out_dtype, x0_dtype, options)
            backend = backends.resolve_backend(backend, x, dtypes)
        if backend != "triton" or not x.is_contiguous():
            return False
        strides = x.stride()
        return all(t is None or t.stride() == strides for t in (model_output, noise, x0_prev))

    def _first_launch(
        self, key, x, model_output, table, rows, noise, seeds, x0_prev, out_dtype, x0_dtype,
        kernel_kwargs,
    ):  # fmt: skip
        """The kernel path of ``run_step`` (the outputs ``run_step`` allocates, the checks of
        ``fused_step``, the same errors), its configuration kept under ``key`` for the
        steps of the same signature."""
        options = {**_KERNEL_OPTIONS, **kernel_kwargs}
        given_x0_out = options.pop("x0_out")
        x0_noise = options.pop("x0_noise")
        variance_mode = options.pop("variance_mode")
        write_x0 = options["write_x0"] or given_x0_out is not None
        # the outputs run_step allocates: in the dtypes asked for where they are not x's
        out_dtype = None if out_dtype == x.dtype else out_dtype
        if given_x0_out is not None or not write_x0 or x0_dtype == x.dtype:
            x0_dtype = None
        out = None if out_dtype is None else torch.empty_like(x, dtype=out_dtype)
        x0_out = given_x0_out if x0_dtype is None else torch.empty_like(x, dtype=x0_dtype)
        config = fused_kernel.step_config(
            x,
            model_output,
            table,
            rows,
            clip_range=options["clip_range"],
            thresholding=options["thresholding"],
            variance_mode=variance_mode,
            x0_prev=x0_prev,
            noise=noise,
            seeds=seeds,
            out=out,
            x0_out=x0_out,
            history=options["history"],
            last_sample=options["last_sample"],
            x0_noise=x0_noise,
        )
        if len(self._launches) >= 64:  # (UniPC's device chains: a table a chain)
            self._launches.clear()
        self._launches[key] = (
            config, out_dtype, x0_dtype, given_x0_out, options["clip_range"],
            options["thresholding"], options["write_x0"], options["history"],
            options["last_sample"], (table, seeds),  # (alive while keyed by id)
        )  # fmt: skip
        return fused_kernel.step_with_config(
            config,
            x,
            model_output,
            table,
            rows,
            x0_prev=x0_prev,
            noise=noise,
            seeds=seeds,
            out=out,
            x0_out=x0_out,
            **options,
        )

    @staticmethod
    def _values(tables: dict[str, torch.Tensor], rows: torch.Tensor, *names: str):
        """Per-row schedule values for the reference: 0-d for one row, ``[B]`` per sample
        (gathered with a 1-D index: indexing with a 0-d tensor would read it on the host)."""
        shape = () if rows.numel() == 1 else (-1,)
        flat = rows.reshape(-1)
        return tuple(tables[name].index_select(0, flat).reshape(shape) for name in names)
