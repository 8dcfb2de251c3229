"""The few collectives sample_many needs (trivial for one process), and joining the job."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["Comm", "SampleManyError", "init_distributed"]


class SampleManyError(RuntimeError):
    """A run failed: on some rank (finished shards are kept: rerun to resume), a bad shard,
    or a folder in use."""


class Comm:
    """Rank, world size and the collectives of the current process group (or none)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        backend = dist.get_backend() if self.active else "gloo"
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if str(backend).lower() == "nccl"
            else torch.device("cpu")
        )

    def sum(self, values: Sequence[int]) -> list[int]:
        """Element-wise sum over the ranks."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return [int(v) for v in t.tolist()]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def check(self, error: BaseException | None, what: str) -> None:
        """Every rank raises SampleManyError naming the failed ranks if any rank had an error."""
        if not self.sum([1 if error is not None else 0])[0]:
            return
        messages = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        ranks = [r for r, m in enumerate(messages) if m is not None]
        lines = "\n".join(f"  rank {r}: {messages[r]}" for r in ranks)
        raise SampleManyError(
            f"{what} failed on rank{'s' if len(ranks) > 1 else ''} "
            f"{', '.join(map(str, ranks))} of {self.world}:\n{lines}\n"
            "Finished shards are kept; rerun with the same configuration to resume."
        ) from error


@contextlib.contextmanager
def init_distributed(device: torch.device | str | None) -> Iterator[torch.device]:
    """Joins the torchrun job described by the environment (NCCL for CUDA, gloo for the CPU)
    when no process group exists, for the block; yields this rank's device (its CUDA device
    is made current)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            index = local_rank % max(1, torch.cuda.device_count())
            if dist.is_available() and dist.is_initialized() and world == 1:
                index = dist.get_rank() % max(1, torch.cuda.device_count())
            device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    created = world > 1 and dist.is_available() and not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        if created:
            dist.destroy_process_group()
