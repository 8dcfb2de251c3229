"""The GPU stamp: which code the whole test suite last ran on the card, and how it ended.

``benchmarks/gpu-stamp.txt``'s first line is ``<hash> <UTC date> <card> <pytest summary>``,
where ``<hash>`` is the sha256 (hex) over every ``*.py`` file under ``fastdiff/``,
``kernels/`` and ``tests/``, sorted by path: for each file its path relative to the
repository root, a NUL byte, its bytes and a NUL byte.

Usage (from the repository root)::

    python benchmarks/gpu_stamp.py write --card "NVIDIA H200" --summary "900 passed in 200s"
    python benchmarks/gpu_stamp.py check      # exit 1 when the stamp is missing or stale
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import pathlib
import sys

STAMPED_DIRS = ("fastdiff", "kernels", "tests")
STAMP = pathlib.Path("benchmarks/gpu-stamp.txt")


def tree_hash(root: pathlib.Path = pathlib.Path(".")) -> str:
    """sha256 over the stamped files, in path order (see the module docstring)."""
    digest = hashlib.sha256()
    files = sorted(p for d in STAMPED_DIRS for p in (root / d).rglob("*.py"))
    for path in files:
        rel = path.relative_to(root).as_posix()
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write the stamp for the tree as it is")
    write.add_argument("--card", required=True, help="the GPU's name (nvidia-smi)")
    write.add_argument("--summary", required=True, help="pytest's summary line of tests/")
    write.add_argument("--out", type=pathlib.Path, default=STAMP)
    sub.add_parser("check", help="exit 1 unless the stamp matches the tree")
    args = parser.parse_args(argv)
    if args.command == "write":
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = f"{tree_hash()} {now} {args.card} {args.summary.strip()}"
        args.out.write_text(line + "\n")
        print(line)
        return 0
    first = STAMP.read_text().split("\n")[0] if STAMP.exists() else ""
    if not first:
        print(f"{STAMP} is missing")
        return 1
    if first.split()[0] != tree_hash():
        print(f"{STAMP} is stale: fastdiff/, kernels/ or tests/ changed since the GPU run")
        return 1
    print(f"{STAMP} is current: {first}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
