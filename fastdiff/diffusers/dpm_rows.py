"""The coefficient rows of ``FusedDPMSolverMultistepScheduler``'s plan: every step at the
order diffusers takes there (and at first order, for a chain's first step), in the kernel's
columns, from diffusers' sigmas (VP or flow levels)."""

from __future__ import annotations

import torch

from fastdiff import flow_tables, tables
from fastdiff.diffusers._common import nan_row
from fastdiff.kernels.fused_step import COLUMNS, UNIPC_COLUMNS
from fastdiff.tables import COL

__all__ = ["DPMRowsMixin"]


class DPMRowsMixin:
    """``_build`` of the DPM drop-in (its ``_device_tables`` builder) and the levels it reads."""

    def _build(
        self,
        prediction_type: str,
        final_first_order: bool,
        order: int,
        sde: bool = False,
        solver_type: str = "midpoint",
    ):
        """Rows ``0..n-1``: the step at that index after previous steps (at the order diffusers
        takes there with a full history); row n: poison; rows ``n+1..2n``: the same steps at
        first order (the first step after set_timesteps / set_begin_index); row 2n+1: poison;
        for ``solver_order=3`` also rows ``2n+2..3n+1`` at most second order (the step after
        that) and the poison row 3n+2. The SDE and the heun form:
        ``flow_tables.dpmpp_2m_sde_table_as`` (eta 1 or 0); order 3: ``dpmpp_3m_table_as``,
        whose table ("history_table") has the kernel's UniPC columns in three phase blocks
        (``_history_rows``; "history_rows" indexes them): with phase p the x0 of step k is
        written to ring slot ``(k + p) % 3``, the previous two are read from the other slots.
        """
        sigmas = self.sigmas.to(torch.float64)
        n = len(sigmas) - 1
        main = torch.full((n,), order, dtype=torch.int64)
        main[1:2].clamp_(max=2)
        main[0] = 1
        if self.config.lower_order_final and 1 < n < 15:  # diffusers' lower_order_second
            main[-2:-1].clamp_(max=2)
        if final_first_order:
            main[-1] = 1
        blocks = [main, torch.ones_like(main)] + ([main.clamp(max=2)] if order == 3 else [])
        values, levels = self._levels(sigmas)
        if sde or solver_type == "heun":
            eta = 1.0 if sde else 0.0

            def rule(f):
                return flow_tables.dpmpp_2m_sde_table_as(
                    levels[:6], prediction_type, f, eta, solver_type
                )
        elif self.config.use_flow_sigmas:

            def rule(f):
                return flow_tables.dpmpp_2m_table_as(*levels[:6], prediction_type, f)
        else:
            ab_t, ab_next, ab_prev = (values[name] for name in ("ab", "ab_next", "ab_prev"))

            def rule(f):
                return tables.dpmpp_2m_table(ab_t, ab_next, ab_prev, prediction_type, f)

        if order == 3:
            third, c_prev2 = flow_tables.dpmpp_3m_table_as(levels, prediction_type, float(sde))
        nan = torch.full((1,), float("nan"), dtype=torch.float64)
        parts: dict[str, list] = {"table": [], "order": [], "c_prev2": []}
        for block in blocks:
            table = rule(block == 1)
            is_third = (block == 3)[:, None]
            if order == 3:
                table = torch.where(is_third, third, table)
            parts["table"] += [table, nan_row()]
            parts["order"] += [block.double(), nan]
            if order == 3:
                parts["c_prev2"] += [torch.where(is_third[:, 0], c_prev2, 0.0), nan]
            for name, v in values.items():  # flow: lambda_prev = -inf on first-order rows
                if name in ("sigma_prev", "sigma_prev2"):
                    v = torch.where(block == 1, 1.0, v)
                parts.setdefault(name, []).extend([v, nan])
        out = {name: torch.cat(v) for name, v in parts.items() if v}
        out["first"] = out["order"] == 1
        if order == 3:
            out["history_table"] = self._history_rows(out["table"], out.pop("c_prev2"), n)
            out["history_rows"] = torch.arange(len(out["history_table"]), dtype=torch.int64)
        return out

    @staticmethod
    def _history_rows(table: torch.Tensor, c_prev2: torch.Tensor, n: int) -> torch.Tensor:
        """``table`` (the blocks of ``_build``, R rows, P1's coefficient in ``x0_prev``) in the
        kernel's UniPC columns, float32, once per ring phase p = 0, 1, 2 (row ``p R + i``):
        the x0 of step k goes to ring slot ``(k + p) % 3``, P1 is read from slot
        ``(k - 1 + p) % 3`` and P2 (``c_prev2``) from ``(k - 2 + p) % 3``; the corrector
        columns are 0 (the kernel runs without corrector: no last sample). Poison rows stay
        NaN, with slot 0.

        The phase lets a step read its history where it lies: after a step is taken again
        (``model_outputs`` shifted twice, its x0s one slot on) the ring is read as it is
        instead of copied into place.

        Example:
            >>> wide = DPMRowsMixin._history_rows(table, c_prev2, n)  # [3 R, len(UNIPC_COLUMNS)]
        """
        col = {name: j for j, name in enumerate(UNIPC_COLUMNS)}
        rows = len(table)
        k = torch.arange(rows) % (n + 1)  # the step index of a row (n: a poison row)
        poison = k == n
        r = torch.arange(rows)
        up_h0 = col["up_h0"]
        phases = []
        for phase in range(3):
            wide = torch.zeros(rows, len(UNIPC_COLUMNS), dtype=torch.float64)
            wide[:, : len(COLUMNS)] = table
            wide[r, up_h0 + (k - 1 + phase) % 3] = table[:, COL["x0_prev"]]
            wide[r, up_h0 + (k - 2 + phase) % 3] = c_prev2
            wide[:, COL["x0_prev"]] = 0.0
            wide[:, col["hist_slot"]] = torch.where(poison, 0, (k + phase) % 3).double()
            wide[poison, : col["hist_slot"]] = float("nan")
            phases.append(wide)
        return torch.cat(phases).float()

    def _levels(self, sigmas: torch.Tensor):
        """The reference's levels of each step by name, and ``(alpha, sigma, alpha_next,
        sigma_next, alpha_prev, sigma_prev, alpha_prev2, sigma_prev2)`` of the tables.

        VP: ``ab = 1 / (1 + sigma^2)``, alpha = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha
        (steps without a previous one: sigma 1, ab 0.5). Flow (alpha = 1 - s, sigma = s): s, s'
        and the previous levels (1 where there is none)."""
        n = len(sigmas) - 1
        sigma_prev = torch.cat([sigmas.new_ones(1), sigmas])[:n]
        sigma_prev2 = torch.cat([sigmas.new_ones(2), sigmas])[:n]
        if self.config.use_flow_sigmas:
            s, s_next = sigmas[:-1], sigmas[1:]
            values = {"sigma": s, "sigma_next": s_next, "sigma_prev": sigma_prev}
            values["sigma_prev2"] = sigma_prev2
            levels = (s, s_next, sigma_prev, sigma_prev2)
            return values, tuple(v for level in levels for v in (1.0 - level, level))

        def ab_of(sigma):  # alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t
            return 1.0 / (1.0 + sigma**2)

        values = {"ab": ab_of(sigmas[:-1]), "ab_next": ab_of(sigmas[1:])}
        values["ab_prev"], values["ab_prev2"] = ab_of(sigma_prev), ab_of(sigma_prev2)

        def alpha_sigma(sigma):
            alpha = (1.0 + sigma**2).rsqrt()
            return alpha, sigma * alpha

        levels = (sigmas[:-1], sigmas[1:], sigma_prev, sigma_prev2)
        return values, tuple(v for level in levels for v in alpha_sigma(level))
