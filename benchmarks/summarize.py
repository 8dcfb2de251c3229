"""Print a compact table of a pytest-benchmark JSON written by ``bench_step.py``.

Usage::

    python benchmarks/summarize.py out/bench.json             # plain-text tables
    python benchmarks/summarize.py out/bench.json --markdown  # tables for RESULTS.md

Step groups: implementation, wall median (pytest-benchmark), ``do_bench`` median, GB/s and
fraction of the measured copy bandwidth (bytes = the passes the implementation makes at
least, see bench_step.py), and the time over PERFORMANCE.md's floor. Python-loop groups:
wall time per step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMPL_ORDER = ("reference", "compile", "diffusers", "fused", "fused-noise-tensor")


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _rows(benchmarks: list[dict]) -> tuple[list[list[str]], list[list[str]]]:
    """Table rows (step table, python-loop table) in the JSON's group order."""
    groups: dict[str, list[dict]] = {}
    for bench in benchmarks:
        groups.setdefault(bench.get("group") or "", []).append(bench)
    steps, loops = [], []
    for group, entries in groups.items():
        entries.sort(
            key=lambda b: (
                IMPL_ORDER.index(b["extra_info"].get("impl"))
                if b["extra_info"].get("impl") in IMPL_ORDER
                else len(IMPL_ORDER)
            )
        )
        for bench in entries:
            info = bench.get("extra_info", {})
            median_us = bench["stats"]["median"] * 1e6
            impl = info.get("impl", bench["name"])
            if "per_step_us" in info:
                loops.append(
                    [group, impl, str(info.get("steps", "")), _fmt(info["per_step_us"])]
                    + [_fmt(info.get("target_per_step_us"), ".0f")]
                )
                continue
            frac = info.get("frac_copy_bw")
            steps.append(
                [
                    group,
                    impl,
                    _fmt(median_us),
                    _fmt(info.get("do_bench_us")),
                    str(info.get("passes", "-")),
                    _fmt(info.get("gbps"), ".0f"),
                    _fmt(None if frac is None else 100 * frac, ".0f"),
                    _fmt(info.get("x_floor"), ".2f"),
                ]
            )
    return steps, loops


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    out = []
    previous_group = None
    for n, row in enumerate([header, *rows]):
        if n > 0 and row[0] == previous_group:
            row = ["", *row[1:]]  # print each group name once
        else:
            previous_group = row[0]
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(w) for cell, w in zip(row[2:], widths[2:])]
        out.append("  ".join(cells))
    return "\n".join(out)


def summarize(path: str | Path, markdown: bool = False) -> str:
    """The summary text of one benchmark JSON.

    Args:
        path: the file written by ``--benchmark-json``.
        markdown: markdown tables instead of aligned text.

    Returns:
        The header line (card, versions, copy bandwidth) and the tables.
    """
    data = json.loads(Path(path).read_text())
    benchmarks = data.get("benchmarks", [])
    machine = data.get("machine_info", {})
    copy_bws = [b["extra_info"].get("copy_bw_gbps") for b in benchmarks]
    copy_bw = next((bw for bw in copy_bws if bw), None)
    header = (
        f"card: {machine.get('cuda_device')} | torch {machine.get('torch')} | "
        f"triton {machine.get('triton')} | diffusers {machine.get('diffusers')} | "
        f"copy bandwidth: {_fmt(copy_bw, '.0f')} GB/s (1 GiB fp32 copy, read + write) | "
        f"{len(benchmarks)} entries"
    )
    steps, loops = _rows(benchmarks)
    parts = [header]
    if steps:
        parts.append(
            _table(
                ["group", "impl", "wall us", "do_bench us", "passes", "GB/s", "%copy", "x floor"],
                steps,
                markdown,
            )
        )
        parts.append(
            "GB/s and %copy: bytes of the passes each implementation makes at least, over the "
            "do_bench median where there is one, else the wall median; x floor: that time over "
            "PERFORMANCE.md's floor (3 passes, +1 CFG, +1 x0_prev) at copy bandwidth."
        )
    if loops:
        parts.append(_table(["group", "impl", "steps", "us/step", "target"], loops, markdown))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--markdown", action="store_true", help="markdown tables")
    args = parser.parse_args(argv)
    print(summarize(args.json, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
