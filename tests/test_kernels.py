"""Fused step kernels against the reference: every option, dtype and layout.

Each case builds the same sampler twice, once per backend, feeds both fresh random inputs
and the same explicit noise, and compares the kernel's output with the reference computed
in float64 from the same inputs (tolerances by dtype in conftest.py). On this CPU machine
the kernels run under the Triton interpreter; with a GPU the same tests run on the card.
"""

import inspect
import types
import warnings

import pytest
import torch
from conftest import TOLERANCES

import fastdiff.kernels.fused_step as fs
from fastdiff.kernels.fused_step import COLUMNS, fused_step
from fastdiff.philox import seeds_from
from fastdiff.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    EulerAncestralSampler,
    EulerSampler,
)
from fastdiff.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.create("linear", 1000)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

SAMPLER_CASES = {
    "ddpm": lambda **kw: DDPMSampler(SCHEDULE, 20, **kw),
    "ddpm_large": lambda **kw: DDPMSampler(SCHEDULE, 20, variance_type="fixed_large", **kw),
    "ddim": lambda **kw: DDIMSampler(SCHEDULE, 10, **kw),
    "ddim_eta": lambda **kw: DDIMSampler(
        SCHEDULE, 10, eta=0.7, use_clipped_model_output=True, **kw
    ),
    "euler": lambda **kw: EulerSampler(SCHEDULE, 10, **kw),
    "euler_a": lambda **kw: EulerAncestralSampler(SCHEDULE, 10, **kw),
    "dpmpp_2m": lambda **kw: DPMSolverPP2MSampler(SCHEDULE, 10, **kw),
}


def _pair(name, **kwargs):
    return SAMPLER_CASES[name](backend="triton", **kwargs), SAMPLER_CASES[name](
        backend="reference", **kwargs
    )


def _reference64(sampler, x, m, i, **kw):
    kw = {
        k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in kw.items()
    }
    out = sampler.step(x.double(), m.double(), i, **kw)
    return out.prev_sample, out.pred_original_sample


def _check(got, want, dtype):
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])


def _make(shape, dtype, layout, device):
    t = torch.randn(shape, device=device).to(dtype)
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" else t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(SAMPLER_CASES))
def test_step_matches_reference(name, layout, dtype, device):
    fused, ref = _pair(name)
    shape = (3, 5, 7, 9)  # not a multiple of any block
    x, m = _make(shape, dtype, layout, device), _make(shape, dtype, layout, device)
    noise = _make(shape, dtype, layout, device)
    x0_prev = _make(shape, dtype, layout, device)
    i = int(torch.randint(1, fused.num_steps, ()))
    kw = {"noise": noise, "x0_prev": x0_prev}
    out = fused.step(x, m, i, **kw)
    want_x, want_x0 = _reference64(ref, x, m, i, **kw)
    assert out.prev_sample.is_contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
    )
    _check(out.pred_original_sample, want_x0, dtype)
    _check(out.prev_sample, want_x, dtype)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("process", ["none", "clip", "threshold"])
@pytest.mark.parametrize("name", ["ddpm", "ddim_eta", "euler_a", "dpmpp_2m"])
def test_prediction_types_and_x0_processing(name, prediction_type, process, device):
    kw = {"prediction_type": prediction_type}
    if process == "clip":
        kw["clip_sample_range"] = 1.5
    elif process == "threshold":
        kw["thresholding"] = (0.9, 2.5)
    fused, ref = _pair(name, **kw)
    shape = (4, 3, 5, 11)
    x, m = torch.randn(shape, device=device) * 2, torch.randn(shape, device=device) * 2
    noise, x0_prev = torch.randn_like(x), torch.randn_like(x)
    for i in (0, fused.num_steps // 2, fused.num_steps - 1):  # first, middle and last step
        out = fused.step(x, m, i, noise=noise, x0_prev=x0_prev)
        want_x, want_x0 = _reference64(ref, x, m, i, noise=noise, x0_prev=x0_prev)
        _check(out.pred_original_sample, want_x0, torch.float32)
        _check(out.prev_sample, want_x, torch.float32)


@pytest.mark.parametrize(
    "variance_type", ["fixed_small_log", "fixed_large_log", "learned", "learned_range"]
)
@pytest.mark.parametrize("guided", [False, True])
def test_ddpm_variances_with_guidance(variance_type, guided, device):
    fused, ref = (
        DDPMSampler(SCHEDULE, 25, variance_type=variance_type, backend=b)
        for b in ("triton", "reference")
    )
    shape = (3, 2, 6, 5)
    channels = 4 if variance_type.startswith("learned") else 2
    x = torch.randn(shape, device=device)
    m = torch.randn((6 if guided else 3, channels, 6, 5), device=device)
    if variance_type == "learned":
        m[:, 2:] = torch.rand_like(m[:, 2:]) * -6  # log variances
    elif variance_type == "learned_range":
        m[:, 2:] = torch.rand_like(m[:, 2:]) * 2 - 1  # in [-1, 1]
    noise, grad = torch.randn_like(x), torch.randn_like(x)
    kw = {"noise": noise, "grad": grad}
    if guided:
        kw.update(guidance_scale=4.0, guidance_rescale=0.7)
    for i in (3, 24):
        out = fused.step(x, m, i, **kw)
        want_x, want_x0 = _reference64(ref, x, m, i, **kw)
        _check(out.pred_original_sample, want_x0, torch.float32)
        _check(out.prev_sample, want_x, torch.float32)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler_a"])
def test_guidance_fused(name, device):
    fused, ref = _pair(name)
    x = torch.randn(2, 3, 9, 9, device=device)
    m = torch.randn(4, 3, 9, 9, device=device)
    kw = {"noise": torch.randn_like(x), "x0_prev": torch.randn_like(x), "guidance_scale": 7.5}
    out = fused.step(x, m, 4, **kw)
    want_x, want_x0 = _reference64(ref, x, m, 4, **kw)
    _check(out.prev_sample, want_x, torch.float32)
    _check(out.pred_original_sample, want_x0, torch.float32)


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "dpmpp_2m"])
def test_per_sample_steps_and_device_step_index(name, device):
    fused, ref = _pair(name)
    x = torch.randn(5, 2, 3, 13, device=device)
    m, noise, x0_prev = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
    steps = torch.tensor([0, 3, fused.num_steps - 1, 3, 1], device=device)
    kw = {"noise": noise, "x0_prev": x0_prev}
    out = fused.step(x, m, steps, **kw)
    want_x, want_x0 = _reference64(ref, x, m, steps, **kw)
    _check(out.prev_sample, want_x, torch.float32)
    # a 0-d device step index gives the same as the python int
    same = fused.step(x, m, torch.tensor(3, device=device), **kw)
    torch.testing.assert_close(same.prev_sample, fused.step(x, m, 3, **kw).prev_sample)


def test_in_kernel_noise_matches_reference_stream(device):
    """seeds= draws the same Philox stream on both backends, and per sample."""
    fused, ref = _pair("ddpm")
    x = torch.randn(4, 3, 8, 8, device=device)
    m = torch.randn_like(x)
    seeds = seeds_from(11, 4, device)
    got = fused.step(x, m, 5, seeds=seeds).prev_sample
    want, _ = _reference64(ref, x, m, 5, seeds=seeds)
    _check(got, want, torch.float32)
    # a sample's result does not depend on its batch
    alone = fused.step(x[2:3], m[2:3], 5, seeds=seeds[2:3]).prev_sample
    torch.testing.assert_close(alone, got[2:3], rtol=0, atol=0)


def test_outputs_poisoned_before_launch_are_all_written(device):
    sampler = DDPMSampler(SCHEDULE, 10, backend="triton")
    on_device = sampler.device_tables(device)
    for shape in [(3, 5, 7, 9), (257, 2), (1, 4099)]:
        x = torch.randn(shape, device=device)
        out = torch.full_like(x, float("nan"))
        x0 = torch.full_like(x, float("nan"))
        fused_step(
            x,
            torch.randn_like(x),
            on_device["table"],
            on_device["rows"][2:3],
            noise=torch.randn_like(x),
            out=out,
            x0_out=x0,
        )
        assert torch.isfinite(out).all() and torch.isfinite(x0).all()


def test_kernel_errors(device):
    sampler = DDPMSampler(SCHEDULE, 10, backend="triton")
    on_device = sampler.device_tables(device)
    table, rows = on_device["table"], on_device["rows"][:1]
    x = torch.randn(2, 3, 4, 4, device=device)
    with pytest.raises(TypeError, match="float64"):
        fused_step(x.double(), x.double(), table, rows)
    with pytest.raises(ValueError, match="model_output has shape"):
        fused_step(x, x[:1], table, rows)
    with pytest.raises(ValueError, match="guidance doubles the batch"):
        fused_step(x, x, table, rows, guidance_scale=3.0)
    with pytest.raises(ValueError, match="laid out differently"):
        fused_step(x, x.to(memory_format=torch.channels_last), table, rows)
    with pytest.raises(ValueError, match="2x channels"):
        fused_step(x, x, table, rows, variance_mode="learned_range")
    with pytest.raises(ValueError, match="table must be float32"):
        fused_step(x, x, table.double(), rows)
    with pytest.raises(ValueError, match="rows must have"):
        fused_step(x, x, table, on_device["rows"][:3])
    with pytest.raises(TypeError, match="dtype"):
        fused_step(x, x.to(torch.int32), table, rows)
    with pytest.raises(ValueError, match="contiguous or channels_last"):
        fused_step(x.transpose(2, 3), x, table, rows)
    assert len(COLUMNS) == table.shape[1]


@pytest.mark.gpu
def test_cached_launch_matches_first_launch(device):
    """After the first call of a signature, fused_step launches the compiled kernel directly
    (the GPU-only path: the interpreter always binds). It must compute exactly what the
    first (bound, compiling) launch computed, also for views whose data pointers are not
    16-byte aligned (a different specialization)."""
    sampler = DDPMSampler(SCHEDULE, 10, backend="triton")
    ref = DDPMSampler(SCHEDULE, 10, backend="reference")
    on_device = sampler.device_tables(device)
    base = torch.randn(3 * 4 * 33 + 1, device=device)
    for offset in (0, 1):  # aligned, then a 4-byte-offset view
        x = base[offset : offset + 3 * 4 * 33].view(3, 4, 33)
        m, noise = torch.randn_like(x), torch.randn_like(x)
        first, _ = fused_step(x, m, on_device["table"], on_device["rows"][3:4], noise=noise)
        again, _ = fused_step(x, m, on_device["table"], on_device["rows"][3:4], noise=noise)
        assert torch.equal(first, again)
        want = ref.step(x.double(), m.double(), 3, noise=noise.double())
        torch.testing.assert_close(again.double(), want.prev_sample.double(), rtol=2e-5, atol=5e-5)


class _OtherLauncher:
    """A compiled kernel whose private launcher takes other arguments than fastdiff's."""

    def launch_metadata(self, grid, stream, *args):
        raise TypeError("launch_metadata() takes 3 positional arguments")


class _Always(dict):
    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def get(self, key, default=None):
        return self.kernel


def _one_step(device):
    on_device = DDPMSampler(SCHEDULE, 10, backend="triton").device_tables(device)
    g = torch.Generator().manual_seed(0)
    x, m, z = (torch.randn(2, 3, 5, 7, generator=g).to(device) for _ in range(3))
    return lambda: fused_step(x, m, on_device["table"], on_device["rows"][3:4], noise=z)[0]


def test_fast_launch_falls_back_once_with_a_warning(monkeypatch, device):
    """When Triton's private launcher rejects the call, the step warns once, binds as usual
    (the same result) and does not try the fast launch again."""
    monkeypatch.setitem(fs._FAST_LAUNCH, "enabled", True)
    monkeypatch.setattr(fs, "_LAUNCH_CONFIGS", {})
    if device.type != "cuda":  # no driver under the interpreter: a stand-in gives a stream
        stream = types.SimpleNamespace(get_current_stream=lambda index: 0)
        monkeypatch.setattr(fs.triton.runtime, "driver", types.SimpleNamespace(active=stream))
    step = _one_step(device)
    want = step()
    (config,) = fs._LAUNCH_CONFIGS.values()
    config.kernels = _Always(_OtherLauncher())
    with pytest.warns(RuntimeWarning, match="launcher did not take"):
        got = step()
    assert not fs._FAST_LAUNCH["enabled"]
    assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(step(), want)


class _Recorder:
    """A compiled kernel whose launcher records the arguments it is given."""

    function = packed_metadata = None

    def __init__(self):
        self.args = []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_x, grid_y, grid_z, stream, function, packed, metadata, enter, exit, *args):
        self.args.append(args)


def test_fast_launch_passes_every_argument_in_signature_order(monkeypatch, device):
    """The fast launch hands the launcher one value per kernel argument, in signature order:
    this call's tensors (not the first call's), the signature's constants, and None for the
    backward's pointers."""
    monkeypatch.setitem(fs._FAST_LAUNCH, "enabled", True)
    monkeypatch.setattr(fs, "_LAUNCH_CONFIGS", {})
    if device.type != "cuda":
        stream = types.SimpleNamespace(get_current_stream=lambda index: 0)
        monkeypatch.setattr(fs.triton.runtime, "driver", types.SimpleNamespace(active=stream))
    table = DDPMSampler(SCHEDULE, 10, backend="triton").device_tables(device)["table"]
    rows = torch.tensor([3], device=device)
    x, m, z, out = (torch.randn(2, 3, 5, 7, device=device) for _ in range(4))
    fused_step(x, m, table, rows, noise=z, out=out, write_x0=False)
    (config,) = fs._LAUNCH_CONFIGS.values()
    recorder = _Recorder()
    config.kernels = _Always(recorder)
    for _ in range(2):
        x, m, z, out = (torch.randn_like(x) for _ in range(4))
        fused_step(x, m, table, rows, noise=z, out=out, write_x0=False)
        args = dict(zip(fs._fused_step_kernel.arg_names, recorder.args[-1], strict=True))
        for name, want in (("x_ptr", x), ("m_ptr", m), ("noise_ptr", z), ("out_ptr", out)):
            assert args[name] is want, name
        assert args["table_ptr"] is table and args["rows_ptr"] is rows
        assert (args["N_COLS"], args["NOISE"], args["STD"]) == (len(COLUMNS), 1, True)
        assert (args["WRITE_OUT"], args["WRITE_X0"], args["BACKWARD"]) == (True, False, False)
        assert args["x_bstride"] == x.stride(0) and args["noise_bstride"] == z.stride(0)
        assert args["dx_ptr"] is None and args["gout_ptr"] is None
    assert len(recorder.args) == 2


class _HookRecorder(_Recorder):
    """A recorder that also records the metadata and hooks the launcher is given."""

    def __init__(self):
        super().__init__()
        self.metadata_calls = 0
        self.launches = []

    def launch_metadata(self, grid, stream, *args):
        self.metadata_calls += 1
        return "metadata"

    def run(self, grid_x, grid_y, grid_z, stream, function, packed, metadata, enter, exit, *args):
        self.launches.append((metadata, enter, exit))


class _Chain:
    """A stand-in for a later Triton's HookChain (its hooks in ``calls``)."""

    def __init__(self, *calls):
        self.calls = list(calls)

    def __call__(self, *args):  # the launcher calls a hook it is handed
        for call in self.calls:
            call(*args)


@pytest.mark.parametrize("hooks", ["none", "empty chain", "enter", "exit chain"])
def test_fast_launch_builds_metadata_only_for_an_enter_hook(hooks, monkeypatch, device):
    """Without launch hooks (None, or an empty chain) the fast launch skips Triton's
    launch_metadata and hands the launcher None for the metadata and both hooks, as
    Triton's launch would pass (or call to no effect); with an enter hook it builds the
    metadata and passes the hooks as set."""
    monkeypatch.setitem(fs._FAST_LAUNCH, "enabled", True)
    monkeypatch.setattr(fs, "_LAUNCH_CONFIGS", {})
    if device.type != "cuda":
        stream = types.SimpleNamespace(get_current_stream=lambda index: 0)
        monkeypatch.setattr(fs.triton.runtime, "driver", types.SimpleNamespace(active=stream))
    enter, leave = {
        "none": (None, None),
        "empty chain": (_Chain(), _Chain()),
        "enter": (print, None),
        "exit chain": (_Chain(), _Chain(print)),
    }[hooks]
    monkeypatch.setattr(fs.triton.knobs.runtime, "launch_enter_hook", enter)
    monkeypatch.setattr(fs.triton.knobs.runtime, "launch_exit_hook", leave)
    step = _one_step(device)
    step()
    (config,) = fs._LAUNCH_CONFIGS.values()
    recorder = _HookRecorder()
    config.kernels = _Always(recorder)
    step()
    ((metadata, got_enter, got_exit),) = recorder.launches
    if hooks == "enter":
        assert (recorder.metadata_calls, metadata, got_enter, got_exit) == (
            1,
            "metadata",
            print,
            None,
        )
    else:
        assert (recorder.metadata_calls, metadata, got_enter) == (0, None, None)
        assert got_exit is (leave if hooks == "exit chain" else None)


@pytest.mark.gpu
def test_fast_launch_is_taken_after_the_first_call(monkeypatch, device):
    """On a GPU the second call of a signature goes through the compiled kernel's launcher."""
    monkeypatch.setattr(fs, "_LAUNCH_CONFIGS", {})
    taken = []
    fast = fs._fast_launch
    monkeypatch.setattr(fs, "_fast_launch", lambda *args: taken.append(fast(*args)) or taken[-1])
    step = _one_step(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first, second = step(), step()
    assert taken == [True]
    assert torch.equal(first, second)


def test_step_config_is_fused_step_checked_once(device):
    """``step_config`` checks as ``fused_step`` does (the same errors) and
    ``step_with_config`` launches what ``fused_step`` launches, bit for bit."""
    on_device = DDPMSampler(SCHEDULE, 10, backend="triton").device_tables(device)
    table, rows = on_device["table"], on_device["rows"][3:4]
    g = torch.Generator().manual_seed(0)
    x, m, z = (torch.randn(2, 3, 5, 7, generator=g).to(device) for _ in range(3))
    want = fused_step(x, m, table, rows, noise=z, clip_range=1.0)
    config = fs.step_config(x, m, table, rows, noise=z, clip_range=1.0)
    got = fs.step_with_config(config, x, m, table, rows, noise=z, clip_range=1.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="noise has shape"):
        fs.step_config(x, m, table, rows, noise=z[:1], clip_range=1.0)
    with pytest.raises(ValueError, match="noise has shape"):
        fused_step(x, m, table, rows, noise=z[:1], clip_range=1.0)


def test_step_config_takes_fused_steps_options(device):
    """``step_config`` takes every keyword option of ``fused_step`` (the launch-only ones
    too, which do not change the configuration) and refuses any other name."""
    on_device = DDPMSampler(SCHEDULE, 10, backend="triton").device_tables(device)
    table, rows = on_device["table"], on_device["rows"][3:4]
    x, m = (torch.randn(2, 3, 5, 7, device=device) for _ in range(2))
    defaults = {
        name: p.default
        for name, p in inspect.signature(fused_step).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }
    assert len(defaults) == 16  # advance included (a launch-only option)
    base = fs.step_config(x, m, table, rows)
    assert fs.step_config(x, m, table, rows, **defaults) is base
    launch_only = {"guidance_rescale": 0.5, "write_x0": False}
    assert fs.step_config(x, m, table, rows, **launch_only) is base
    assert fs.step_config(x, m, table, rows, clip_range=1.0) is not base
    with pytest.raises(TypeError, match="clip_sample"):
        fs.step_config(x, m, table, rows, clip_sample=1.0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_step_into_static_buffers_in_place(backend, device):
    """out= may alias x and x0_out= may alias x0_prev (how a CUDA-graph loop keeps state)."""
    sampler = DPMSolverPP2MSampler(SCHEDULE, 10, backend=backend)
    x = torch.randn(2, 3, 5, 7, device=device)
    m, x0_prev = torch.randn_like(x), torch.randn_like(x)
    want = sampler.step(x, m, 4, x0_prev=x0_prev)
    x_buf, x0_buf = x.clone(), x0_prev.clone()
    got = sampler.step(x_buf, m, 4, x0_prev=x0_buf, out=x_buf, x0_out=x0_buf)
    assert got.prev_sample.data_ptr() == x_buf.data_ptr()
    assert got.pred_original_sample.data_ptr() == x0_buf.data_ptr()
    torch.testing.assert_close(x_buf, want.prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(x0_buf, want.pred_original_sample, rtol=0, atol=0)


@pytest.mark.parametrize("i", [3, 9])
def test_multistep_without_previous_x0_is_first_order(i, device):
    """A chain that starts mid-plan (img2img) has no x0_prev: both backends take the
    first-order step, which equals DDIM eta=0 (Lu et al. 2022: DPM-Solver++(1) = DDIM)."""
    fused, ref = _pair("dpmpp_2m")
    ddim = DDIMSampler(SCHEDULE, 10, backend="reference")
    x, m = torch.randn(2, 3, 6, 6, device=device), torch.randn(2, 3, 6, 6, device=device)
    got = fused.step(x, m, i).prev_sample
    want, _ = _reference64(ref, x, m, i)
    _check(got, want, torch.float32)
    want_ddim, _ = _reference64(ddim, x, m, i)
    torch.testing.assert_close(want, want_ddim, rtol=1e-10, atol=1e-10)


# -- the history ring without corrector (DPM-Solver++ 3M) ---------------------------------

_CORRECTOR_COLUMNS = ("uc_x", "uc_last", "uc_new", *(f"uc_h{j}" for j in range(4)), "up_last")


def _third_order_rows(sde: bool):
    """A DPM++ 3M plan of 8 steps (``FusedDPMSolverMultistepScheduler``'s host tables, VP,
    v prediction) with its corrector columns made NaN: a kernel that reads one gives NaN."""
    pytest.importorskip("diffusers")
    from fastdiff.diffusers import FusedDPMSolverMultistepScheduler
    from fastdiff.kernels.fused_step import UNIPC_COLUMNS

    algorithm = "sde-dpmsolver++" if sde else "dpmsolver++"
    f = FusedDPMSolverMultistepScheduler(
        solver_order=3, algorithm_type=algorithm, prediction_type="v_prediction"
    )
    f.set_timesteps(8)
    host = f._build("v_prediction", True, 3, sde)
    table = host["history_table"].clone()
    for name in _CORRECTOR_COLUMNS:
        table[:, UNIPC_COLUMNS.index(name)] = float("nan")
    return host, table, 8


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("phase", [0, 1, 2])
@pytest.mark.parametrize("sde", [False, True], ids=["ode", "sde"])
def test_history_ring_without_corrector_matches_reference(sde, phase, layout, dtype, device):
    """The history switch without corrector (``last_sample`` of no slots): per sample a row of
    another order (3, 2, 1) and ring slot, in a phase block; against
    ``reference.dpmpp_multistep_step`` on the slots it reads. Outputs and written slots
    poisoned with NaN, the corrector columns NaN (not read); the slots read are left as
    they were and nothing but x_next and the row's slot is written."""
    from fastdiff import reference

    host, table, n = _third_order_rows(sde)
    block = len(host["order"])
    steps = [(5, 0), (1, 2 * n + 2), (3, n + 1)]  # (k, block offset): orders 3, 2, 1
    rows = torch.tensor([phase * block + offset + k for k, offset in steps], device=device)
    assert [int(host["order"][offset + k]) for k, offset in steps] == [3, 2, 1]
    shape = (3, 5, 7, 9)  # not a multiple of any block
    x, m = _make(shape, dtype, layout, device), _make(shape, dtype, layout, device)
    z = _make(shape, dtype, layout, device) if sde else None
    flat = torch.randn((3 * shape[0], *shape[1:])).to(device=device, dtype=dtype)
    if layout == "channels_last":
        flat = flat.contiguous(memory_format=torch.channels_last)
    ring = flat.view(3, *shape)
    written = [(k + phase) % 3 for k, _ in steps]
    for b, slot in enumerate(written):
        ring[slot, b] = float("nan")  # written by the step, never read
    ring_in = ring.clone()
    out = torch.full_like(x, float("nan"))
    last = ring.new_empty((0, *shape))
    x_next, x0 = fused_step(
        x,
        m,
        table.to(device),
        rows,
        noise=z,
        out=out,
        write_x0=False,
        history=ring,
        last_sample=last,
    )
    assert x_next is out and x0 is None
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    for b, (k, offset) in enumerate(steps):
        row = offset + k
        order = int(host["order"][row])
        levels = [float(host[name][row]) for name in ("ab", "ab_next", "ab_prev", "ab_prev2")]
        prevs = [ring_in[(k - lag + phase) % 3, b].double() for lag in (1, 2)]
        want_next, want_x0 = reference.dpmpp_multistep_step(
            x[b].double(),
            m[b].double(),
            *levels[:2],
            history=list(zip(prevs, levels[2:]))[: order - 1],
            prediction_type="v_prediction",
            sde=sde,
            noise=None if z is None else z[b].double(),
        )
        for got, want in ((out[b], want_next), (ring[written[b], b], want_x0)):
            _check(got, want, dtype)
        for j in range(3):
            if j != written[b]:
                assert torch.equal(ring[j, b], ring_in[j, b]), (b, j)  # NaN-free: read only


def test_history_ring_without_corrector_rejects_bad_state(device):
    """A last sample of no slots must still be shaped like the ring's samples."""
    host, table, _ = _third_order_rows(False)
    x = torch.randn(2, 3, device=device)
    ring = torch.zeros(3, 2, 3, device=device)
    rows = torch.zeros(1, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="no slots"):
        fused_step(x, x, table.to(device), rows, history=ring, last_sample=ring[:0, :1])
    with pytest.raises(ValueError, match="last_sample has 1 slots, expected 2 \\(or 0"):
        fused_step(x, x, table.to(device), rows, history=ring, last_sample=ring[:1])
