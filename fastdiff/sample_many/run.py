"""The run: rank 0 owns the folder (lock, manifest, index), every rank samples its shards."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdiff.backend import resolve_backend
from fastdiff.checks import check_guidance, check_int, check_sampler
from fastdiff.sample_many import shards
from fastdiff.sample_many.comm import Comm, SampleManyError, init_distributed
from fastdiff.sample_many.models import Model, model_id_of, resolve_model

__all__ = ["SampleManyResult", "load_samples", "sample_many"]


@dataclasses.dataclass(frozen=True)
class SampleManyResult:
    """What a :func:`sample_many` call did (the same on every rank).

    Attributes:
        out_dir: the output folder.
        num_samples: samples in the run.
        new_samples: samples written by this call (0 if everything was done already).
        shards_written: shards written by this call, all ranks together.
        world_size: processes that took part.
        regenerated: ``"file: reason"`` of each bad shard this call found and sampled again.
    """

    out_dir: Path
    num_samples: int
    new_samples: int
    shards_written: int
    world_size: int
    regenerated: tuple[str, ...] = ()


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
    alphas = getattr(getattr(sampler, "schedule", None), "alphas_cumprod", None)
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


def _prepare_folder(
    out_dir: Path, manifest: dict[str, Any], shard_size: int
) -> tuple[list[tuple[int, int]], dict[str, dict[str, Any]], list[str]]:
    """Rank 0, holding the lock: checks the folder against ``manifest``, then verifies every
    shard, removes the bad ones, writes the manifest and the index.

    Returns:
        ``(shards to sample, records of the good shards, "file: reason" of the bad ones)``.

    Raises:
        ValueError: the folder belongs to another run (nothing is changed in it).
    """
    num_samples, config = manifest["num_samples"], manifest["config"]
    path = out_dir / shards.MANIFEST
    files = shards.scan_shards(out_dir)
    old = shards.read_manifest(path) if path.exists() else None
    if old is not None:
        differences = shards.config_differences(old["config"], config)
        if differences:
            raise ValueError(
                f"{out_dir} holds the samples of another run: its {shards.MANIFEST} differs ("
                + "; ".join(differences)
                + "). Nothing was changed: use another out_dir, or the same configuration "
                "to resume."
            )
        if num_samples < old["num_samples"]:
            raise ValueError(
                f"{out_dir} holds a run of {old['num_samples']} samples; num_samples={num_samples} "
                "would drop some (it may only grow). Nothing was changed."
            )
    elif files or (out_dir / shards.INDEX).exists():
        raise ValueError(
            f"{out_dir} holds sample shards but no {shards.MANIFEST}: they belong to an unknown "
            "run. Nothing was changed: use an empty folder."
        )
    if files and files[-1][1] > num_samples:
        raise ValueError(
            f"{out_dir} holds samples up to index {files[-1][1] - 1}, beyond num_samples="
            f"{num_samples}; nothing was changed"
        )
    try:
        records = shards.read_index(out_dir)
        unindexed = "it is not in index.json (written by an interrupted run?)"
    except ValueError as err:
        records, unindexed = {}, f"{err}"
    expected = (config["seed"], config["shape"], shards.stored_dtype(config["dtype"]))
    good, bad = {}, {}
    for _, _, name in files:
        record = records.get(name)
        reason = unindexed if record is None else shards.verify_shard(out_dir, record, *expected)[1]
        if reason is None:
            good[name] = record
        else:
            bad[name] = reason
    bad.update((name, "it is missing") for name in records.keys() - good.keys() - bad.keys())
    for name in bad:
        with contextlib.suppress(FileNotFoundError):
            os.remove(out_dir / name)
    shards.remove_temporary_files(out_dir)
    if old is None or old["num_samples"] != num_samples:
        shards.write_json(path, manifest)
    if good != records or old is None or old["num_samples"] != num_samples:
        shards.write_index(out_dir, good, num_samples)
    covered = [(r["start"], r["end"], name) for name, r in good.items()]
    todo = shards.chunks(shards.missing_ranges(covered, num_samples), shard_size)
    return todo, good, [f"{name}: {bad[name]}" for name in sorted(bad)]


def _batch_sampler(
    model: Model,
    sampler: Any,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    guidance: tuple[float | None, float],
    graph: bool,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn(seeds) -> samples`` of one batch: ``fastdiff.sample``, or with ``graph`` a
    ``SamplingGraph`` per batch size, replayed."""
    from fastdiff.sampling import initial_noise, sample

    guidance_scale, guidance_rescale = guidance
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
        if batch not in graphs:
            graphs[batch] = SamplingGraph(
                model,
                sampler,
                (batch, *shape),
                device=device,
                dtype=dtype,
                guidance_scale=guidance_scale,
                guidance_rescale=guidance_rescale,
            )
        x = initial_noise(seeds, (batch, *shape), dtype=dtype)
        return graphs[batch].run(x, seeds, copy=False)  # _sample_range copies it to the host

    return graphed


def _sample_range(
    fn: Callable[[torch.Tensor], torch.Tensor],
    start: int,
    end: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> np.ndarray:
    """Samples ``start .. end-1`` in batches, as numpy (bfloat16 as float32)."""
    parts = []
    for a in range(start, end, batch_size):
        seeds = torch.arange(a, min(end, a + batch_size), dtype=torch.int64, device=device)
        x = fn(seeds + seed * 2**32)
        parts.append((x.float() if x.dtype == torch.bfloat16 else x).detach().cpu().numpy())
    return np.concatenate(parts)


def _check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise ValueError(f"shape must be the shape of one sample (positive ints), got {shape!r}")
    return tuple(shape)


def sample_many(
    model: Model | str,
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

    Call it on every rank (under ``torchrun`` the process group is created from the
    environment when none exists; without one, a single process does everything). Sample
    ``i`` is ``fastdiff.sample(model, sampler, seeds=[seed * 2**32 + i])``: the same whatever
    the number of ranks, ``batch_size`` or ``shard_size``. A rerun with the same configuration
    resumes: it verifies every shard against ``index.json``, samples again the missing and the
    bad ones (named in a warning and in the result), and ``num_samples`` may grow. A folder of
    another run (its manifest differs, the backend included) is refused untouched; a folder in
    use by another run (its lock) is refused at once.

    Args:
        model: ``model(x, cond)``, or a spec string: ``"gmm"``, ``"package.module:callable"``
            (see :func:`fastdiff.sample_many.resolve_model`).
        sampler: a ``fastdiff.Sampler``.
        num_samples: how many samples (indices ``0 .. num_samples - 1``).
        shape: the shape of one sample, without the batch dimension.
        out_dir: the output folder (created; resumed when it holds this run).
        batch_size: samples per model call on a rank.
        seed: the run's seed, in ``[0, 2**31)``.
        shard_size: samples per shard file (default ``batch_size``): the work lost to an
            interruption.
        device: this rank's device (default: its CUDA device, else the CPU).
        dtype: the samples' dtype.
        guidance_scale, guidance_rescale: classifier-free guidance, as for ``sample``.
        model_id: the model's name in the manifest (default: the spec string or the callable's
            qualified name); give a checkpoint path or hash so other models' samples never mix.
        cuda_graph: replay each batch as a ``SamplingGraph``.
        progress: a tqdm bar on rank 0.

    Returns:
        A :class:`SampleManyResult`.

    Raises:
        ValueError: bad arguments, or an ``out_dir`` of another run (nothing is changed).
        SampleManyError: sampling or building the model failed on some rank (every rank
            raises it; finished shards are kept), or the folder is in use.

    Example::

        sample_many("gmm", DDIMSampler(schedule, 50), 50_000, (2,), "samples/", 1000)
        x = load_samples("samples/")  # [50000, 2]
    """
    num_samples = check_int("num_samples", num_samples, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    shard_size = batch_size if shard_size is None else check_int("shard_size", shard_size, 1)
    if check_int("seed", seed, 0) >= 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    if num_samples > 2**32:
        raise ValueError("num_samples must be at most 2**32 (sample seeds are seed*2**32 + i)")
    shape = _check_shape(shape)
    if not isinstance(model, str) and not callable(model):
        raise TypeError(f"model must be a model(x, cond) or a spec string, got {model!r}")
    check_sampler(sampler)
    if not isinstance(dtype, torch.dtype) or str(dtype)[len("torch.") :] not in shards.DTYPES:
        raise TypeError(f"dtype must be a torch dtype of {shards.DTYPES}, got {dtype!r}")
    if model_id is not None and not isinstance(model_id, str):
        raise TypeError(f"model_id must be a string, got {type(model_id).__name__}")
    guidance = check_guidance(guidance_scale, guidance_rescale)
    out_dir = Path(out_dir)

    with init_distributed(device) as device, contextlib.ExitStack() as lock:
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device; this rank samples on {device}")
        comm = Comm()
        probe = torch.empty(0, device=device, dtype=dtype)
        config = {
            "model": comm.broadcast(model_id or model_id_of(model)),  # rank 0's, for all
            "sampler": _sampler_config(sampler),
            "backend": resolve_backend(getattr(sampler, "backend", None), probe),
            "shape": list(shape),
            "dtype": str(dtype)[len("torch.") :],
            "seed": seed,
            "guidance_scale": guidance[0],
            "guidance_rescale": guidance[1] if guidance[0] is not None else None,
        }
        info = {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "world_size": comm.world,
            "batch_size": batch_size,
            "shard_size": shard_size,
            "device": device.type,
            "torch": torch.__version__,
        }
        manifest = {"format": shards.FORMAT, "num_samples": num_samples, "config": config}
        manifest["info"] = info
        # Rank 0 owns the folder: locks it for the run, checks it, finds the work left.
        status: Any = None
        if comm.rank == 0:
            try:
                if out_dir.exists() and not out_dir.is_dir():
                    raise ValueError(f"out_dir {out_dir} exists and is not a folder")
                out_dir.mkdir(parents=True, exist_ok=True)
                lock.enter_context(shards.folder_lock(out_dir))
                status = ("ok", _prepare_folder(out_dir, manifest, shard_size))
            except shards.FolderInUseError as err:
                status = ("busy", f"{err}")
            except (ValueError, OSError) as err:
                status = ("refused", f"{err}")
            except Exception as err:  # never leave the other ranks waiting
                status = ("failed", f"preparing {out_dir} failed: {type(err).__name__}: {err}")
        kind, payload = comm.broadcast(status)
        errors = {"busy": shards.FolderInUseError, "refused": ValueError, "failed": SampleManyError}
        if kind != "ok":
            raise errors[kind](payload)
        todo, records, bad = payload
        if bad and comm.rank == 0:
            warnings.warn(
                f"{out_dir}: sampling {len(bad)} bad shard(s) again:\n  " + "\n  ".join(bad),
                stacklevel=2,
            )

        # The model: built on every rank; any failure is everyone's error.
        built = error = None
        try:
            built, _ = resolve_model(model, sampler, device, dtype)
        except Exception as err:
            error = err
        comm.check(error, "building the model")
        fn = _batch_sampler(built, sampler, shape, device, dtype, guidance, cuda_graph)
        new_samples = 0
        done_before = num_samples - sum(b - a for a, b in todo)
        bar = tqdm(
            total=num_samples,
            initial=done_before,
            disable=not progress or comm.rank != 0,
            desc="sample_many",
            unit="sample",
        )
        with bar:
            for r in range(-(-len(todo) // comm.world)):
                index = r * comm.world + comm.rank
                error = record = None
                if index < len(todo):
                    start, end = todo[index]
                    try:
                        samples = _sample_range(fn, start, end, batch_size, seed, device)
                        record = shards.save_shard(out_dir, start, end, samples, seed, num_samples)
                    except Exception as err:
                        error = err
                written = [w for w in comm.gather(record) if w is not None]
                if comm.rank == 0:  # index what was written, even in a failed round
                    try:
                        records.update((w["file"], w) for w in written)
                        shards.write_index(out_dir, records, num_samples)
                    except OSError as err:
                        error = error or err
                comm.check(error, "sampling")
                count = sum(w["count"] for w in written)
                new_samples += count
                bar.update(count)
        return SampleManyResult(
            out_dir, num_samples, new_samples, len(todo), comm.world, tuple(bad)
        )


def load_samples(out_dir: str | os.PathLike) -> np.ndarray:
    """All samples of a finished run, in index order, every shard verified.

    Args:
        out_dir: the folder ``sample_many`` wrote.

    Returns:
        ``[num_samples, *shape]`` numpy array (float32 for bfloat16 runs).

    Raises:
        ValueError: no (or a malformed) manifest, or missing samples (the message lists the
            missing index ranges: rerun ``sample_many`` to finish).
        SampleManyError: a bad shard (truncated, changed, another run's: the message names
            the file; rerun ``sample_many`` to sample it again) or a bad index.

    Example:
        >>> load_samples("samples/").shape  # doctest: +SKIP
        (50000, 2)
    """
    out_dir = Path(out_dir)
    path = out_dir / shards.MANIFEST
    if not path.is_file():
        raise ValueError(f"{out_dir} has no {shards.MANIFEST}: not a sample_many folder")
    manifest = shards.read_manifest(path)
    num_samples, config = manifest["num_samples"], manifest["config"]
    try:
        records = sorted(shards.read_index(out_dir).values(), key=lambda r: r["start"])
    except ValueError as err:
        raise SampleManyError(f"{err}; rerun sample_many to rebuild it") from err
    missing = shards.missing_ranges([(r["start"], r["end"], "") for r in records], num_samples)
    if missing:
        shown = ", ".join(f"{a}..{b - 1}" for a, b in missing[:8])
        more = f" and {len(missing) - 8} more ranges" if len(missing) > 8 else ""
        raise ValueError(
            f"{out_dir} is incomplete: samples {shown}{more} are missing; rerun sample_many with "
            "the same configuration to finish"
        )
    expected = (config["seed"], config["shape"], shards.stored_dtype(config["dtype"]))
    parts, position = [], 0
    for record in records:
        if record["start"] != position:
            raise SampleManyError(f"{out_dir / shards.INDEX}: {record['file']} overlaps another")
        samples, reason = shards.verify_shard(out_dir, record, *expected)
        if reason is not None:
            raise SampleManyError(
                f"{out_dir / record['file']}: {reason}; rerun sample_many with the same "
                "configuration to sample it again"
            )
        parts.append(samples)
        position = record["end"]
    return np.concatenate(parts)[:num_samples]
