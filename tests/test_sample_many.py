"""fastdiff.sample_many: sharded, verified, resumable sampling over processes (CPU, gloo).

Every sample is seeded by its index, and every op of the loop is row-wise (see
test_sampling.py), so runs with different process counts, batch sizes and shard sizes must
give bitwise the same samples: comparisons are exact. Multi-process runs are spawned with
torch.multiprocessing (gloo over a file store) and joined with a deadline, so a hang fails
the test instead of stalling the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fastdiff.__main__ import main as fastdiff_main
from fastdiff.gmm import GaussianMixture
from fastdiff.sample_many import (
    INDEX,
    MANIFEST,
    FolderInUseError,
    SampleManyError,
    load_samples,
    resolve_model,
    sample_many,
)
from fastdiff.sample_many.shards import LOCK, folder_lock
from fastdiff.samplers import SAMPLERS
from fastdiff.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.create("linear", 1000)
STEPS = 6
SHAPE = (3,)
SPAWN_TIMEOUT_S = 90


def _sampler(name: str = "ddpm"):
    return SAMPLERS[name](SCHEDULE, STEPS, backend="reference")


def _mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(99)
    means = torch.randn(3, SHAPE[0], generator=g, dtype=torch.float64) * 2
    a = torch.randn(3, SHAPE[0], SHAPE[0], generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) / SHAPE[0] + 0.1 * torch.eye(SHAPE[0], dtype=torch.float64)
    return GaussianMixture([0.2, 0.5, 0.3], means, covs)


def make_model(sampler, **_):
    """A factory (``test_sample_many:make_model``, importable by spawned workers): the
    mixture's exact denoiser."""
    return _mixture().denoiser(sampler.schedule, sampler.prediction_type)


def failing_factory(**_):
    raise OSError("checkpoint not found")


FACTORY_CALLS = []


def recording_factory(device, dtype, sampler):
    FACTORY_CALLS.append({"device": device, "dtype": dtype, "sampler": sampler})
    return make_model(sampler)


def none_factory(**_):
    return None


def no_argument_factory():
    return make_model(_sampler())


class FailingModel:
    """Raises on call number ``fail_at`` (counted in this process) and after."""

    def __init__(self, model, fail_at: int, exc: type[BaseException] = RuntimeError) -> None:
        self.model = model
        self.fail_at = fail_at
        self.exc = exc
        self.calls = 0

    def __call__(self, x, cond):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise self.exc(f"simulated model failure at call {self.calls}")
        return self.model(x, cond)


class CountingModel:
    def __init__(self, model) -> None:
        self.model = model
        self.samples = 0

    def __call__(self, x, cond):
        self.samples += x.shape[0]
        return self.model(x, cond)


def _run(out_dir, num_samples=23, batch_size=4, model=None, sampler=None, **kwargs):
    sampler = sampler or _sampler(kwargs.pop("sampler_name", "ddpm"))
    model = model if model is not None else make_model(sampler)
    kwargs.setdefault("model_id", "test-gmm")
    kwargs.setdefault("progress", False)
    kwargs.setdefault("seed", 5)
    return sample_many(
        model, sampler, num_samples, SHAPE, out_dir, batch_size, device="cpu", **kwargs
    )


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


# -- spawned workers ------------------------------------------------------------------------------


def _worker(rank, world, init_file, out_dir, result_dir, batch_size, shard_size, fail_rank):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = Path(result_dir) / f"rank{rank}.txt"
    try:
        sampler = _sampler()
        model = make_model(sampler)
        if rank == fail_rank:
            # fail in this rank's second shard (each batch calls the model STEPS times)
            model = FailingModel(model, fail_at=(shard_size // batch_size) * STEPS + 1)
        sample_many(
            model,
            sampler,
            23,
            SHAPE,
            out_dir,
            batch_size,
            seed=5,
            shard_size=shard_size,
            device="cpu",
            model_id="test-gmm",
            progress=rank == 0,
        )
        result.write_text("ok")
    except Exception as err:  # report to the test
        result.write_text(f"{type(err).__name__}: {err}")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, out_dir, batch_size, shard_size, fail_rank=-1, world=2) -> dict[int, str]:
    result_dir = tmp_path / f"results_{time.monotonic_ns()}"
    result_dir.mkdir()
    init_file = tmp_path / f"pg_{time.monotonic_ns()}"
    args = (world, str(init_file), str(out_dir), str(result_dir), batch_size, shard_size, fail_rank)
    context = mp.start_processes(_worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"sample_many workers did not finish within {SPAWN_TIMEOUT_S} s (a hang)")
    return {r: (result_dir / f"rank{r}.txt").read_text() for r in range(world)}


def test_two_processes_equal_one_process_and_other_batch_sizes(tmp_path):
    two = tmp_path / "two"
    results = _spawn(tmp_path, two, batch_size=3, shard_size=5)
    assert results == {0: "ok", 1: "ok"}
    one = tmp_path / "one"
    result = _run(one, batch_size=7, shard_size=10)
    assert result.new_samples == 23 and result.world_size == 1
    a, b = load_samples(two), load_samples(one)
    assert a.shape == (23, *SHAPE) and a.dtype == np.float32
    assert np.isfinite(a).all()
    assert np.array_equal(a, b)
    # the samples are fastdiff.sample's, seed by seed
    from fastdiff.sampling import sample

    sampler = _sampler()
    seeds = torch.arange(10, 14) + 5 * 2**32
    direct = sample(
        make_model(sampler), sampler, shape=(4, *SHAPE), seeds=seeds, progress=False, device="cpu"
    )
    assert np.array_equal(a[10:14], direct.numpy())
    # shard layout of each run, and the index written at the end
    shards = sorted(p.name for p in two.glob("samples_*.npz"))
    assert shards[0] == "samples_00000000_00000005.npz" and len(shards) == 5
    index = json.loads((two / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == shards and index["num_samples"] == 23
    with np.load(two / shards[1]) as data:
        assert data["indices"].tolist() == list(range(5, 10))
        assert data["seeds"].tolist() == [5 * 2**32 + i for i in range(5, 10)]


def test_failure_on_one_rank_raises_on_every_rank_and_keeps_shards(tmp_path):
    out = tmp_path / "out"
    results = _spawn(tmp_path, out, batch_size=2, shard_size=4, fail_rank=1)
    for rank in (0, 1):
        assert results[rank].startswith("SampleManyError"), results[rank]
        assert "rank 1" in results[rank] and "simulated model failure" in results[rank]
        assert "rerun" in results[rank]
    # round 0: shards 0-3 (rank 0) and 4-7 (rank 1); round 1: 8-11 (rank 0), rank 1 fails
    kept = sorted(p.name for p in out.glob("samples_*.npz"))
    assert kept == [
        "samples_00000000_00000004.npz",
        "samples_00000004_00000008.npz",
        "samples_00000008_00000012.npz",
    ]
    assert not list(out.glob(".samples_*"))  # no temporary files left
    index = json.loads((out / INDEX).read_text())  # rank 0 indexed the shards of both rounds
    assert index["complete"] is False and [r["file"] for r in index["shards"]] == kept
    with pytest.raises(ValueError, match=r"incomplete: samples 12\.\.22 are missing"):
        load_samples(out)
    # resume in one process with another batch size: finishes, equal to a fresh run
    counting = CountingModel(make_model(_sampler()))
    result = _run(out, batch_size=5, model=counting)
    assert result.new_samples == 11 and counting.samples == 11 * STEPS
    fresh = tmp_path / "fresh"
    _run(fresh, batch_size=23)
    assert np.array_equal(load_samples(out), load_samples(fresh))


# -- one process ----------------------------------------------------------------------------------


def test_resume_after_deleting_a_shard(tmp_path):
    out = tmp_path / "out"
    _run(out, batch_size=4)
    before = load_samples(out)
    victim = out / "samples_00000008_00000012.npz"
    victim.unlink()
    untouched = {k: v for k, v in _snapshot(out).items() if k.startswith("samples_")}
    counting = CountingModel(make_model(_sampler()))
    with pytest.warns(UserWarning, match=rf"{victim.name}: it is missing"):
        result = _run(out, batch_size=3, shard_size=4, model=counting)
    assert result.new_samples == 4 and result.shards_written == 1
    assert counting.samples == 4 * STEPS  # only the missing samples were drawn
    after = _snapshot(out)
    for name, value in untouched.items():
        assert after[name] == value  # finished shards were not rewritten
    assert victim.exists()
    assert np.array_equal(load_samples(out), before)
    # nothing left to do: no model call at all
    counting = CountingModel(make_model(_sampler()))
    assert _run(out, model=counting).new_samples == 0 and counting.samples == 0


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_resume_after_an_interruption(tmp_path, exc):
    out = tmp_path / "out"
    failing = FailingModel(make_model(_sampler()), fail_at=2 * STEPS + 1, exc=exc)
    expected = SampleManyError if exc is RuntimeError else KeyboardInterrupt
    with pytest.raises(expected):
        _run(out, batch_size=4, model=failing)
    assert sorted(p.name for p in out.glob("samples_*.npz")) == [
        "samples_00000000_00000004.npz",
        "samples_00000004_00000008.npz",
    ]
    stale = out / ".samples_00000008_00000012.npz.tmp.12345"
    stale.write_bytes(b"half a shard")  # what a kill during a write leaves
    _run(out, batch_size=6, shard_size=6)
    assert not stale.exists()
    fresh = tmp_path / "fresh"
    _run(fresh, batch_size=23)
    assert np.array_equal(load_samples(out), load_samples(fresh))


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 6},
        {"model_id": "another-model"},
        {"sampler_name": "ddim"},
        {"shape": (2,)},
        {"dtype": torch.float64},
        {"num_samples": 8},
    ],
    ids=lambda c: next(iter(c)),
)
def test_folder_of_another_run_is_refused_untouched(tmp_path, change):
    out = tmp_path / "out"
    _run(out, num_samples=12, batch_size=4)
    (out / "samples_00000004_00000008.npz").unlink()  # an unfinished run
    before = _snapshot(out)
    cfg = dict(seed=5, model_id="test-gmm", sampler_name="ddpm", shape=SHAPE, num_samples=12)
    cfg["dtype"] = torch.float32
    cfg.update(change)
    sampler = _sampler(cfg["sampler_name"])
    with pytest.raises(ValueError, match="Nothing was changed"):
        sample_many(
            make_model(sampler),
            sampler,
            cfg["num_samples"],  # fewer than the folder's run: refused too
            cfg["shape"],
            out,
            4,
            seed=cfg["seed"],
            device="cpu",
            dtype=cfg["dtype"],
            model_id=cfg["model_id"],
            progress=False,
        )
    assert _snapshot(out) == before


def test_num_samples_may_grow(tmp_path):
    out = tmp_path / "out"
    _run(out, num_samples=10, batch_size=4)
    counting = CountingModel(make_model(_sampler()))
    result = _run(out, num_samples=17, batch_size=4, model=counting)
    assert result.new_samples == 7 and counting.samples == 7 * STEPS
    assert json.loads((out / MANIFEST).read_text())["num_samples"] == 17
    fresh = tmp_path / "fresh"
    _run(fresh, num_samples=17, batch_size=17)
    assert np.array_equal(load_samples(out), load_samples(fresh))


def test_unknown_shards_and_bad_folders_are_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "samples_00000000_00000004.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="no manifest.json"):
        _run(foreign)
    assert [p.name for p in foreign.iterdir()] == ["samples_00000000_00000004.npz"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        _run(a_file)
    with pytest.raises(ValueError, match="no manifest"):
        load_samples(tmp_path / "foreign")
    overlapping = tmp_path / "overlap"
    _run(overlapping, num_samples=8, batch_size=4)
    (overlapping / "samples_00000002_00000006.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="overlap"):
        _run(overlapping, num_samples=8, batch_size=4)


def test_bfloat16_samples_are_stored_as_float32(tmp_path):
    out = tmp_path / "out"
    _run(out, num_samples=5, batch_size=5, dtype=torch.bfloat16)
    x = load_samples(out)
    assert x.dtype == np.float32
    sampler = _sampler()
    from fastdiff.sampling import sample

    seeds = torch.arange(5) + 5 * 2**32
    direct = sample(
        make_model(sampler),
        sampler,
        shape=(5, *SHAPE),
        seeds=seeds,
        dtype=torch.bfloat16,
        progress=False,
        device="cpu",
    )
    assert np.array_equal(x, direct.float().numpy())


# -- data integrity: checksums, the lock, the manifest --------------------------------------------

VICTIM = "samples_00000004_00000008.npz"


def _rewrite_shard(path: Path, change) -> None:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    np.savez(path, **arrays)


def _corrupt(out: Path, how: str, tmp_path: Path) -> None:
    path = out / VICTIM
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "zero_bytes":
        path.write_bytes(bytes(len(data)))
    elif how == "one_sample_short":  # a consistent file of 3 samples under a 4-sample name
        _rewrite_shard(path, lambda a: a.update({k: v[:-1] for k, v in a.items()}))
    elif how == "zeroed_samples":
        _rewrite_shard(path, lambda a: a.update(samples=np.zeros_like(a["samples"])))
    elif how == "other_seed":  # the same shard of a seed-6 run
        _run(tmp_path / "seed6", num_samples=12, batch_size=4, seed=6)
        path.write_bytes((tmp_path / "seed6" / VICTIM).read_bytes())
    else:
        raise AssertionError(how)


CORRUPTIONS = [
    "truncated",
    "empty",
    "garbage",
    "zero_bytes",
    "one_sample_short",
    "zeroed_samples",
    "other_seed",
]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_bad_shard_is_named_by_load_samples_and_sampled_again_on_resume(tmp_path, how):
    out = tmp_path / "out"
    _run(out, num_samples=12, batch_size=4)
    before = load_samples(out)
    _corrupt(out, how, tmp_path)
    with pytest.raises(SampleManyError, match=rf"{VICTIM}: .*rerun sample_many"):
        load_samples(out)  # never rows of another run, never shifted rows
    counting = CountingModel(make_model(_sampler()))
    with pytest.warns(UserWarning, match=rf"1 bad shard\(s\) again:\n  {VICTIM}: "):
        result = _run(out, num_samples=12, batch_size=4, model=counting)
    assert len(result.regenerated) == 1 and result.regenerated[0].startswith(f"{VICTIM}: ")
    assert result.new_samples == 4 and counting.samples == 4 * STEPS  # that shard only
    assert np.array_equal(load_samples(out), before)


def test_a_shard_missing_from_the_index_is_sampled_again(tmp_path):
    # a run killed between writing a shard and indexing it
    out = tmp_path / "out"
    _run(out, num_samples=12, batch_size=4)
    index = json.loads((out / INDEX).read_text())
    index["shards"] = [r for r in index["shards"] if r["file"] != VICTIM]
    (out / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"incomplete: samples 4\.\.7 are missing"):
        load_samples(out)
    with pytest.warns(UserWarning, match=rf"{VICTIM}: it is not in index.json"):
        assert _run(out, num_samples=12, batch_size=4).new_samples == 4


def test_the_index_records_count_checksum_and_seed(tmp_path):
    out = tmp_path / "out"
    _run(out, num_samples=10, batch_size=4)
    index = json.loads((out / INDEX).read_text())
    assert index["complete"] is True and index["num_samples"] == 10
    assert [(r["start"], r["end"]) for r in index["shards"]] == [(0, 4), (4, 8), (8, 10)]
    for record in index["shards"]:
        with np.load(out / record["file"]) as data:
            samples = data["samples"]
        assert record["count"] == samples.shape[0] == record["end"] - record["start"]
        assert record["sha256"] == hashlib.sha256(samples.tobytes()).hexdigest()
        assert record["seed"] == 5


def test_a_folder_in_use_is_refused_at_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = rf"pid {os.getpid()} on host {re.escape(socket.gethostname())}, since "
    with folder_lock(out):  # another run holds the folder (another file descriptor)
        with pytest.raises(FolderInUseError, match=rf"{out} is in use by another .*{holder}"):
            _run(out, num_samples=4)
        assert os.listdir(out) == [LOCK]  # nothing was written
    assert os.listdir(out) == []  # released: the lock file is gone
    _run(out, num_samples=4)
    assert LOCK not in os.listdir(out)


def test_the_lock_is_held_for_the_whole_run(tmp_path):
    out = tmp_path / "out"
    inner = make_model(_sampler())
    seen = []

    def model(x, cond):  # what a second run sees while this one samples
        try:
            with folder_lock(out):
                seen.append("free")
        except FolderInUseError as err:
            seen.append(str(err))
        return inner(x, cond)

    _run(out, num_samples=8, batch_size=4, model=model)
    assert len(seen) == 2 * STEPS and all(f"pid {os.getpid()} " in m for m in seen)


def test_two_processes_cannot_share_a_folder(tmp_path):
    """A second process (``python -m fastdiff.sample_many``, the torchrun entry point) fails
    at once on a folder this process holds, naming it."""
    out = tmp_path / "out"
    out.mkdir()
    args = [sys.executable, "-m", "fastdiff.sample_many", "--model", "gmm", "--sampler", "ddim"]
    args += ["--steps", "3", "--num-samples", "3", "--shape", "2", "--backend", "reference"]
    args += ["--device", "cpu", "--no-progress", "--out", str(out)]
    with folder_lock(out):
        busy = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert busy.returncode == 1, busy.stderr
    assert f"in use by another sample_many run (pid {os.getpid()} on host" in busy.stderr
    assert os.listdir(out) == []


def test_the_backend_is_recorded_and_a_resume_on_another_is_refused(tmp_path):
    out = tmp_path / "out"
    _run(out, num_samples=4)
    assert json.loads((out / MANIFEST).read_text())["config"]["backend"] == "reference"
    before = _snapshot(out)
    triton = SAMPLERS["ddpm"](SCHEDULE, STEPS, backend="triton")
    with pytest.raises(ValueError, match='backend is "reference" there, "triton" in this call'):
        _run(out, num_samples=4, model=make_model(triton), sampler=triton)
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("num_samples", "abc", "num_samples must be an int >= 1, got 'abc'"),
        ("num_samples", True, "num_samples must be an int >= 1, got True"),
        ("config", [], r"config must be an object, got \[\]"),
        ("seed", "5", "config.seed must be an int >= 0, got '5'"),
        ("dtype", "int8", "config.dtype must be one of .*, got 'int8'"),
    ],
)
def test_a_malformed_manifest_names_the_field(tmp_path, field, value, error):
    out = tmp_path / "out"
    _run(out, num_samples=4)
    manifest = json.loads((out / MANIFEST).read_text())
    (manifest["config"] if field in ("seed", "dtype") else manifest)[field] = value
    (out / MANIFEST).write_text(json.dumps(manifest))
    before = _snapshot(out)
    with pytest.raises(ValueError, match=rf"manifest.json: {error}"):
        _run(out, num_samples=4)
    with pytest.raises(ValueError, match=rf"manifest.json: {error}"):
        load_samples(out)
    assert _snapshot(out) == before


def test_a_sampler_mismatch_shows_the_whole_difference(tmp_path):
    out = tmp_path / "out"
    _run(out, num_samples=4)
    old = json.loads((out / MANIFEST).read_text())["config"]["sampler"]
    other = SAMPLERS["ddpm"](SCHEDULE, STEPS + 1, backend="reference")
    with pytest.raises(ValueError) as info:
        _run(out, num_samples=4, model=make_model(other), sampler=other)
    message = str(info.value)
    new_steps = json.dumps(other.timesteps.tolist())
    assert f"sampler.num_steps is {STEPS} there, {STEPS + 1} in this call" in message
    assert f"sampler.timesteps is {json.dumps(old['timesteps'])} there, {new_steps}" in message
    assert f'sampler.table_sha256 is "{old["table_sha256"]}" there, "' in message
    assert "..." not in message


# -- models, arguments, command line ---------------------------------------------------------------


def test_model_resolution():
    sampler = _sampler()
    device, dtype = torch.device("cpu"), torch.float32
    model, model_id = resolve_model("gmm", sampler, device, dtype)
    assert model_id == "gmm" and model(torch.zeros(2, 2), torch.tensor([500, 500])).shape == (2, 2)
    model, model_id = resolve_model("test_sample_many:make_model", sampler, device, dtype)
    assert model_id == "test_sample_many:make_model" and callable(model)
    FACTORY_CALLS.clear()  # a spec's callable is called once, with the documented keywords
    model, model_id = resolve_model("test_sample_many:recording_factory", sampler, device, dtype)
    assert FACTORY_CALLS == [{"device": device, "dtype": dtype, "sampler": sampler}]
    assert model_id == "test_sample_many:recording_factory" and callable(model)
    # a callable is the model itself, never called to build one
    direct = make_model(sampler)
    assert resolve_model(direct, sampler, device, dtype)[0] is direct
    assert resolve_model(make_model, sampler, device, dtype) == (
        make_model,
        "test_sample_many.make_model",
    )
    module = torch.nn.Linear(3, 3)
    assert resolve_model(module, sampler, device, dtype) == (
        module,
        "torch.nn.modules.linear.Linear",
    )
    with pytest.raises(ValueError, match="does not import"):
        resolve_model("no_such_module_xyz:f", sampler, device, dtype)
    with pytest.raises(ValueError, match="module:callable"):
        resolve_model("just_a_name", sampler, device, dtype)
    with pytest.raises(TypeError, match="not a callable"):
        resolve_model("test_sample_many:SHAPE", sampler, device, dtype)
    with pytest.raises(TypeError, match="not a model"):
        resolve_model("test_sample_many:none_factory", sampler, device, dtype)
    with pytest.raises(TypeError, match=r"device=\.\.\., dtype=\.\.\., sampler=\.\.\..*kwargs"):
        resolve_model("test_sample_many:no_argument_factory", sampler, device, dtype)
    with pytest.raises(TypeError):
        resolve_model(42, sampler, device, dtype)


def test_model_that_fails_to_build_is_a_clear_error(tmp_path):
    with pytest.raises(
        SampleManyError, match="(?s)building the model failed on rank 0.*checkpoint"
    ):
        _run(tmp_path / "out", model="test_sample_many:failing_factory")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"batch_size": 0}, "batch_size"),
        ({"shard_size": -1}, "shard_size"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**31}, "seed"),
        ({"shape": (0, 2)}, "shape"),
        ({"shape": "3"}, "shape"),
        ({"guidance_rescale": 0.5}, "guidance_rescale"),
        ({"cuda_graph": True}, "cuda_graph=True needs a CUDA device"),
    ],
)
def test_argument_errors(tmp_path, kwargs, error):
    args = dict(num_samples=4, shape=SHAPE, batch_size=2, seed=0)
    args.update(kwargs)
    sampler = _sampler()
    with pytest.raises(ValueError, match=error):
        sample_many(
            make_model(sampler),
            sampler,
            args.pop("num_samples"),
            args.pop("shape"),
            tmp_path / "out",
            args.pop("batch_size"),
            args.pop("seed"),
            device="cpu",
            **args,
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError, match="sampler"):
        sample_many(make_model(sampler), object(), 4, SHAPE, tmp_path / "out", device="cpu")
    with pytest.raises(TypeError, match="dtype"):
        sample_many(make_model(sampler), sampler, 4, SHAPE, tmp_path, dtype=torch.int64)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    common = [
        "sample-many", "--model", "gmm", "--sampler", "euler_ancestral", "--steps", "5",
        "--shape", "2", "--backend", "reference", "--device", "cpu", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    assert fastdiff_main([*common, "--num-samples", "9", "--batch-size", "4"]) == 0
    assert "9 samples (9 new" in capsys.readouterr().out
    x = load_samples(out)
    assert x.shape == (9, 2) and np.isfinite(x).all()
    assert fastdiff_main([*common, "--num-samples", "9", "--seed", "1"]) == 2
    assert "another run" in capsys.readouterr().err
    assert (
        fastdiff_main([*common, "--num-samples", "3", "--shape", "3", "--out", str(tmp_path / "b")])
        == 1
    )
    assert "x must have shape" in capsys.readouterr().err
    assert os.listdir(out)  # untouched by the refused call


@pytest.mark.gpu
def test_gpu_eager_and_graphed_runs_agree(tmp_path):
    sampler = SAMPLERS["ddpm"](SCHEDULE, 20)
    model = make_model(sampler)
    kwargs = dict(seed=3, device="cuda", model_id="test-gmm", progress=False)
    sample_many(model, sampler, 300, SHAPE, tmp_path / "eager", 128, **kwargs)
    sample_many(model, sampler, 300, SHAPE, tmp_path / "graph", 100, cuda_graph=True, **kwargs)
    a, b = load_samples(tmp_path / "eager"), load_samples(tmp_path / "graph")
    assert a.shape == (300, *SHAPE) and np.isfinite(a).all()
    assert np.array_equal(a, b)
