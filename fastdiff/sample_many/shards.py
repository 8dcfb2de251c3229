"""The output folder: shard files, ``index.json`` (a record per shard), the manifest, the lock.

* ``samples_{start:08d}_{end:08d}.npz``: samples ``start .. end-1`` (arrays ``samples``,
  ``indices``, ``seeds``; bfloat16 stored as float32), written to a temporary file and renamed.
* ``index.json``: ``{"shards": [{"file", "start", "end", "count", "sha256", "seed"}, ...],
  "complete": bool}``; ``sha256`` is over the ``samples`` array's bytes, ``seed`` the run's
  seed. Rewritten by rank 0 after every round. A shard is good only if its record matches it.
* ``manifest.json``: ``{"format", "num_samples", "config", "info"}``; ``config`` is everything
  that changes the samples.
* ``.sample_many.lock``: an exclusive ``fcntl.flock`` held by rank 0 for the run, naming its
  holder (pid, host, start time).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from fastdiff.sample_many.comm import SampleManyError

__all__ = [
    "DTYPES",
    "FORMAT",
    "INDEX",
    "LOCK",
    "MANIFEST",
    "FolderInUseError",
    "atomic_write",
    "chunks",
    "config_differences",
    "folder_lock",
    "missing_ranges",
    "read_index",
    "read_json",
    "read_manifest",
    "remove_temporary_files",
    "save_shard",
    "scan_shards",
    "shard_name",
    "stored_dtype",
    "verify_shard",
    "write_index",
    "write_json",
]

MANIFEST = "manifest.json"
INDEX = "index.json"
LOCK = ".sample_many.lock"
FORMAT = "fastdiff.sample_many/2"
_SHARD_RE = re.compile(r"^samples_(\d+)_(\d+)\.npz$")
_TMP_RE = re.compile(r"^\..+\.tmp\.\d+$")
# The samples' dtypes, and the numpy dtype a shard stores each in (numpy has no bfloat16).
_NP_DTYPES = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "float32",
    "float64": "float64",
}
DTYPES = tuple(_NP_DTYPES)
_RECORD_KEYS = {"file": str, "start": int, "end": int, "count": int, "sha256": str, "seed": int}


class FolderInUseError(SampleManyError):
    """Another run holds the folder's lock."""


def shard_name(start: int, end: int, num_samples: int) -> str:
    """``samples_{start}_{end}.npz``, zero-padded to at least 8 digits."""
    width = max(8, len(str(num_samples)))
    return f"samples_{start:0{width}d}_{end:0{width}d}.npz"


def scan_shards(out_dir: Path) -> list[tuple[int, int, str]]:
    """The shard files ``(start, end, file name)`` in the folder, sorted; overlaps refused."""
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


def missing_ranges(covered: Sequence[tuple[int, int, Any]], num_samples: int) -> list[list[int]]:
    """Index ranges ``[a, b)`` of ``[0, num_samples)`` that no ``(start, end, _)`` covers."""
    missing = []
    position = 0
    for start, end, _ in sorted(covered):
        if start > position:
            missing.append([position, min(start, num_samples)])
        position = max(position, end)
    if position < num_samples:
        missing.append([position, num_samples])
    return [r for r in missing if r[1] > r[0]]


def chunks(missing: Sequence[Sequence[int]], shard_size: int) -> list[tuple[int, int]]:
    """The missing ranges cut into shards at multiples of ``shard_size``."""
    out = []
    for a, b in missing:
        start = a
        while start < b:
            end = min(b, (start // shard_size + 1) * shard_size)
            out.append((start, end))
            start = end
    return out


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, then ``os.replace``: a reader
    sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def read_json(path: Path) -> Any:
    """A JSON file, or ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON: {err}") from err


def read_manifest(path: Path) -> dict[str, Any]:
    """A checked manifest: its format, ``num_samples`` and the ``config`` fields that
    :func:`verify_shard` needs (``seed``, ``shape``, ``dtype``).

    Raises:
        ValueError: naming the file and the bad field.
    """
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path} is not a {FORMAT} manifest (format {got!r}); use another folder")
    num_samples, config = manifest.get("num_samples"), manifest.get("config")
    fields = {"num_samples": num_samples, "config": config}
    config = config if isinstance(config, dict) else {}
    fields.update({f"config.{k}": config.get(k) for k in ("seed", "shape", "dtype")})
    valid = {
        "num_samples": (
            "an int >= 1",
            _is_int(fields["num_samples"]) and fields["num_samples"] > 0,
        ),
        "config": ("an object", isinstance(fields["config"], dict)),
        "config.seed": ("an int >= 0", _is_int(config.get("seed")) and config["seed"] >= 0),
        "config.shape": (
            "a list of ints >= 1",
            isinstance(config.get("shape"), list)
            and all(_is_int(n) and n >= 1 for n in config["shape"]),
        ),
        "config.dtype": (f"one of {list(_NP_DTYPES)}", str(config.get("dtype")) in _NP_DTYPES),
    }
    for field, (want, ok) in valid.items():
        if not ok:
            raise ValueError(f"{path}: {field} must be {want}, got {fields[field]!r}")
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def stored_dtype(dtype_name: str) -> np.dtype:
    """The numpy dtype a shard stores samples of ``dtype_name`` in (bfloat16 as float32)."""
    return np.dtype(_NP_DTYPES[dtype_name])


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Every leaf where two configurations differ, whole: ``"key is <old> there, <new> here"``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key} is {json.dumps(a)} there, {json.dumps(b)} in this call")
    return out


def write_index(out_dir: Path, records: dict[str, dict[str, Any]], num_samples: int) -> None:
    """``index.json`` with ``records`` in index order, and whether they cover the run."""
    ordered = sorted(records.values(), key=lambda r: r["start"])
    covered = [(r["start"], r["end"], r["file"]) for r in ordered]
    index = {
        "format": FORMAT,
        "num_samples": num_samples,
        "complete": not missing_ranges(covered, num_samples),
        "shards": ordered,
    }
    write_json(out_dir / INDEX, index)


def remove_temporary_files(out_dir: Path) -> None:
    """Temporary files an interrupted run left behind."""
    for entry in os.listdir(out_dir):
        if _TMP_RE.match(entry):
            with contextlib.suppress(OSError):
                os.remove(out_dir / entry)


def _sha256(samples: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(samples).tobytes()).hexdigest()


def _seeds(seed: int, start: int, end: int) -> np.ndarray:
    return np.arange(start, end, dtype=np.int64) + np.int64(seed * 2**32)


def save_shard(
    out_dir: Path, start: int, end: int, samples: np.ndarray, seed: int, num_samples: int
) -> dict[str, Any]:
    """Writes samples ``start .. end-1`` of the run with ``seed`` atomically.

    Returns:
        The shard's record for ``index.json``.
    """
    name = shard_name(start, end, num_samples)
    arrays = {
        "samples": samples,
        "indices": np.arange(start, end, dtype=np.int64),
        "seeds": _seeds(seed, start, end),
    }
    atomic_write(out_dir / name, lambda f: np.savez(f, **arrays))
    record = {"file": name, "start": start, "end": end, "count": end - start, "seed": seed}
    return {**record, "sha256": _sha256(samples)}


def read_index(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The shard records of ``index.json`` by file name (empty if there is none).

    Raises:
        ValueError: an unreadable index, or a malformed record (naming it).
    """
    path = out_dir / INDEX
    if not path.exists():
        return {}
    index = read_json(path)
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list):
        raise ValueError(f"{path} has no list of shards")
    records = {}
    for record in shards:
        if not isinstance(record, dict) or any(
            not isinstance(record.get(k), t) or isinstance(record.get(k), bool)
            for k, t in _RECORD_KEYS.items()
        ):
            raise ValueError(f"{path}: a malformed shard record {record!r}")
        records[record["file"]] = record
    return records


def verify_shard(
    out_dir: Path, record: dict[str, Any], seed: int, shape: Sequence[int], dtype: np.dtype
) -> tuple[np.ndarray | None, str | None]:
    """Reads the shard of ``record`` and checks it: readable, ``count`` samples of ``shape``
    and ``dtype``, its indices, the seeds of the run with ``seed``, the record's checksum.

    Returns:
        ``(samples, None)`` for a good shard, ``(None, reason)`` for a bad one.
    """
    start, end, name = record["start"], record["end"], record["file"]
    match = _SHARD_RE.match(name)
    if match is None or (int(match.group(1)), int(match.group(2))) != (start, end):
        return None, f"index.json records it as samples {start}..{end - 1}"
    if record["seed"] != seed or record["count"] != end - start:
        return None, f"index.json records {record['count']} samples of seed {record['seed']}"
    try:
        with np.load(out_dir / name) as data:
            samples, indices, seeds = data["samples"], data["indices"], data["seeds"]
    except FileNotFoundError:
        return None, "it is missing"
    except Exception as err:  # truncated, empty, garbage: BadZipFile, OSError, ValueError, ...
        return None, f"it is unreadable ({type(err).__name__}: {err})"
    if samples.shape != (end - start, *shape) or samples.dtype != dtype:
        return None, (
            f"it holds {samples.dtype} samples of shape {samples.shape}, not "
            f"{dtype} of shape {(end - start, *shape)}"
        )
    if not np.array_equal(indices, np.arange(start, end)):
        return None, "its indices do not match its name"
    if not np.array_equal(seeds, _seeds(seed, start, end)):
        return None, f"its seeds are not those of this run (seed {seed})"
    if _sha256(samples) != record["sha256"]:
        return None, "its samples do not match their checksum in index.json"
    return samples, None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


@contextlib.contextmanager
def folder_lock(out_dir: Path) -> Iterator[None]:
    """Holds an exclusive ``fcntl.flock`` on ``out_dir/.sample_many.lock`` for the block.

    The file names the holder and is removed on release (while still locked; a waiter that
    locked a removed file sees another inode and retries).

    Raises:
        FolderInUseError: another process holds the lock (the message names it).
    """
    path = out_dir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUseError(
                f"{out_dir} is in use by another sample_many run ({_holder(path)}); wait for it "
                "to finish or use another folder"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        os.close(fd)
