"""An eager stand-in for ``fastdiff.capture.CudaRuntime``, for CPU tests of the graph
control flow (warm-up, capture, verification, replay), and a tiny model to compile."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch


class EagerGraph:
    """What ``EagerRuntime.capture`` returns: ``replay`` runs the Python step again."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()

    def reset(self) -> None:
        self.fn = None


class EagerRuntime:
    """Its "capture" runs the step's Python once, like a real capture, but on a copy of the
    state (a real capture executes nothing), with ``capturing`` set meanwhile; its "replay"
    runs the step eagerly. Counts captures and replays."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.capturing = False
        self.captures = 0
        self.replays = 0

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        yield

    def finish(self) -> None:
        pass

    def capture(self, fn: Callable[[], None], state: Sequence[torch.Tensor]) -> EagerGraph:
        saved = [t.clone() for t in state]
        self.capturing = True
        try:
            fn()
        finally:
            self.capturing = False
            for t, s in zip(state, saved):
                t.copy_(s)
        self.captures += 1

        def replay() -> None:
            self.replays += 1
            fn()

        return EagerGraph(replay)


class TinyMLP(torch.nn.Module):
    """A small MLP denoiser on [B, dim] samples conditioned on the timestep."""

    def __init__(self, dim: int = 64, width: int = 128) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(dim, width)
        self.emb = torch.nn.Linear(1, width)
        self.out = torch.nn.Linear(width, dim)

    def forward(self, x, cond):
        h = self.inp(x) + self.emb(cond.to(x.dtype)[:, None] / 1000)
        return self.out(torch.nn.functional.silu(h))
