"""The step template of the fused diffusers schedulers (mixed into ``FusedSchedulerMixin``):
``_begin_step`` (plan and config checks, the step index, the kernel's layout), the step's
noise, ``_reference_rule`` (the reference path's step), ``_run_step`` (one step through
``fastdiff.stepping.run_step``) and ``_fused_step`` (run, ``_end_step``, diffusers' output).

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
    >>> return self._fused_step(x, model_output, tabs, rows, reference_step, Output, True,
    ...                         out_dtype=x.dtype, x0_dtype=x.dtype)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from fastdiff import philox
from fastdiff.diffusers._common import dense, step_output
from fastdiff.stepping import run_step

__all__ = ["StepTemplateMixin"]


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

    @staticmethod
    def _draw(shape, generator, device, dtype) -> torch.Tensor:
        """Noise drawn exactly as the diffusers schedulers draw it."""
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _step_noise(
        self,
        like: torch.Tensor,
        x: torch.Tensor,
        generator: torch.Generator | None,
        variance_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The noise of a step that adds noise, as ``(noise, seeds)`` for ``_run_step``.

        Args:
            like: the tensor whose shape, device and dtype diffusers draws the noise like.
            x: the current sample (its batch size and device key the Philox seeds).
            generator: draws the noise as diffusers does (``randn_tensor``), or None.
            variance_noise: explicit standard-normal noise (taken as it is), or None.

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
        return self._draw(like.shape, generator, like.device, like.dtype), None

    # -- running a step: the template every drop-in's ``step`` follows ---------------------

    _needs_plan = False  # step raises diffusers' "run set_timesteps" error (DDIM, DPM, UniPC)

    def _begin_step(self, timestep: Any, sample: torch.Tensor, contiguous: bool = False):
        """The step's prologue: diffusers' check for a plan (``_needs_plan``), the config
        check, the step index (``_enter_step``); returns ``sample`` laid out for the kernel
        (``dense``)."""
        if self._needs_plan and self.num_inference_steps is None:
            self._check_planned()
        self.check_config()
        self._enter_step(timestep)
        return dense(sample, contiguous)

    def _enter_step(self, timestep: Any) -> None:
        """Step-index bookkeeping at the start of a step (none: the row is the timestep)."""

    def _end_step(self, x0: torch.Tensor | None) -> None:
        """State kept after a step (multistep history, the step index); none by default."""

    def _reference_rule(
        self,
        tables: dict[str, torch.Tensor],
        rows: torch.Tensor,
        fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        levels: tuple[str, ...],
        by_row: dict[str, str] | None = None,
        **options: Any,
    ):
        """The reference path's step ``(xr, m, noise) -> (prev, x0)`` of a ``fastdiff.reference``
        function: ``fn(xr, m, *levels, noise=noise, **by_row, **options)``, the levels and
        ``by_row`` (keyword -> table name) read from ``tables`` at ``rows``; ``noise=`` only
        when the step has noise."""

        def reference_step(xr, m, noise):
            values = self._values(tables, rows, *levels, *(by_row.values() if by_row else ()))
            kwargs = dict(zip(by_row, values[len(levels) :])) if by_row else {}
            if noise is not None:
                kwargs["noise"] = noise
            return fn(xr, m, *values[: len(levels)], **kwargs, **options)

        return reference_step

    def _fused_step(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        step_tables: dict[str, torch.Tensor],
        rows: torch.Tensor,
        reference_step: Callable,
        return_dict: bool,
        *,
        out_dtype: torch.dtype,
        x0_dtype: torch.dtype,
        prediction_type: str | None = None,
        **run_kwargs: Any,
    ):
        """The step's body and epilogue: ``_run_step``, then ``_end_step(x0)``, then the
        diffusers output: ``self._output_cls(prev_sample[, pred_original_sample])`` (as many
        values as the class has fields), or the tuple without ``return_dict``.

        Args:
            x, model_output, step_tables, rows, reference_step: as ``_run_step`` takes them.
            return_dict: diffusers' ``return_dict``.
            out_dtype, x0_dtype: dtypes of the returned sample and x0 (x0 in the model
                output's dtype for ``prediction_type="sample"``, as diffusers).
            prediction_type: the config's prediction type, or None.
            **run_kwargs: further ``_run_step`` options (noise, seeds, x0_prev, kernel options).
        """
        if prediction_type == "sample":
            x0_dtype = model_output.dtype
        prev, x0 = self._run_step(
            x,
            model_output,
            step_tables,
            rows,
            reference_step,
            out_dtype=out_dtype,
            x0_dtype=x0_dtype,
            **run_kwargs,
        )
        self._end_step(x0)
        return step_output(self._output_cls, return_dict, prev, x0)

    def _run_step(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        step_tables: dict[str, torch.Tensor],
        rows: torch.Tensor,
        reference_step: Callable[
            [torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
        ],
        *,
        out_dtype: torch.dtype,
        x0_dtype: torch.dtype,
        noise: torch.Tensor | None = None,
        seeds: torch.Tensor | None = None,
        x0_prev: torch.Tensor | None = None,
        **kernel_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step through ``fastdiff.stepping.run_step`` (the dispatch ``Sampler.step``
        uses), returned in the dtypes the diffusers class returns.

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
            reference_step: the reference path's step; returns ``(prev, x0)``.
            out_dtype, x0_dtype: dtypes of the returned sample and x0 prediction.
            noise: explicit standard-normal noise like ``x``, or None.
            seeds: per-sample Philox keys for in-kernel noise, or None.
            x0_prev: the previous step's x0 for the kernel (multistep), or None.
            **kernel_kwargs: further ``fused_step`` options (clip_range, thresholding,
                variance_mode, write_x0, history, last_sample).

        Returns:
            ``(prev_sample, pred_original_sample)``.
        """
        if noise is not None and noise.device != x.device:  # a generator on another device
            noise = noise.to(x.device)
        return run_step(
            self._backend,
            x,
            model_output,
            step_tables[self._kernel_table],
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

    @staticmethod
    def _values(tables: dict[str, torch.Tensor], rows: torch.Tensor, *names: str):
        """Per-row schedule values for the reference: 0-d for one row, ``[B]`` per sample
        (gathered with a 1-D index: indexing with a 0-d tensor would read it on the host)."""
        shape = () if rows.numel() == 1 else (-1,)
        flat = rows.reshape(-1)
        return tuple(tables[name].index_select(0, flat).reshape(shape) for name in names)
