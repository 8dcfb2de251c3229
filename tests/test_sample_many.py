"""fastdiff.sample_many: sharded, resumable sampling over processes (CPU, gloo).

Every sample is seeded by its index, and every op of the loop is row-wise (see
test_sampling.py), so runs with different process counts, batch sizes and shard sizes must
give bitwise the same samples: comparisons are exact. Multi-process runs are spawned with
torch.multiprocessing (gloo over a file store) and joined with a deadline, so a hang fails
the test instead of stalling the suite.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fastdiff.gmm import GaussianMixture
from fastdiff.sample_many import (
    MANIFEST,
    SampleManyError,
    builtin_gmm,
    load_samples,
    main,
    resolve_model,
    sample_many,
)
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


def make_model(sampler):
    """A factory (importable by spawned workers): the mixture's exact denoiser."""
    return _mixture().denoiser(sampler.schedule, sampler.prediction_type)


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


def _run(out_dir, num_samples=23, batch_size=4, model=None, **kwargs):
    sampler = _sampler(kwargs.pop("sampler_name", "ddpm"))
    model = model if model is not None else make_model(sampler)
    kwargs.setdefault("model_id", "test-gmm")
    kwargs.setdefault("progress", False)
    return sample_many(
        model, sampler, num_samples, SHAPE, out_dir, batch_size, seed=5, device="cpu", **kwargs
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
    assert not (out / "index.json").exists()
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


# -- models, arguments, command line ---------------------------------------------------------------


def test_model_resolution():
    sampler = _sampler()
    device, dtype = torch.device("cpu"), torch.float32
    model, model_id = resolve_model("gmm", sampler, device, dtype)
    assert model_id == "gmm" and model(torch.zeros(2, 2), torch.tensor([500, 500])).shape == (2, 2)
    model, model_id = resolve_model("test_sample_many:make_model", sampler, device, dtype)
    assert model_id == "test_sample_many:make_model" and callable(model)
    seen = {}

    def factory(device, dtype):
        seen.update(device=device, dtype=dtype)
        return make_model(sampler)

    model, model_id = resolve_model(factory, sampler, device, dtype)
    assert seen == {"device": device, "dtype": dtype} and model_id.endswith("factory")
    partial = functools.partial(make_model, sampler)
    assert resolve_model(partial, sampler, device, dtype)[1].endswith("make_model")
    direct = make_model(sampler)
    assert resolve_model(direct, sampler, device, dtype)[0] is direct  # model(x, cond) as is
    module = torch.nn.Linear(3, 3)
    assert resolve_model(module, sampler, device, dtype)[0] is module
    with pytest.raises(ValueError, match="does not import"):
        resolve_model("no_such_module_xyz:f", sampler, device, dtype)
    with pytest.raises(ValueError, match="module:callable"):
        resolve_model("just_a_name", sampler, device, dtype)
    with pytest.raises(TypeError, match="not a model"):
        resolve_model(lambda: 3, sampler, device, dtype)
    with pytest.raises(TypeError):
        resolve_model(42, sampler, device, dtype)
    assert callable(builtin_gmm(sampler))


def test_model_that_fails_to_build_is_a_clear_error(tmp_path):
    def factory():
        raise OSError("checkpoint not found")

    with pytest.raises(
        SampleManyError, match="(?s)building the model failed on rank 0.*checkpoint"
    ):
        _run(tmp_path / "out", model=factory)


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
        "--model", "gmm", "--sampler", "euler_ancestral", "--steps", "5", "--shape", "2",
        "--backend", "reference", "--device", "cpu", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert main([*common, "--num-samples", "9", "--batch-size", "4"]) == 0
    assert "9 samples (9 new" in capsys.readouterr().out
    x = load_samples(out)
    assert x.shape == (9, 2) and np.isfinite(x).all()
    assert main([*common, "--num-samples", "9", "--seed", "1"]) == 2
    assert "another run" in capsys.readouterr().err
    assert main([*common, "--num-samples", "3", "--shape", "3", "--out", str(tmp_path / "b")]) == 1
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
