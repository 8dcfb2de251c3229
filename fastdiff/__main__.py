"""Command line: ``python -m fastdiff <command>`` (or ``fastdiff <command>``).

Commands:
    demo          sample a 2-D Gaussian mixture with every sampler; write plots and a table.
    sample-many   many samples over the ranks of a torchrun job into verified, resumable
                  shards (``torchrun -m fastdiff.sample_many`` runs it on every rank).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    import torch

    from fastdiff import demo  # imported here so that --help stays fast

    # The demo's tensors are small ([n, 2]): on the CPU, intra-op threads only add overhead,
    # and on a busy machine they stall every op waiting for a descheduled thread (10-50x).
    torch.set_num_threads(1)
    demo.run(out=args.out, n=args.n, device=args.device, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per command (add new commands here).

    Returns:
        The top-level ``argparse.ArgumentParser``.
    """
    parser = argparse.ArgumentParser(
        prog="fastdiff",
        description="fastdiff: diffusion samplers whose reverse steps run as fused Triton kernels.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="sample a 2-D Gaussian mixture with every sampler and its exact denoiser",
        description=(
            "Samples a 2-D Gaussian mixture with its exact denoiser using every sampler, prints "
            "a table (sampler, steps, time per step, fit), and writes samples.png and steps.png "
            "(fit against number of steps)."
        ),
    )
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--n", type=int, default=4000, help="samples per sampler (default: 4000)")
    demo.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to sample (default: auto = CUDA when available)",
    )
    demo.add_argument(
        "--quick", action="store_true", help="a fast, small run (for tests and smoke checks)"
    )
    demo.set_defaults(func=_demo)

    from fastdiff.sample_many import cli

    many = commands.add_parser(
        "sample-many",
        help="many samples over the ranks of a torchrun job into verified, resumable shards",
        description=(
            "Draws many samples over all ranks of a torchrun job (or one process) into "
            ".npz shards, verified and resumable: sample i is seeded by seed*2**32 + i, the "
            "same for any process count. Many GPUs: torchrun --nproc_per_node=N -m "
            "fastdiff.sample_many <options>. Read them with "
            "fastdiff.sample_many.load_samples(out)."
        ),
    )
    cli.add_arguments(many)
    many.set_defaults(func=cli.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status (0 on success).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"fastdiff {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
