"""FusedLCMScheduler / FusedTCDScheduler: the consistency step's reference against the paper
formulas, the kernel against the reference, and the drop-ins against diffusers' LCMScheduler
and TCDScheduler step by step (random configs, both backends, the same generator seeds), in
pipelines, and on the card (no host sync, CUDA-graph capture).

Tolerances: as test_diffusers_adapter.py (diffusers chains float32 operations, the fused step
folds them into float64 coefficients rounded once to float32): rtol 1e-4, atol 1e-4 times the
largest value the loop has read or written so far.
"""

from __future__ import annotations

import inspect
import json
import math
import random

import pytest
import torch
from conftest import TOLERANCES
from graph_fakes import EagerRuntime

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    TCDScheduler,
    UNet2DConditionModel,
)
from diffusers_cases import BACKENDS, DEVICE  # noqa: E402

import fastdiff.diffusers._base as base  # noqa: E402
from fastdiff import capture, reference, tables  # noqa: E402
from fastdiff.diffusers import (  # noqa: E402
    FusedLCMScheduler,
    FusedTCDScheduler,
    capture_denoising_loop,
)
from fastdiff.kernels.fused_step import fused_step  # noqa: E402
from fastdiff.reference import consistency_step, renoise  # noqa: E402

PAIRS = {"lcm": (LCMScheduler, FusedLCMScheduler), "tcd": (TCDScheduler, FusedTCDScheduler)}
SHAPE = (2, 3, 5, 7)  # odd spatial sizes: not a multiple of any block
PREDICTIONS = ["epsilon", "v_prediction", "sample"]


@pytest.fixture
def seed():
    return random.randrange(2**31)


def close(got, want, what: str, scale: float = 0.0) -> None:
    """float32 comparison relative to the largest value seen so far (module docstring)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != diffusers' {want.dtype}"
    scale = max(1.0, scale, want.abs().max().item())
    torch.testing.assert_close(
        got, want, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{what}: {m}"
    )


# -- the reference against the paper formulas (float64) -------------------------------------


def _ab(t: int) -> float:
    return float(LCMScheduler().alphas_cumprod.double()[t])


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_reference_lcm_is_the_consistency_function_then_forward_noise(prediction_type):
    g = torch.Generator().manual_seed(0)
    x, m, z = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ab_t, ab_next = _ab(759), _ab(499)
    u = 759 * 10.0
    c_skip, c_out = 0.25 / (u**2 + 0.25), u / math.sqrt(u**2 + 0.25)
    x0 = reference.predict_x0(x, m, ab_t, prediction_type)
    y_want = c_skip * x + c_out * x0  # Luo et al. 2023 eq. 9
    x_want = math.sqrt(ab_next) * y_want + math.sqrt(1 - ab_next) * z  # Alg. 1
    x_next, y = consistency_step(
        x, m, ab_t, 1.0, ab_next, c_skip=c_skip, c_out=c_out, prediction_type=prediction_type,
        noise=z,
    )  # fmt: skip
    torch.testing.assert_close(y, y_want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_next, x_want, rtol=1e-12, atol=1e-12)
    # no noise on a row with ab_next = ab_s: x' = y
    x_last, y_last = consistency_step(x, m, ab_t, 1.0, 1.0, c_skip=c_skip, c_out=c_out,
                                      prediction_type=prediction_type)  # fmt: skip
    torch.testing.assert_close(x_last, y_last, rtol=0, atol=0)
    torch.testing.assert_close(renoise(y, 1.0, ab_next, z), x_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_reference_tcd_without_gamma_is_ddim_and_with_gamma_goes_through_s(prediction_type):
    g = torch.Generator().manual_seed(1)
    x, m, z = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ab_t, ab_next = _ab(999), _ab(499)
    # gamma = 0: s = t_next, the step is deterministic DDIM (Song et al. 2021 eq. 12, eta 0)
    x_next, y = consistency_step(x, m, ab_t, ab_next, ab_next, prediction_type=prediction_type)
    ddim, _ = reference.ddim_step(x, m, ab_t, ab_next, prediction_type=prediction_type)
    torch.testing.assert_close(x_next, ddim, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, ddim, rtol=1e-12, atol=1e-12)
    # gamma = 0.3: DDIM to s = floor(0.7 t_next), then q(x_t' | x_s) (Zheng et al. 2024 SSS)
    ab_s = _ab(349)
    x_s, _ = reference.ddim_step(x, m, ab_t, ab_s, prediction_type=prediction_type)
    want = math.sqrt(ab_next / ab_s) * x_s + math.sqrt(1 - ab_next / ab_s) * z
    x_next, y = consistency_step(x, m, ab_t, ab_s, ab_next, prediction_type=prediction_type,
                                 noise=z)  # fmt: skip
    torch.testing.assert_close(y, x_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_next, want, rtol=1e-12, atol=1e-12)


# -- the kernel against the reference ---------------------------------------------------------


def _schedule_rows(n: int, g: torch.Generator):
    """Random but valid per-row values: ab_t < ab_s <= ab_next... and LCM/TCD scalings."""
    ab = torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.05
    ab_s = torch.where(torch.arange(n) % 2 == 0, 1.0, ab + (1 - ab) * 0.5)
    ab_next = ab + (ab_s - ab) * torch.rand(n, generator=g, dtype=torch.float64)
    ab_next[-1] = ab_s[-1]  # a row that adds no noise
    c_skip = torch.where(ab_s == 1.0, torch.rand(n, generator=g, dtype=torch.float64) * 0.1, 0.0)
    c_out = torch.where(ab_s == 1.0, 1 - c_skip, 1.0)
    return ab, ab_s, ab_next, c_skip, c_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 257), (1, 4099)])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_kernel_matches_reference(prediction_type, shape, dtype, device):
    g = torch.Generator().manual_seed(hash((prediction_type, shape, str(dtype))) % 2**31)
    n = 5
    values = _schedule_rows(n, g)
    table, none = tables.consistency_tables(*values, prediction_type)
    assert none is None
    table = table.float().to(device)
    batch = shape[0]
    rows = torch.randint(0, n, (batch,), generator=g).to(device)  # per-sample rows
    x, m, z = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    y_out = torch.full_like(x, float("nan"))
    fused_step(x, m, table, rows, noise=z, out=out, x0_out=y_out)
    per_row = [v[rows.cpu()] for v in values]
    want, y_want = consistency_step(
        x.double(), m.double(), *per_row[:3], c_skip=per_row[3], c_out=per_row[4],
        prediction_type=prediction_type, noise=z.double(),
    )  # fmt: skip
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(y_out.double(), y_want, **tol)


@pytest.mark.parametrize("processing", [{"clip_range": 0.7}, {"thresholding": (0.9, 1.3)}])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_processed_tables_two_launches_match_reference(prediction_type, processing, device):
    g = torch.Generator().manual_seed(7)
    n = 4
    ab, _, _, _, _ = _schedule_rows(n, g)
    ones = torch.ones(n, dtype=torch.float64)
    ab_next = torch.cat([ab[1:] * 0 + 0.9, ones[:1]])
    c_skip = torch.rand(n, generator=g, dtype=torch.float64) * 0.2
    c_out = 1 - c_skip
    denoise, renoised = tables.consistency_tables(
        ab, ones, ab_next, c_skip, c_out, prediction_type, processed=True
    )
    shape = (3, 2, 9, 11)
    x, m, z = (torch.randn(shape, generator=g).to(device) * 2 for _ in range(3))
    for row in range(n):
        rows = torch.tensor([row], device=device)
        y, _ = fused_step(x, m, denoise.float().to(device), rows, write_x0=False, **processing)
        got, _ = fused_step(y, y, renoised.float().to(device), rows, noise=z, write_x0=False)
        want, y_want = consistency_step(
            x.double(), m.double(), ab[row].item(), 1.0, ab_next[row].item(),
            c_skip=c_skip[row].item(), c_out=c_out[row].item(), prediction_type=prediction_type,
            noise=z.double(), **processing,
        )  # fmt: skip
        torch.testing.assert_close(y.double(), y_want, **TOLERANCES[torch.float32])
        torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])


# -- the drop-ins against diffusers -------------------------------------------------------------


def random_case(name: str, rng: random.Random) -> dict:
    """A config, set_timesteps arguments and step arguments over what the drop-ins support."""
    prediction_type = rng.choice(PREDICTIONS)
    config = {
        "beta_schedule": rng.choice(["scaled_linear", "linear", "squaredcos_cap_v2"]),
        "prediction_type": prediction_type,
        "set_alpha_to_one": rng.random() < 0.5,
        "timestep_scaling": rng.choice([10.0, 1.0, 0.05, 0.0]),
        "original_inference_steps": rng.choice([50, 25, 100]),
        # zero terminal SNR only with v-prediction (epsilon divides by sqrt(alpha_bar) = 0)
        "rescale_betas_zero_snr": prediction_type == "v_prediction" and rng.random() < 0.5,
    }
    if name == "lcm":
        processing = rng.choice(["none", "none", "clip", "threshold"])
        config["clip_sample"] = processing == "clip"
        config["clip_sample_range"] = rng.choice([0.5, 1.0, 2.0])
        config["thresholding"] = processing == "threshold"
        config["dynamic_thresholding_ratio"] = rng.choice([0.9, 0.995])
        config["sample_max_value"] = rng.choice([1.0, 1.5])
    original = config["original_inference_steps"]
    strength = rng.choice([1.0, 1.0, 0.6])
    set_args: dict = {"strength": strength}
    if rng.random() < 0.3:
        set_args["original_inference_steps"] = rng.choice([20, 40])
        original = set_args["original_inference_steps"]
    if rng.random() < 0.35:  # a custom plan, as few-step pipelines pass it
        k = rng.randint(1, 6)
        plan = sorted(rng.sample(range(0, 1000), k), reverse=True)
        if rng.random() < 0.5:
            plan[0] = 999
        set_args["timesteps"] = plan
    else:
        set_args["num_inference_steps"] = rng.randint(1, min(8, int(original * strength)))
    step = {}
    if name == "tcd":
        step["eta"] = rng.choice([0.0, 0.3, 1.0, round(rng.random(), 3)])
    return {"config": config, "set": set_args, "step": step}


def run_pair(name, case, backend, seed, *, global_rng=False, fused_kwargs=None):
    """The diffusers scheduler and the fused one side by side; every output compared."""
    d_cls, f_cls = PAIRS[name]
    d = d_cls(**case["config"])
    f = f_cls.from_config(d.config, backend=backend, **(fused_kwargs or {}))
    d.set_timesteps(**case["set"], device=DEVICE)
    f.set_timesteps(**case["set"], device=DEVICE)
    assert torch.equal(d.timesteps, f.timesteps) and d.timesteps.device == f.timesteps.device
    assert d.num_inference_steps == f.num_inference_steps
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen).to(DEVICE)
    xd, xf = x.clone(), x.clone()
    gen_d = torch.Generator().manual_seed(seed + 1)
    gen_f = torch.Generator().manual_seed(seed + 1)
    scale = 0.0
    for k, t in enumerate(d.timesteps):
        m = torch.randn(SHAPE, generator=gen).to(DEVICE)
        kw = dict(case["step"])
        if global_rng:
            torch.manual_seed(seed + k)
            out_d = d.step(m, t, xd, **kw)
            after_d = torch.randn(3)
            torch.manual_seed(seed + k)
            out_f = f.step(m, f.timesteps[k], xf, **kw)
            assert torch.equal(torch.randn(3), after_d), "the global RNG is left elsewhere"
        else:
            out_d = d.step(m, t, xd, generator=gen_d, **kw)
            out_f = f.step(m, t, xf, generator=gen_f, **kw)
        what = f"{name}[{backend}] step {k} (t={int(t)}), seed={seed}, case={case}"
        assert type(out_f) is type(out_d)
        assert list(out_f.keys()) == list(out_d.keys())
        scale = max(scale, xd.abs().max().item(), *(o.abs().max().item() for o in out_d.values()))
        for field in out_d.keys():
            close(out_f[field], out_d[field], f"{field} of {what}", scale)
        assert f.step_index == d.step_index
        xd, xf = out_d.prev_sample, out_f.prev_sample
    return d, f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("draw", range(6))
def test_random_configs_match_diffusers(name, backend, draw, seed):
    run_pair(name, random_case(name, random.Random(seed)), backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_global_rng_noise_matches_diffusers(name, backend, seed):
    case = {"config": {}, "set": {"num_inference_steps": 4}, "step": {}}
    run_pair(name, case, backend, seed, global_rng=True)


@pytest.mark.parametrize("name", list(PAIRS))
def test_clip_and_threshold_of_the_processed_path(name, seed):
    """LCM processes x0 before c_out (two launches); TCD ignores the options, as diffusers."""
    for options in ({"clip_sample": True, "clip_sample_range": 0.3}, {"thresholding": True}):
        case = {"config": options, "set": {"num_inference_steps": 3}, "step": {}}
        for backend in BACKENDS:
            run_pair(name, case, backend, seed)


@pytest.mark.parametrize("name", list(PAIRS))
def test_half_precision_steps(name, seed):
    """16-bit inputs: diffusers' dtypes (its noise too: drawn in the output dtype); values as
    diffusers computes them in float32 (its own 16-bit arithmetic rounds x0 = (x - sqrt(1 -
    ab) m) / sqrt(ab) at each operation), to the output dtype's rounding: the prediction of a
    noisy first step, and the next sample of a one-step plan (no noise)."""
    d_cls, f_cls = PAIRS[name]
    d, f = d_cls(), f_cls(backend="triton")
    g = torch.Generator().manual_seed(seed)
    for dtype in (torch.float16, torch.bfloat16):
        for sample_dtype in (dtype, torch.float32):
            x = torch.randn(SHAPE, generator=g).to(DEVICE, sample_dtype)
            m = torch.randn(SHAPE, generator=g).to(DEVICE, dtype)
            for steps in (3, 1):
                outs = []
                for s, args in ((d, (m, x)), (d, (m.float(), x.float())), (f, (m, x))):
                    s.set_timesteps(steps)
                    outs.append(s.step(args[0], s.timesteps[0], args[1],
                                       generator=torch.Generator().manual_seed(1)))  # fmt: skip
                half, want, got = outs
                for field in want.keys():
                    assert got[field].dtype == half[field].dtype
                    if steps == 3 and field == "prev_sample":
                        continue
                    tol = TOLERANCES[got[field].dtype]
                    scale = max(1.0, want[field].abs().max().item())
                    torch.testing.assert_close(
                        got[field].float(), want[field], rtol=tol["rtol"], atol=tol["atol"] * scale
                    )


def test_channels_last(seed):
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(2, 4, 5, 6, generator=g)
        .to(DEVICE)
        .contiguous(memory_format=torch.channels_last)
    )
    m = torch.randn(2, 4, 5, 6, generator=g).to(DEVICE)
    for backend in BACKENDS:
        d, f = LCMScheduler(), FusedLCMScheduler(backend=backend)
        for s in (d, f):
            s.set_timesteps(2)
        gen = [torch.Generator().manual_seed(3) for _ in range(2)]
        out_d = d.step(m, d.timesteps[0], x, generator=gen[0])
        out_f = f.step(m, f.timesteps[0], x, generator=gen[1])
        close(out_f.prev_sample, out_d.prev_sample, "channels_last")


@pytest.fixture
def device_timesteps(monkeypatch):
    """Every timestep tensor treated as a device tensor; any tensor-to-python read fails."""
    monkeypatch.setattr(base, "on_host", lambda t: False)

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if forbid.active:
                raise AssertionError(f"host sync: Tensor.{name} called inside step")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    forbid.active = False
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        forbid(name)
    return forbid


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_device_timesteps_no_host_reads(name, backend, device_timesteps, seed):
    d_cls, f_cls = PAIRS[name]
    d, f = d_cls(prediction_type="v_prediction"), f_cls(prediction_type="v_prediction")
    f.backend = backend
    for s in (d, f):
        s.set_timesteps(4, device=DEVICE)
    zeros = torch.zeros(SHAPE, device=DEVICE)
    f.step(zeros, f.timesteps[0], zeros)  # build the tables once
    f.set_timesteps(4, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    xd = xf = torch.randn(SHAPE, generator=g).to(DEVICE)
    gd, gf = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    scale = 0.0
    for k, t in enumerate(d.timesteps):
        m = torch.randn(SHAPE, generator=g).to(DEVICE)
        scale = max(scale, xd.abs().max().item())
        xd = d.step(m, t, xd, generator=gd).prev_sample
        device_timesteps.active = True
        try:
            xf = f.step(m, t.clone(), xf, generator=gf).prev_sample
        finally:
            device_timesteps.active = False
        assert isinstance(f.step_index, torch.Tensor)
        close(xf, xd, f"{name} step {k}", scale)


def test_philox_noise_same_on_both_backends_and_reproducible(seed):
    for name in PAIRS:
        results = []
        for backend in ("triton", "reference", "triton"):
            f = PAIRS[name][1](backend=backend, noise="philox")
            torch.manual_seed(seed)
            f.set_timesteps(4)
            x = torch.ones(SHAPE, device=DEVICE)
            for t in f.timesteps:
                x = f.step(torch.zeros_like(x), t, x).prev_sample
            results.append(x)
        torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
        assert torch.equal(results[0], results[2])


# -- contract: config, plans, outputs, errors -------------------------------------------------


@pytest.mark.parametrize("name", list(PAIRS))
def test_signatures_match_diffusers(name):
    d_cls, f_cls = PAIRS[name]
    for method in ("step", "set_timesteps"):
        want = list(inspect.signature(getattr(d_cls, method)).parameters)
        assert list(inspect.signature(getattr(f_cls, method)).parameters) == want, method
    init = list(inspect.signature(f_cls.__init__).parameters)
    assert init == [*inspect.signature(d_cls.__init__).parameters, "backend", "noise"]


@pytest.mark.parametrize("name", list(PAIRS))
def test_config_roundtrip_and_from_config(name, tmp_path):
    d_cls, f_cls = PAIRS[name]
    f = f_cls(timestep_scaling=5.0, original_inference_steps=40, backend="reference")
    f.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert "backend" not in saved and "noise" not in saved
    assert saved["timestep_scaling"] == 5.0

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(d_cls.from_pretrained(tmp_path).config) == public(f.config)
    g = f_cls.from_pretrained(tmp_path, noise="philox")
    assert public(g.config) == public(f.config) and g.noise == "philox"
    # from the config of the other scheduler (or of a DDIM checkpoint)
    other = PAIRS["tcd" if name == "lcm" else "lcm"][0]()
    assert isinstance(f_cls.from_config(other.config), d_cls)
    assert isinstance(f_cls.from_config(diffusers.DDIMScheduler().config), f_cls)


@pytest.mark.parametrize(
    "name, options, option",
    [
        ("lcm", {"prediction_type": "flow_prediction"}, "prediction_type"),
        ("tcd", {"prediction_type": "flow_prediction"}, "prediction_type"),
        ("lcm", {"thresholding": True, "dynamic_thresholding_ratio": 0.0}, "thresholding_ratio"),
        ("lcm", {"thresholding": True, "sample_max_value": 0.5}, "sample_max_value"),
        ("lcm", {"clip_sample": True, "clip_sample_range": 0.0}, "clip_sample_range"),
        ("lcm", {"timestep_scaling": float("nan")}, "timestep_scaling"),
        ("lcm", {"timestep_scaling": -1.0}, "timestep_scaling"),
    ],
)  # fmt: skip
def test_unsupported_options_raise_at_construction(name, options, option):
    with pytest.raises(ValueError, match=option):
        PAIRS[name][1](**options)


def test_tcd_ignores_processing_options_as_diffusers_does(seed):
    config = {"thresholding": True, "sample_max_value": 0.5, "clip_sample": True}
    case = {"config": config, "set": {"num_inference_steps": 2}, "step": {}}
    run_pair("tcd", case, "triton", seed)


@pytest.mark.parametrize("name", list(PAIRS))
def test_bad_input_leaves_the_scheduler_alone(name):
    d_cls, f_cls = PAIRS[name]
    f = f_cls(backend="reference")
    f.set_timesteps(4)
    before = (f.timesteps.clone(), f.num_inference_steps, f.custom_timesteps)
    bad = [
        ({"num_inference_steps": 60}, "original_steps"),  # > original steps
        # diffusers sets num_inference_steps before this check: restored
        ({"num_inference_steps": 60, "strength": 2.0}, "original_inference_steps"),
        ({"timesteps": [999, 1000]}, "timesteps"),
        ({"timesteps": [999, -1]}, "timesteps"),
        ({"timesteps": [999.5, 10]}, "timesteps"),
        ({"timesteps": [500, 700]}, "descending"),
        ({}, "num_inference_steps"),
    ]
    if name == "tcd":
        bad.append(({"num_inference_steps": 1001, "original_inference_steps": 10}, "1000"))
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            f.set_timesteps(**kwargs)
        after = (f.timesteps, f.num_inference_steps, f.custom_timesteps)
        assert torch.equal(after[0], before[0]) and after[1:] == before[1:], kwargs
    x = torch.randn(SHAPE)
    m = torch.randn(SHAPE)
    m_copy, x_copy = m.clone(), x.clone()
    if name == "tcd":
        for eta, error in ((1.5, ValueError), (-0.1, ValueError), ("0.3", TypeError)):
            with pytest.raises(error, match="eta"):
                f.step(m, f.timesteps[0], x, eta=eta)
    with pytest.raises(ValueError, match="timestep"):
        f.step(m, 3, x)  # not in the plan
    assert f.step_index is None and torch.equal(x, x_copy) and torch.equal(m, m_copy)
    unplanned = f_cls()
    with pytest.raises(ValueError, match="set_timesteps"):
        unplanned.step(m, 999, x)
    with pytest.raises(ValueError, match="noise"):
        f_cls(noise="numpy")
    with pytest.raises(ValueError, match="backend"):
        f_cls(backend="cuda")


@pytest.mark.parametrize("name", list(PAIRS))
def test_return_dict_false_and_strength_plan(name, seed):
    d_cls, f_cls = PAIRS[name]
    d, f = d_cls(), f_cls(backend="reference")
    for s in (d, f):
        s.set_timesteps(4, strength=0.5)
    assert torch.equal(d.timesteps, f.timesteps)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    out_d = d.step(
        m, d.timesteps[0], x, generator=torch.Generator().manual_seed(0), return_dict=False
    )
    out_f = f.step(
        m, f.timesteps[0], x, generator=torch.Generator().manual_seed(0), return_dict=False
    )
    assert isinstance(out_f, tuple) and len(out_f) == len(out_d) == 2
    for a, b in zip(out_f, out_d):
        close(a, b, "tuple output")


def test_graph_hooks(seed, monkeypatch):
    """capture_denoising_loop refuses torch-drawn noise; with noise="philox" the graphed loop
    (here the eager stand-in runtime on the CPU) equals the eager loop for the same seed."""
    monkeypatch.setattr(capture, "make_runtime", EagerRuntime)
    latents = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(seed))
    weight = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(seed + 1))
    for cls in (FusedLCMScheduler, FusedTCDScheduler):
        scheduler = cls(backend="reference")
        scheduler.set_timesteps(4)
        with pytest.raises(ValueError, match="philox"):
            capture_denoising_loop(lambda x, t: x, latents, scheduler=scheduler)
        scheduler.noise = "philox"

        def step_fn(x, t, scheduler=scheduler):
            m = torch.tanh(x * weight) * (t.float() / 1000)
            return scheduler.step(m, t, x).prev_sample

        torch.manual_seed(seed)
        scheduler.set_timesteps(4)
        eager = latents.clone()
        for t in scheduler.timesteps:
            eager = step_fn(eager, t)
        torch.manual_seed(seed)
        scheduler.set_timesteps(4)
        loop = capture_denoising_loop(step_fn, latents, scheduler=scheduler)
        assert torch.equal(loop.run(latents), eager), cls.__name__


# -- pipelines ------------------------------------------------------------------------------


def tiny_unet(time_cond_proj_dim=None) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return (
        UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            in_channels=4,
            out_channels=4,
            cross_attention_dim=8,
            attention_head_dim=2,
            time_cond_proj_dim=time_cond_proj_dim,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )  # fmt: skip
        .eval()
        .to(DEVICE)
    )


def _latents_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plan", [{"num_inference_steps": 4}, {"timesteps": [999, 759, 499, 259]}])
def test_lcm_pipeline_swap(backend, plan, seed, no_tf32):
    parts = dict(vae=None, text_encoder=None, tokenizer=None, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe = LatentConsistencyModelPipeline(unet=tiny_unet(8), scheduler=LCMScheduler(), **parts)
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(seed)).to(DEVICE)

    def run():
        g = torch.Generator().manual_seed(seed)
        kwargs = dict(prompt_embeds=embeds, height=8, width=8, guidance_scale=8.0, generator=g)
        return pipe(**plan, **kwargs, output_type="latent").images

    want = run()
    pipe.scheduler = FusedLCMScheduler.from_config(pipe.scheduler.config, backend=backend)
    _latents_close(run(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_tcd_in_stable_diffusion_pipeline(backend, eta, seed, no_tf32):
    parts = dict(vae=None, text_encoder=None, tokenizer=None, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    scheduler = TCDScheduler(steps_offset=1)
    pipe = StableDiffusionPipeline(unet=tiny_unet(), scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    embeds, negative = (torch.randn(2, 5, 8, generator=g).to(DEVICE) for _ in range(2))

    def run():
        return pipe(
            prompt_embeds=embeds, negative_prompt_embeds=negative, height=8, width=8,
            num_inference_steps=4, guidance_scale=1.5, eta=eta,
            generator=torch.Generator().manual_seed(seed), output_type="latent",
        ).images  # fmt: skip

    want = run()
    pipe.scheduler = FusedTCDScheduler.from_config(pipe.scheduler.config, backend=backend)
    _latents_close(run(), want)


# -- GPU: no host sync, and the loop captured in a CUDA graph ------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PAIRS))
def test_gpu_loop_has_no_host_sync(name):
    device = torch.device("cuda")
    d_cls, f_cls = PAIRS[name]
    d, f = d_cls(), f_cls(backend="triton")
    shape = (2, 4, 16, 16)
    for s in (f, d):
        s.set_timesteps(4, device=device)
    f.step(torch.zeros(shape, device=device), f.timesteps[0], torch.zeros(shape, device=device))
    f.set_timesteps(4, device=device)  # same plan: tables kept
    x = torch.randn(shape, device=device)
    ms = [torch.randn(shape, device=device) for _ in f.timesteps]
    gen_f, gen_d = (torch.Generator(device).manual_seed(0) for _ in range(2))
    xf = xd = x
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t, m in zip(f.timesteps, ms):
            out_f = f.step(m, t, xf, generator=gen_f)
            xf = out_f.prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scale = 0.0
    for t, m in zip(d.timesteps, ms):
        scale = max(scale, xd.abs().max().item())
        out_d = d.step(m, t, xd, generator=gen_d)
        xd = out_d.prev_sample
    close(xf, xd, name, scale)
    close(list(out_f.values())[1], list(out_d.values())[1], name, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PAIRS))
def test_gpu_loop_captured_in_cuda_graph_bitwise_equal_to_eager(name):
    device = torch.device("cuda")
    f = PAIRS[name][1](backend="triton", noise="philox")
    shape = (2, 4, 16, 16)
    x_in = torch.randn(shape, device=device)
    weight = torch.randn(shape, device=device)

    def step_fn(x, t):
        return f.step(torch.tanh(x * weight), t, x).prev_sample

    torch.manual_seed(0)
    f.set_timesteps(4, device=device)
    eager = x_in.clone()
    for t in f.timesteps:
        eager = step_fn(eager, t)
    torch.manual_seed(0)  # the same Philox seed for the graphed loop
    f.set_timesteps(4, device=device)
    loop = capture_denoising_loop(step_fn, x_in, scheduler=f)
    assert torch.equal(loop.run(x_in), eager)
    assert torch.equal(loop.run(x_in), eager)  # replayed only
