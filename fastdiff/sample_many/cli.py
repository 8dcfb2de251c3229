"""``fastdiff sample-many``: the options, and the command (registered in fastdiff.__main__)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["add_arguments", "run"]

MODEL_HELP = (
    "'gmm' (the built-in 2-D Gaussian mixture with its exact denoiser) or "
    "'package.module:callable': called on each rank as callable(device=, dtype=, sampler=) "
    "(take **kwargs for those it does not use), returning model(x, cond) on that device"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fastdiff sample-many``."""
    from fastdiff.backend import BACKENDS
    from fastdiff.checks import PREDICTION_TYPES
    from fastdiff.plans import TIMESTEP_SPACINGS
    from fastdiff.sample_many.shards import DTYPES
    from fastdiff.samplers import SAMPLERS
    from fastdiff.schedules import BETA_SCHEDULES

    p.add_argument("--model", default="gmm", help=MODEL_HELP)
    p.add_argument(
        "--model-id", default=None, help="model name for the manifest (default: --model)"
    )
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--steps", default="50", help="steps: an int, or a respacing like ddim25")
    p.add_argument("--eta", type=float, default=None, help="eta (ddim, euler_ancestral)")
    p.add_argument("--schedule", default="linear", choices=BETA_SCHEDULES)
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--timestep-spacing", default="trailing", choices=TIMESTEP_SPACINGS)
    p.add_argument("--prediction-type", default="epsilon", choices=PREDICTION_TYPES)
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--shape", required=True, help="one sample's shape, e.g. 2 or 4,64,64")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cuda-graph", action="store_true", help="replay each batch as a CUDA graph")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Runs ``fastdiff sample-many`` (on every rank under torchrun).

    Returns:
        The exit status: 0 done, 2 bad arguments or a folder of another run, 1 a failure
        (on some rank, or a folder in use).
    """
    import torch

    from fastdiff.sample_many import SampleManyError, sample_many
    from fastdiff.samplers import SAMPLERS
    from fastdiff.schedules import NoiseSchedule

    try:
        shape = tuple(int(s) for s in args.shape.replace("x", ",").split(",") if s.strip())
        steps: int | str = int(args.steps) if args.steps.isdigit() else args.steps
        schedule = NoiseSchedule.create(args.schedule, args.train_steps)
        kwargs: dict[str, Any] = {
            "timestep_spacing": args.timestep_spacing,
            "prediction_type": args.prediction_type,
            "backend": args.backend,
        }
        if args.eta is not None:
            kwargs["eta"] = args.eta
        sampler = SAMPLERS[args.sampler](schedule, steps, **kwargs)
        result = sample_many(
            args.model,
            sampler,
            args.num_samples,
            shape,
            args.out,
            args.batch_size,
            args.seed,
            shard_size=args.shard_size,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            guidance_scale=args.guidance_scale,
            model_id=args.model_id,
            cuda_graph=args.cuda_graph,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError) as err:
        print(f"fastdiff sample-many: error: {err}", file=sys.stderr)
        return 2
    except SampleManyError as err:
        print(f"fastdiff sample-many: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        again = f", {len(result.regenerated)} bad sampled again" if result.regenerated else ""
        print(
            f"{result.out_dir}: {result.num_samples} samples ({result.new_samples} new, "
            f"{result.shards_written} shard{'s' if result.shards_written != 1 else ''} written "
            f"by {result.world_size} process{'es' if result.world_size > 1 else ''}{again})"
        )
    return 0
