"""One step of a sampling chain: the body that the eager loop (:func:`fastdiff.sample`) and
the CUDA graph (:class:`fastdiff.graph.SamplingGraph`) both run, so a graphed chain is the
eager chain step for step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastdiff import checks
from fastdiff.samplers import StepOutput

__all__ = ["Model", "SamplingStep"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SamplingStep:
    """One reverse step of ``sampler`` with ``model``, guidance included.

    Step ``i``: ``cond`` is the sampler's ``model_condition(i)``, gathered from a device table
    by a one-element index (an int ``i`` and a device step counter give the same tensor);
    ``m = model(x, cond)``, or with classifier-free guidance
    ``model(cat([x, x]), cat([cond, cond]))``, which must return ``[2B, ...]`` with the
    unconditional half first; ``grad = cond_fn(x, cond)`` (classifier guidance); then
    ``sampler.step(x, m, i, ...)``. The first step of a chain has no previous x0, so a
    multistep sampler takes its first-order step there.

    Args:
        model: ``model(x, cond) -> output`` in the sampler's prediction type.
        sampler: a ``fastdiff.Sampler``.
        guidance_scale: classifier-free guidance weight (None: no guidance).
        guidance_rescale: Lin et al. 2023 rescale in [0, 1] (needs guidance_scale).
        cond_fn: classifier guidance ``cond_fn(x, cond) -> grad`` (stochastic samplers).
        with_x0: return each step's x0 also when the sampler is not multistep.

    Example::

        step = SamplingStep(model, sampler, guidance_scale=5.0)
        x0 = None
        for i in range(sampler.num_steps):
            out = step(x, i, seeds=seeds, x0_prev=x0, first=i == 0)
            x, x0 = out.prev_sample, out.pred_original_sample
    """

    def __init__(
        self,
        model: Model,
        sampler: Any,
        *,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        cond_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        with_x0: bool = False,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, cond), got {type(model).__name__}")
        checks.check_sampler(sampler)
        if cond_fn is not None and not callable(cond_fn):
            raise TypeError(f"cond_fn must be callable, got {type(cond_fn).__name__}")
        self.guidance_scale, self.guidance_rescale = checks.check_guidance(
            guidance_scale, guidance_rescale
        )
        self.model = model
        self.sampler = sampler
        self.cond_fn = cond_fn
        self.stochastic = bool(sampler.stochastic)
        self.multistep = bool(sampler.multistep)
        self.returns_x0 = self.multistep or bool(with_x0)
        self._tables: dict[tuple[int, torch.device], tuple[torch.Tensor, list]] = {}

    def condition_table(self, batch: int, device: torch.device) -> torch.Tensor:
        """float32 ``[num_steps, batch]``: row ``i`` is ``sampler.model_condition(i)`` (built
        once per batch size and device; a graph builds it before its capture)."""
        return self._table(batch, torch.device(device))[0]

    def _table(self, batch: int, device: torch.device) -> tuple[torch.Tensor, list]:
        key = (batch, device)
        cached = self._tables.get(key)
        if cached is None:
            n = self.sampler.num_steps
            rows = [self.sampler.model_condition(i, batch, device).reshape(batch) for i in range(n)]
            table = torch.stack(rows).to(device=device, dtype=torch.float32)
            index = torch.arange(n, dtype=torch.int64, device=device)
            cached = self._tables[key] = (table, [index[i : i + 1] for i in range(n)])
        return cached

    def condition(self, i: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """What the model is conditioned on at step ``i`` (an int or a 0-d device counter):
        float32 ``[batch]``, a fresh tensor (the same kind of tensor in both cases)."""
        table, views = self._table(batch, device)
        rows = views[i] if isinstance(i, int) else i.reshape(1)
        return torch.index_select(table, 0, rows)[0]

    def model_output(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x`` (the doubled batch with guidance), checked."""
        batch = x.shape[0]
        guided = self.guidance_scale is not None
        if guided:
            out = self.model(torch.cat([x, x]), torch.cat([cond, cond]))
        else:
            out = self.model(x, cond)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
        expected = 2 * batch if guided else batch
        if out.shape[0] != expected:
            if guided:
                raise ValueError(
                    f"with guidance_scale the model is called on the doubled batch and must "
                    f"return [2B={expected}, ...] (unconditional half first); it returned "
                    f"{tuple(out.shape)}"
                )
            raise ValueError(f"the model returned batch {out.shape[0]}, expected {expected}")
        return out

    def __call__(
        self,
        x: torch.Tensor,
        i: int | torch.Tensor,
        *,
        seeds: torch.Tensor | None = None,
        x0_prev: torch.Tensor | None = None,
        first: bool = False,
        out: torch.Tensor | None = None,
        x0_out: torch.Tensor | None = None,
    ) -> StepOutput:
        """Step ``i`` from ``x``.

        Args:
            x: the current sample ``[B, ...]``.
            i: the step index: an int, or a 0-d int64 device tensor (a graph's counter).
            seeds: int64 ``[B]`` per-sample seeds (stochastic samplers).
            x0_prev: the previous step's x0 (multistep samplers; ignored with ``first``).
            first: the chain's first step: no previous x0 (first order).
            out, x0_out: preallocated outputs (static buffers); may alias x and x0_prev.

        Returns:
            The sampler's ``StepOutput`` (``pred_original_sample`` None unless
            :attr:`returns_x0`).
        """
        cond = self.condition(i, x.shape[0], x.device)
        m = self.model_output(x, cond)
        grad = self.cond_fn(x, cond) if self.cond_fn is not None else None
        kwargs: dict[str, Any] = {}
        if self.stochastic:
            kwargs["seeds"] = seeds
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
            kwargs["guidance_rescale"] = self.guidance_rescale
        return self.sampler.step(
            x,
            m,
            i,
            x0_prev=None if first or not self.multistep else x0_prev,
            grad=grad,
            return_x0=self.returns_x0,
            out=out,
            x0_out=x0_out,
            **kwargs,
        )
