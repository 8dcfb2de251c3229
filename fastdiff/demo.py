"""``python -m fastdiff demo``: every sampler against a Gaussian mixture whose answer is known.

Each sampler of :data:`fastdiff.samplers.SAMPLERS` draws from :func:`fastdiff.gmm.demo_mixture`
with its exact denoiser (the model a perfectly trained network would be), and each flow sampler
of :data:`fastdiff.flow_samplers.FLOW_SAMPLERS` with its exact velocity
(:func:`fastdiff.flow.mixture_velocity`, static shift 3 as SD3). The demo plots the
samples (``samples.png``), prints sampler, steps, time per step (loop and step alone) and the
fit figure (sliced 2-Wasserstein distance; ``true mixture`` is the floor of n exact samples),
and plots the fit against 1 to 1000 steps (``steps.png``). Plans use "trailing" spacing (Lin et
al. 2023), so even one step starts from the noisiest train timestep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdiff.flow import FlowSchedule, mixture_velocity
from fastdiff.flow_samplers import FLOW_SAMPLERS
from fastdiff.gmm import demo_mixture
from fastdiff.philox import seeds_from
from fastdiff.samplers import SAMPLERS
from fastdiff.sampling import sample
from fastdiff.schedules import NoiseSchedule

__all__ = ["DEFAULT_STEPS", "DEMO_SAMPLERS", "FLOW_SHIFT", "STEP_COUNTS", "DemoRow", "run"]

# The demo's rows: the VP samplers (epsilon denoiser), then the flow samplers (velocity).
DEMO_SAMPLERS = (*SAMPLERS, *FLOW_SAMPLERS)
FLOW_SHIFT = 3.0  # SD3's static shift of the flow plans
DEFAULT_STEPS = {
    "ddpm": 1000,
    "ddim": 50,
    "euler": 50,
    "euler_ancestral": 50,
    "dpmpp_2m": 20,
    "flow_euler": 50,
    "flow_dpmpp_2m": 20,
    "flow_unipc": 20,
}
STEP_COUNTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# --quick (tests): fewer samples, a shorter sweep, DDPM on 100 steps.
QUICK_N = 400
QUICK_STEP_COUNTS = (1, 5, 20)
# Samples per point of the step sweep (10 step counts x 8 samplers): small
# enough for a CPU-only run of about a minute.
SWEEP_N = 1000
QUICK_DEFAULT_STEPS = {**DEFAULT_STEPS, "ddpm": 100}


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo's table.

    Attributes:
        sampler: the sampler's name in DEMO_SAMPLERS ("true mixture" for the reference row).
        steps: number of steps (0 for the reference row).
        us_per_step: wall time of the whole chain (model + step) divided by its steps,
            microseconds. The exact float64 mixture denoiser is most of it.
        step_us: wall time of the sampler's step alone (``sampler.step`` in a loop over the
            chain's steps, synchronized at the end), microseconds.
        sliced_w2: the fit figure (sliced 2-Wasserstein distance to the true mixture).
    """

    sampler: str
    steps: int
    us_per_step: float
    step_us: float
    sliced_w2: float


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class _Models:
    """The exact models of the demo's mixture: the VP schedule and epsilon denoiser, the flow
    schedule and velocity."""

    schedule: NoiseSchedule
    denoiser: Callable
    flow_schedule: FlowSchedule
    velocity: Callable


def _sampler_and_model(models: _Models, name: str, steps: int):
    """DEMO_SAMPLERS[name] on `steps` steps and the exact model it samples with."""
    if name in FLOW_SAMPLERS:
        sampler = FLOW_SAMPLERS[name](models.flow_schedule, steps, shift=FLOW_SHIFT, backend="auto")
        return sampler, models.velocity
    sampler = SAMPLERS[name](models.schedule, steps, timestep_spacing="trailing", backend="auto")
    return sampler, models.denoiser


def _run_sampler(models: _Models, name: str, steps: int, n: int, device: torch.device):
    """Samples n points with DEMO_SAMPLERS[name] on `steps` steps; returns (samples, seconds)."""
    sampler, model = _sampler_and_model(models, name, steps)
    if device.type == "cuda":  # compile the kernels first: compilation is not speed
        sample(model, sampler, shape=(n, 2), seed=0, device=device, progress=False)
    _sync(device)
    start = time.perf_counter()
    x = sample(model, sampler, shape=(n, 2), seed=0, device=device, progress=False)
    _sync(device)
    return x, time.perf_counter() - start


def _time_step_alone(models: _Models, name: str, steps: int, n: int, device: torch.device) -> float:
    """Seconds per ``sampler.step`` on [n, 2] float32 (one model output reused; the cost of
    a step does not depend on the values)."""
    sampler, model = _sampler_and_model(models, name, steps)
    seeds = seeds_from(0, n, device)
    x = torch.randn(n, 2, device=device)
    out = model(x, sampler.model_condition(0, n, device))
    kwargs = {"seeds": seeds} if sampler.stochastic else {}
    if sampler.multistep:
        kwargs["x0_prev"] = torch.zeros_like(x)
    for i in range(min(2, sampler.num_steps)):  # warm-up (kernel compilation on the GPU)
        sampler.step(x, out, i, **kwargs)
    _sync(device)
    start = time.perf_counter()
    for i in range(sampler.num_steps):
        sampler.step(x, out, i, **kwargs)
    _sync(device)
    return (time.perf_counter() - start) / sampler.num_steps


def _format_table(rows: Sequence[DemoRow]) -> str:
    head = f"{'sampler':<16} {'steps':>6} {'loop us/step':>13} {'step us':>8} {'sliced W2':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        dash = r.steps == 0
        steps = "-" if dash else str(r.steps)
        loop_us = "-" if dash else f"{r.us_per_step:.0f}"
        step_us = "-" if dash else f"{r.step_us:.0f}"
        lines.append(f"{r.sampler:<16} {steps:>6} {loop_us:>13} {step_us:>8} {r.sliced_w2:>10.4f}")
    return "\n".join(lines)


def _plot_samples(path: Path, true_x: torch.Tensor, results: dict, floor: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("true mixture", true_x, f"n={true_x.shape[0]}, sliced W2 {floor:.3f} (floor)")]
    panels += [
        (name, x, f"{steps} steps, sliced W2 {w2:.3f}") for name, (x, steps, w2) in results.items()
    ]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4 * cols, 4 * rows))
    FigureCanvasAgg(fig)
    for k, (name, x, subtitle) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        pts = x.detach().double().cpu()
        pts = pts[torch.isfinite(pts).all(dim=1)]
        color = "tab:gray" if k == 0 else f"C{k - 1}"
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, alpha=0.4, color=color, lw=0)
        ax.set_title(f"{name}\n{subtitle}", fontsize=10)
        ax.set_xlim(-4.6, 4.6)
        ax.set_ylim(-4.6, 4.6)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=8)
    fig.suptitle(
        "Samples of a 2-D Gaussian mixture drawn with its exact denoiser (flow_*: velocity)",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_steps(path: Path, sweep: dict, floors: Sequence[float], n: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = [
        ("-", "o", 3.5),
        ("--", "s", 2.5),
        ("-", "^", 2.0),
        (":", "D", 2.0),
        ("-.", "v", 1.5),
        ("-", "P", 2.0),
        ("--", "X", 1.5),
    ]
    for k, (name, points) in enumerate(sweep.items()):
        steps = [s for s, _ in points]
        w2 = [w for _, w in points]
        ls, marker, lw = styles[k % len(styles)]
        ax.plot(steps, w2, ls=ls, marker=marker, ms=4, lw=lw, color=f"C{k}", label=name)
    lo, hi, mean = min(floors), max(floors), sum(floors) / len(floors)
    ax.axhspan(lo, hi, color="gray", alpha=0.2, lw=0)
    ax.axhline(mean, color="gray", ls="--", lw=1, label=f"floor: {n} exact samples")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of sampling steps")
    ax.set_ylabel("sliced 2-Wasserstein distance to the true mixture")
    ax.set_title("Fit against steps: one big step lands on the mean; many small ones sample")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    fig.text(
        0.01,
        0.01,
        "Floor: mean and range of the figure for 8 draws of exact samples. Curves that coincide: "
        "ddim = euler (DDIM is Euler in sigma space),\nddpm = euler_ancestral (the same "
        "posterior step, the same noise); flow_*: the flow path with its exact velocity,\n"
        f"shift {FLOW_SHIFT:g}. Each point is one run of n samples (seed 0).",
        fontsize=7,
        color="dimgray",
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def run(
    out: str | Path = "out/demo",
    n: int = 4000,
    device: str = "auto",
    quick: bool = False,
    echo: Callable[[str], None] = print,
) -> list[DemoRow]:
    """Runs the demo: samples, table, and the two PNGs.

    Args:
        out: folder for ``samples.png`` and ``steps.png`` (created if missing).
        n: samples per sampler (``--quick`` caps it at 400); the step sweep uses
            ``min(n, 1000)`` per point.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        quick: a fast run for tests: fewer samples, DDPM on 100 steps, step sweep 1/5/20.
        echo: where the table and messages go.

    Returns:
        The table's rows: the true-mixture floor first, then one per sampler of
        DEMO_SAMPLERS.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 10:
        raise ValueError(f"n must be an int >= 10, got {n!r}")
    dev = _resolve_device(device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if quick:
        n = min(n, QUICK_N)
    defaults = QUICK_DEFAULT_STEPS if quick else DEFAULT_STEPS
    step_counts = QUICK_STEP_COUNTS if quick else STEP_COUNTS

    schedule = NoiseSchedule.create("linear", 1000)
    flow_schedule = FlowSchedule(schedule.num_train_timesteps)
    gmm = demo_mixture()
    models = _Models(
        schedule,
        gmm.denoiser(schedule, prediction_type="epsilon", conditioning="timestep"),
        flow_schedule,
        mixture_velocity(gmm, flow_schedule, conditioning="timestep"),
    )
    true_x = gmm.sample(n, torch.Generator().manual_seed(0))
    floor = gmm.fit(true_x).sliced_w2
    echo(f"fastdiff demo: {gmm.num_components}-component 2-D Gaussian mixture, n={n}, device={dev}")

    if dev.type == "cuda":  # compile the kernels before timing
        for name in DEMO_SAMPLERS:
            _run_sampler(models, name, 2, n, dev)

    rows = [DemoRow("true mixture", 0, 0.0, 0.0, floor)]
    results = {}
    for name in DEMO_SAMPLERS:
        steps = defaults.get(name, 50)
        x, seconds = _run_sampler(models, name, steps, n, dev)
        w2 = gmm.fit(x).sliced_w2
        results[name] = (x, steps, w2)
        step_s = _time_step_alone(models, name, steps, n, dev)
        rows.append(DemoRow(name, steps, 1e6 * seconds / steps, 1e6 * step_s, w2))
    echo(_format_table(rows))

    sweep_n = min(n, SWEEP_N)
    gen = torch.Generator().manual_seed(1)
    sweep_floors = [gmm.fit(gmm.sample(sweep_n, gen)).sliced_w2 for _ in range(8)]
    sweep: dict[str, list[tuple[int, float]]] = {}
    for name in DEMO_SAMPLERS:
        sweep[name] = []
        for steps in step_counts:
            x, _ = _run_sampler(models, name, steps, sweep_n, dev)
            sweep[name].append((steps, gmm.fit(x).sliced_w2))

    samples_png = out_dir / "samples.png"
    steps_png = out_dir / "steps.png"
    _plot_samples(samples_png, true_x, results, floor)
    _plot_steps(steps_png, sweep, sweep_floors, sweep_n)
    echo(f"wrote {samples_png}")
    echo(f"wrote {steps_png}")
    return rows
