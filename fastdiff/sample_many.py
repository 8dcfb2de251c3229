"""Many samples on many processes: shards on disk, resumable, the same for any process count.

``sample_many`` draws ``num_samples`` samples (e.g. 50,000 for an FID evaluation) in
batches, spread over the ranks of a ``torch.distributed`` job (NCCL on GPUs, gloo on CPUs;
one process works too), and writes them as ``.npz`` shards into one folder:

* **Seeded by index.** Sample ``i`` has the Philox seed ``seed * 2**32 + i``
  (:mod:`fastdiff.philox`; the initial noise and every step's noise come from it), so a
  sample is the same whatever the number of processes, the batch size or the shard size.
* **Shards.** ``samples_{start:08d}_{end:08d}.npz`` holds samples ``start .. end-1``
  (arrays ``samples``, ``indices``, ``seeds``); it is written to a temporary file and
  renamed (``os.replace``), so a shard on disk is always complete. bfloat16 samples are
  stored as float32 (exactly; numpy has no bfloat16).
* **Manifest.** ``manifest.json`` holds the run's configuration (model id, sampler and its
  plan and coefficient-table hash, schedule hash, sample shape and dtype, seed, guidance,
  number of samples). A folder whose manifest differs is another run's: a clear error,
  nothing touched. ``index.json`` lists the shards in order once the run is complete.
* **Resume.** A rerun with the same configuration skips every finished shard (whatever
  batch size, shard size or process count made it) and samples only the missing indices;
  ``num_samples`` may grow (samples are seeded by index), never shrink.
* **Failures.** An error on one rank (a model that raises, out of memory) is caught there;
  after each round every rank learns of it through an all-reduce and raises
  :class:`SampleManyError` naming the failed rank(s), instead of waiting forever. Finished
  shards stay on disk: rerun to resume.
* **Progress** on rank 0 (tqdm).

Command line (``--model gmm``: the built-in 2-D Gaussian mixture with its exact denoiser;
``--model package.module:factory``: your factory, see :func:`resolve_model`)::

    torchrun --nproc_per_node=8 -m fastdiff.sample_many --model gmm --sampler ddim \\
        --steps 50 --num-samples 50000 --shape 2 --batch-size 1000 --out samples/
    python -c "from fastdiff.sample_many import load_samples; print(load_samples('samples').shape)"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "MANIFEST",
    "SampleManyError",
    "SampleManyResult",
    "builtin_gmm",
    "load_samples",
    "main",
    "resolve_model",
    "sample_many",
]

MANIFEST = "manifest.json"
INDEX = "index.json"
FORMAT = "fastdiff.sample_many/1"
_SHARD_RE = re.compile(r"^samples_(\d+)_(\d+)\.npz$")
_TMP_RE = re.compile(r"^\.samples_\d+_\d+\.npz\.tmp\.")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SampleManyError(RuntimeError):
    """Sampling failed on one or more ranks; finished shards are kept (rerun to resume)."""


@dataclasses.dataclass(frozen=True)
class SampleManyResult:
    """What a :func:`sample_many` call did (the same on every rank).

    Attributes:
        out_dir: the output folder.
        num_samples: samples in the run.
        new_samples: samples written by this call (0 if everything was done already).
        shards_written: shards written by this call, all ranks together.
        world_size: processes that took part.
    """

    out_dir: Path
    num_samples: int
    new_samples: int
    shards_written: int
    world_size: int


# -- models ------------------------------------------------------------------------------------


def builtin_gmm(sampler: Any, device: torch.device | str = "cpu") -> Model:
    """The built-in model of ``--model gmm``: the exact denoiser of a fixed 2-D mixture of
    three Gaussians (``fastdiff.gmm``), in the sampler's prediction type and conditioning.

    Args:
        sampler: the sampler (its schedule, prediction type and conditioning are used).
        device: unused (the denoiser follows its input's device); kept for the factory rule.

    Returns:
        ``model(x, cond)`` for samples of shape ``[B, 2]``.
    """
    from fastdiff.gmm import GaussianMixture

    del device
    means = [[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]]
    covs = [
        [[0.30, 0.10], [0.10, 0.20]],
        [[0.25, -0.05], [-0.05, 0.15]],
        [[0.10, 0.0], [0.0, 0.40]],
    ]
    gmm = GaussianMixture([0.3, 0.45, 0.25], means, covs)
    return gmm.denoiser(
        sampler.schedule,
        getattr(sampler, "prediction_type", "epsilon"),
        getattr(sampler, "conditioning", "timestep"),
    )


_FACTORY_KWARGS = ("device", "sampler", "dtype")


def _is_factory(obj: Any) -> bool:
    """A callable whose required parameters (if any) are all named ``device``, ``sampler`` or
    ``dtype`` is a factory; anything else (``model(x, cond)``, any nn.Module) is a model."""
    if isinstance(obj, torch.nn.Module):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [
        p
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    return all(
        p.name in _FACTORY_KWARGS and p.kind is not inspect.Parameter.POSITIONAL_ONLY
        for p in required
    )


def _call_factory(factory: Callable[..., Any], **available: Any) -> Any:
    """Calls ``factory`` with those of ``available`` (device, sampler, dtype) it names."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**available)
    return factory(**{k: v for k, v in available.items() if k in params})


def resolve_model(
    model: Model | Callable[..., Model] | str,
    sampler: Any,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Model, str]:
    """The model a rank samples with, and its id for the manifest.

    ``model`` is one of:

    * ``"gmm"``: :func:`builtin_gmm`;
    * ``"package.module:callable"``: a factory, imported on each rank;
    * a factory: a callable whose required parameters, if any, are all named ``device``,
      ``sampler`` or ``dtype`` (``functools.partial(build, cfg)``, ``def build(device)``);
    * a model: anything else, ``model(x, cond) -> output`` (an ``nn.Module`` is always a
      model).

    A factory is called once on each rank (after ``torch.cuda.set_device``), with those of
    the keyword arguments ``device``, ``sampler`` and ``dtype`` that its signature names,
    and must return the model on that device, in eval mode.

    Args:
        model: as above.
        sampler: the sampler (passed to factories that take ``sampler``).
        device: this rank's device.
        dtype: the samples' dtype.

    Returns:
        ``(model, default model id)``: the spec string, or the callable's qualified name.

    Raises:
        ValueError: a malformed spec, or one that does not import.
        TypeError: not callable, or a factory that returns something not callable.
    """
    if isinstance(model, str):
        spec = model
        if spec == "gmm":
            factory: Callable[..., Any] = builtin_gmm
        else:
            module_name, sep, attr = spec.partition(":")
            if not sep or not module_name or not attr:
                raise ValueError(
                    f"model spec {spec!r}: use 'gmm' or 'package.module:callable' (a factory)"
                )
            try:
                factory = importlib.import_module(module_name)
                for part in attr.split("."):
                    factory = getattr(factory, part)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"model spec {spec!r} does not import: {err}") from err
            if not callable(factory):
                raise TypeError(
                    f"model spec {spec!r} names {type(factory).__name__}, not a callable"
                )
        built = _call_factory(factory, device=device, sampler=sampler, dtype=dtype)
        model_id = spec
    elif callable(model):
        model_id = _qualname(model)
        built = (
            _call_factory(model, device=device, sampler=sampler, dtype=dtype)
            if _is_factory(model)
            else model
        )
    else:
        raise TypeError(
            "model must be a model(x, cond), a factory or a spec string, got "
            f"{type(model).__name__}"
        )
    if not callable(built):
        raise TypeError(f"the model factory returned {type(built).__name__}, not a model(x, cond)")
    return built, model_id


def _qualname(obj: Any) -> str:
    """``module.qualname`` of a function, class, partial's function or an object's class."""
    if isinstance(obj, functools.partial):
        obj = obj.func
    target = (
        obj
        if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj)
        else type(obj)
    )
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{getattr(target, '__qualname__', type(obj).__name__)}"


# -- configuration and the folder ----------------------------------------------------------------


def _sha256(t: torch.Tensor) -> str:
    array = t.detach().to("cpu", torch.float64).contiguous().numpy()
    return hashlib.sha256(array.tobytes()).hexdigest()


def _plain(value: Any) -> Any:
    """A JSON-able form of a simple config value (None for anything else)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return None


def _sampler_config(sampler: Any) -> dict[str, Any]:
    """Everything about a sampler that changes its samples."""
    config: dict[str, Any] = {"name": type(sampler).__name__, "num_steps": int(sampler.num_steps)}
    timesteps = getattr(sampler, "timesteps", None)
    if isinstance(timesteps, torch.Tensor):
        config["timesteps"] = [int(t) for t in timesteps.tolist()]
    table = getattr(sampler, "table", None)
    if isinstance(table, torch.Tensor):
        config["table_sha256"] = _sha256(table)
    schedule = getattr(sampler, "schedule", None)
    alphas = getattr(schedule, "alphas_cumprod", None)
    if isinstance(alphas, torch.Tensor):
        config["schedule_sha256"] = _sha256(alphas)
    for name in (
        "prediction_type",
        "conditioning",
        "clip_sample_range",
        "thresholding",
        "variance_type",
        "eta",
        "use_clipped_model_output",
    ):
        if hasattr(sampler, name):
            config[name] = _plain(getattr(sampler, name))
    return config


def _shard_name(start: int, end: int, width: int) -> str:
    return f"samples_{start:0{width}d}_{end:0{width}d}.npz"


def _width(num_samples: int) -> int:
    return max(8, len(str(num_samples)))


def _scan_shards(out_dir: Path) -> list[tuple[int, int, str]]:
    """Finished shards ``(start, end, file name)`` in the folder, sorted by start."""
    shards = []
    for entry in os.listdir(out_dir):
        match = _SHARD_RE.match(entry)
        if match:
            start, end = int(match.group(1)), int(match.group(2))
            if end <= start:
                raise ValueError(f"{out_dir / entry}: a shard name with an empty range")
            shards.append((start, end, entry))
    shards.sort()
    for (_, e0, f0), (s1, _, f1) in zip(shards, shards[1:]):
        if s1 < e0:
            raise ValueError(
                f"{out_dir}: shards {f0} and {f1} overlap; the folder was written by more than "
                "one run at a time. Move one of them away."
            )
    return shards


def _missing_ranges(shards: Sequence[tuple[int, int, str]], num_samples: int) -> list[list[int]]:
    """Index ranges ``[a, b)`` of ``[0, num_samples)`` that no shard covers."""
    missing = []
    position = 0
    for start, end, _ in shards:
        if start > position:
            missing.append([position, min(start, num_samples)])
        position = max(position, end)
    if position < num_samples:
        missing.append([position, num_samples])
    return [r for r in missing if r[1] > r[0]]


def _chunks(missing: Sequence[Sequence[int]], shard_size: int) -> list[tuple[int, int]]:
    """The missing ranges cut into shards at multiples of ``shard_size``."""
    chunks = []
    for a, b in missing:
        start = a
        while start < b:
            end = min(b, (start // shard_size + 1) * shard_size)
            chunks.append((start, end))
            start = end
    return chunks


def _atomic_write_bytes(path: Path, data: bytes, tag: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{tag}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), "json")


def _prepare_folder(
    out_dir: Path, manifest: dict[str, Any], shard_size: int
) -> list[tuple[int, int]]:
    """Rank 0: check (or create) the folder and its manifest; the shards still to sample.

    Raises:
        ValueError: the folder belongs to another run, has shards but no manifest, or holds
            shards beyond ``num_samples``.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    num_samples = manifest["num_samples"]
    path = out_dir / MANIFEST
    shards = _scan_shards(out_dir)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a readable manifest: {err}") from err
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise ValueError(f"{path} is not a fastdiff.sample_many manifest")
        if old.get("config") != manifest["config"]:
            keys = sorted(
                k
                for k in set(old.get("config", {})) | set(manifest["config"])
                if old.get("config", {}).get(k) != manifest["config"].get(k)
            )
            details = "; ".join(
                f"{k} is {_short(old.get('config', {}).get(k))} there, "
                f"{_short(manifest['config'].get(k))} in this call"
                for k in keys
            )
            raise ValueError(
                f"{out_dir} holds the samples of another run: its {MANIFEST} differs ({details}). "
                "Nothing was changed: use another out_dir, or the same configuration to resume."
            )
        if num_samples < old.get("num_samples", 0):
            raise ValueError(
                f"{out_dir} holds a run of {old['num_samples']} samples; num_samples={num_samples} "
                "would drop some (it may only grow). Nothing was changed."
            )
    elif shards:
        raise ValueError(
            f"{out_dir} holds sample shards but no {MANIFEST}: they belong to an unknown run. "
            "Nothing was changed: use an empty folder."
        )
    if shards and shards[-1][1] > num_samples:
        raise ValueError(
            f"{out_dir} holds samples up to index {shards[-1][1] - 1}, beyond num_samples="
            f"{num_samples}; nothing was changed"
        )
    for entry in os.listdir(out_dir):  # temporary files of an interrupted run
        if _TMP_RE.match(entry):
            with contextlib.suppress(OSError):
                os.remove(out_dir / entry)
    if not path.exists() or json.loads(path.read_text()).get("num_samples") != num_samples:
        _write_json(path, manifest)
    return _chunks(_missing_ranges(shards, num_samples), shard_size)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _save_shard(
    out_dir: Path, start: int, end: int, samples: np.ndarray, seeds: np.ndarray, width: int
) -> None:
    """Writes one shard atomically: a temporary file, then os.replace."""
    path = out_dir / _shard_name(start, end, width)
    tmp = out_dir / f".{path.name}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, samples=samples, indices=np.arange(start, end, dtype=np.int64), seeds=seeds)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def load_samples(out_dir: str | os.PathLike) -> np.ndarray:
    """All samples of a finished run, in index order.

    Args:
        out_dir: the folder ``sample_many`` wrote.

    Returns:
        ``[num_samples, *shape]`` numpy array (float32 for bfloat16 runs).

    Raises:
        ValueError: no manifest, missing samples (the message lists the missing index
            ranges: rerun ``sample_many`` to finish), or a shard whose content does not
            match its name.
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        raise ValueError(f"{out_dir} has no {MANIFEST}: not a sample_many folder")
    manifest = json.loads(path.read_text())
    num_samples = int(manifest["num_samples"])
    shards = _scan_shards(out_dir)
    missing = _missing_ranges(shards, num_samples)
    if missing:
        shown = ", ".join(f"{a}..{b - 1}" for a, b in missing[:8])
        more = f" and {len(missing) - 8} more ranges" if len(missing) > 8 else ""
        raise ValueError(
            f"{out_dir} is incomplete: samples {shown}{more} are missing; rerun sample_many with "
            "the same configuration to finish"
        )
    parts = []
    for start, end, name in shards:
        if start >= num_samples:
            continue
        with np.load(out_dir / name) as data:
            indices = data["indices"]
            if indices.shape != (end - start,) or indices[0] != start or indices[-1] != end - 1:
                raise ValueError(f"{out_dir / name}: its indices do not match its name")
            parts.append(data["samples"][: max(0, min(end, num_samples) - start)])
    return np.concatenate(parts)


# -- distribution --------------------------------------------------------------------------------


class _Comm:
    """The few collectives sample_many needs; trivial for one process."""

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
        if self.world == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return [int(v) for v in t.tolist()]

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def check(self, error: BaseException | None, what: str) -> None:
        """Every rank raises SampleManyError if any rank had an error (collective)."""
        failed = self.sum([1 if error is not None else 0])[0]
        if not failed:
            return
        messages = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        lines = [f"  rank {r}: {m}" for r, m in enumerate(messages) if m is not None]
        ranks = [r for r, m in enumerate(messages) if m is not None]
        raise SampleManyError(
            f"{what} failed on rank{'s' if len(ranks) > 1 else ''} "
            f"{', '.join(map(str, ranks))} of {self.world}:\n"
            + "\n".join(lines)
            + "\nFinished shards are kept; rerun with the same configuration to resume."
        ) from error


def _init_distributed(device: torch.device | str | None) -> tuple[bool, torch.device]:
    """Joins the torchrun job (NCCL for CUDA, gloo for CPU) when the environment describes
    one and no group exists yet; picks this rank's device. Returns (group created, device)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            index = local_rank % max(1, torch.cuda.device_count())
            if dist.is_available() and dist.is_initialized() and world == 1:
                index = dist.get_rank() % max(1, torch.cuda.device_count())
            device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    created = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return created, device


@contextlib.contextmanager
def _destroy_group_on_exit(created: bool) -> Iterator[None]:
    """Destroys the process group on leaving the block (normally or by an exception) when
    :func:`_init_distributed` created it for this call (``created``)."""
    try:
        yield
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


# -- the run -------------------------------------------------------------------------------------


def sample_many(
    model: Model | Callable[..., Model] | str,
    sampler: Any,
    num_samples: int,
    shape: Sequence[int],
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    seed: int = 0,
    *,
    shard_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    model_id: str | None = None,
    cuda_graph: bool = False,
    progress: bool = True,
) -> SampleManyResult:
    """Samples ``num_samples`` samples into ``out_dir``, shared over the ranks of the job.

    Call it on every rank (``torchrun``: the process group is created from the environment
    when none exists; without one, a single process does everything). Sample ``i`` is
    ``fastdiff.sample(model, sampler, seeds=[seed * 2**32 + i])``: the same whatever the
    number of ranks, ``batch_size`` or ``shard_size``. See the module docstring for the
    folder layout, resuming and failures.

    Args:
        model: ``model(x, cond)``, a factory, or a spec (``"gmm"``,
            ``"package.module:callable"``): see :func:`resolve_model`.
        sampler: a ``fastdiff.samplers.Sampler``.
        num_samples: how many samples (indices ``0 .. num_samples - 1``).
        shape: the shape of ONE sample, without the batch dimension (``(2,)``,
            ``(4, 64, 64)``).
        out_dir: the output folder (created; resumed when it holds this run).
        batch_size: samples per model call on a rank.
        seed: the run's seed, an int in ``[0, 2**31)``.
        shard_size: samples per shard file (default: ``batch_size``); a rank writes one shard
            between collective checks, so it bounds the work lost to an interruption.
        device: this rank's device (default: its CUDA device under torchrun, else CUDA when
            available, else the CPU).
        dtype: the samples' dtype.
        guidance_scale, guidance_rescale: classifier-free guidance, as for ``sample``.
        model_id: the model's name in the manifest (default: the spec string or the callable's
            qualified name). Give a checkpoint path or hash so that another model's samples
            are never mixed in.
        cuda_graph: sample through a :class:`fastdiff.graph.SamplingGraph` (captured once per
            batch shape, replayed for every batch).
        progress: show a tqdm progress bar on rank 0.

    Returns:
        A :class:`SampleManyResult`.

    Raises:
        ValueError: bad arguments, or an ``out_dir`` that holds another run (nothing is
            changed in it).
        SampleManyError: sampling (or building the model) failed on some rank; every rank
            raises it, finished shards are kept.
    """
    for name, value, low in (
        ("num_samples", num_samples, 1),
        ("batch_size", batch_size, 1),
        ("shard_size", batch_size if shard_size is None else shard_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    shard_size = batch_size if shard_size is None else shard_size
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    if num_samples > 2**32:
        raise ValueError("num_samples must be at most 2**32 (sample seeds are seed*2**32 + i)")
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise ValueError(f"shape must be the shape of one sample (positive ints), got {shape!r}")
    shape = tuple(shape)
    for attr in ("num_steps", "model_condition", "step", "schedule"):
        if not hasattr(sampler, attr):
            raise TypeError(f"sampler must be a fastdiff sampler, got {type(sampler).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if model_id is not None and not isinstance(model_id, str):
        raise TypeError(f"model_id must be a string, got {type(model_id).__name__}")
    if guidance_scale is None and guidance_rescale:
        raise ValueError("guidance_rescale needs guidance_scale")
    out_dir = Path(out_dir)

    created, device = _init_distributed(device)
    with _destroy_group_on_exit(created):
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device; this rank samples on {device}")
        comm = _Comm()
        if model_id is None:
            model_id = model if isinstance(model, str) else _qualname(model)
        model_id = comm.broadcast(model_id)  # rank 0's name for the manifest

        manifest = {
            "format": FORMAT,
            "num_samples": num_samples,
            "config": {
                "model": model_id,
                "sampler": _sampler_config(sampler),
                "shape": list(shape),
                "dtype": str(dtype).replace("torch.", ""),
                "seed": seed,
                "guidance_scale": guidance_scale,
                "guidance_rescale": guidance_rescale if guidance_scale is not None else None,
            },
            "info": {
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "world_size": comm.world,
                "batch_size": batch_size,
                "shard_size": shard_size,
                "device": device.type,
                "torch": torch.__version__,
            },
        }
        # Rank 0 owns the folder: checks it, writes the manifest, finds the work left.
        plan: Any
        if comm.rank == 0:
            try:
                plan = ("ok", _prepare_folder(out_dir, manifest, shard_size))
            except (ValueError, OSError) as err:
                plan = ("error", f"{err}")
        else:
            plan = None
        status, payload = comm.broadcast(plan)
        if status != "ok":
            raise ValueError(payload)

        # The model: built on every rank; any failure is everyone's error.
        built = error = None
        try:
            built, _ = resolve_model(model, sampler, device, dtype)
        except Exception as err:
            error = err
        comm.check(error, "building the model")
        chunks = [tuple(c) for c in payload]
        width = _width(num_samples)
        done_before = num_samples - sum(b - a for a, b in chunks)

        sampler_fn = _batch_sampler(
            built, sampler, shape, device, dtype, guidance_scale, guidance_rescale, cuda_graph
        )
        rounds = -(-len(chunks) // comm.world)
        bar = tqdm(
            total=num_samples,
            initial=done_before,
            disable=not progress or comm.rank != 0,
            desc="sample_many",
            unit="sample",
        )
        new_samples = 0
        with bar:
            for r in range(rounds):
                index = r * comm.world + comm.rank
                error = None
                count = 0
                if index < len(chunks):
                    start, end = chunks[index]
                    try:
                        samples, seeds = _sample_range(
                            sampler_fn, start, end, batch_size, seed, device
                        )
                        _save_shard(out_dir, start, end, samples, seeds, width)
                        count = end - start
                    except Exception as err:
                        error = err
                failed, total = comm.sum([1 if error is not None else 0, count])
                if failed:
                    comm.check(error, "sampling")
                new_samples += total
                bar.update(total)

        error = None
        if comm.rank == 0:
            try:
                shards = _scan_shards(out_dir)
                if not _missing_ranges(shards, num_samples):
                    _write_json(
                        out_dir / INDEX,
                        {
                            "num_samples": num_samples,
                            "shards": [{"file": f, "start": s, "end": e} for s, e, f in shards],
                        },
                    )
            except (ValueError, OSError) as err:
                error = err
        comm.check(error, "writing index.json")  # everyone waits for the index
        return SampleManyResult(out_dir, num_samples, new_samples, len(chunks), comm.world)


def _batch_sampler(model, sampler, shape, device, dtype, guidance_scale, guidance_rescale, graph):
    """``fn(seeds) -> samples`` for one batch: ``fastdiff.sample``, or a cached
    SamplingGraph per batch size with ``cuda_graph``."""
    from fastdiff.sampling import initial_noise, sample

    if not graph:

        def eager(seeds: torch.Tensor) -> torch.Tensor:
            return sample(
                model,
                sampler,
                shape=(seeds.shape[0], *shape),
                seeds=seeds,
                device=device,
                dtype=dtype,
                guidance_scale=guidance_scale,
                guidance_rescale=guidance_rescale,
                progress=False,
            )

        return eager

    from fastdiff.graph import SamplingGraph

    graphs: dict[int, SamplingGraph] = {}

    def graphed(seeds: torch.Tensor) -> torch.Tensor:
        batch = seeds.shape[0]
        g = graphs.get(batch)
        if g is None:
            g = graphs[batch] = SamplingGraph(
                model,
                sampler,
                (batch, *shape),
                device=device,
                dtype=dtype,
                guidance_scale=guidance_scale,
                guidance_rescale=guidance_rescale,
            )
        x = initial_noise(seeds, (batch, *shape), dtype=dtype)
        return g._run(x, seeds, start=0, progress=False, callback=None)

    return graphed


def _sample_range(
    fn: Callable[[torch.Tensor], torch.Tensor],
    start: int,
    end: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``start .. end-1`` in batches; numpy (samples, seeds)."""
    parts = []
    base = seed * 2**32
    for a in range(start, end, batch_size):
        b = min(end, a + batch_size)
        seeds = torch.arange(a, b, dtype=torch.int64, device=device) + base
        x = fn(seeds)
        if x.dtype == torch.bfloat16:
            x = x.float()
        parts.append(x.detach().cpu().numpy())
    seeds = np.arange(start, end, dtype=np.int64) + np.int64(base)
    return np.concatenate(parts), seeds


# -- command line ---------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def build_parser() -> argparse.ArgumentParser:
    """The command line's argument parser.

    Returns:
        The parser.
    """
    from fastdiff.samplers import SAMPLERS
    from fastdiff.schedules import BETA_SCHEDULES, TIMESTEP_SPACINGS

    p = argparse.ArgumentParser(
        prog="python -m fastdiff.sample_many",
        description=(
            "Draw many samples over all ranks of a torchrun job into resumable .npz shards "
            "(sample i is seeded by seed*2**32 + i: the same for any process count)."
        ),
    )
    p.add_argument("--model", default="gmm", help="'gmm' (built-in 2-D mixture) or module:factory")
    p.add_argument(
        "--model-id", default=None, help="model name for the manifest (default: --model)"
    )
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--steps", default="50", help="steps: an int, or a respacing like ddim25")
    p.add_argument("--eta", type=float, default=None, help="eta (ddim, euler_ancestral)")
    p.add_argument("--schedule", default="linear", choices=BETA_SCHEDULES)
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--timestep-spacing", default="trailing", choices=TIMESTEP_SPACINGS)
    p.add_argument(
        "--prediction-type", default="epsilon", choices=("epsilon", "sample", "v_prediction")
    )
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"))
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--shape", required=True, help="one sample's shape, e.g. 2 or 4,64,64")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cuda-graph", action="store_true", help="replay each batch as a CUDA graph")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``torchrun --nproc_per_node=N -m fastdiff.sample_many ...`` (or plain ``python -m``).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 done, 2 bad arguments or a folder of another run, 1 a failure.
    """
    from fastdiff.samplers import SAMPLERS
    from fastdiff.schedules import NoiseSchedule

    args = build_parser().parse_args(argv)
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
            dtype=_DTYPES[args.dtype],
            guidance_scale=args.guidance_scale,
            model_id=args.model_id,
            cuda_graph=args.cuda_graph,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError) as err:
        print(f"fastdiff.sample_many: error: {err}", file=sys.stderr)
        return 2
    except SampleManyError as err:
        print(f"fastdiff.sample_many: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"{result.out_dir}: {result.num_samples} samples ({result.new_samples} new, "
            f"{result.shards_written} shard{'s' if result.shards_written != 1 else ''} written "
            f"by {result.world_size} process{'es' if result.world_size > 1 else ''})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
