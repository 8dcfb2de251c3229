"""fastdiff.diffusers schedulers against the diffusers schedulers they replace.

Every test builds the diffusers scheduler and the fused one from the same config, feeds both
the same model outputs and the same noise (same ``torch.Generator`` seed, or the same
``variance_noise``) through a whole ``set_timesteps`` + ``step`` loop, and compares every
step. Configs are drawn at random over the options each class supports (a fresh seed per
run, printed on failure); the kernels run under the Triton interpreter on this CPU machine
and the "reference" backend (plain PyTorch) is checked the same way.

Tolerance (float32): diffusers chains float32 operations on float32 schedule scalars, the
fused step folds the same schedule values into float64 coefficients rounded once to
float32, so a step differs by a few float32 ulps of its largest term, times the
coefficients' amplification (1/sqrt(1 - alpha_bar) ~ 1e2 near t = 0). The largest term can
be the step's input: Euler's first steps at zero terminal SNR map samples of size ~1e4
(sigma_max = 4096) to outputs of size ~3, where diffusers' own float32 result is 9e-4 away
from the float64 one (the fused step: 1e-4), and that error is carried by the later steps.
So errors are compared relative to the largest value the loop has read or written so far:
rtol 1e-4, atol 1e-4 * max(|x|, |x_next|, |x0|).

In two extreme corners diffusers' float32 arithmetic takes the square root of a number
that is 0 in exact arithmetic, so rounding leaves NaN or ~sqrt(ulp): Euler ancestral's
sigma_down when sigma_max is ~2e4 (cosine schedule) and DDIM's direction coefficient with
eta = 1 where alpha_bar(T - 1) ~ 0. The fused step gets 0 there. The DDIM corner is left
out of the random configs; where diffusers returns NaN the loop checks that the fused result
is finite and stops.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import random
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers_cases import BACKENDS, DEVICE, PAIRS  # noqa: E402

import fastdiff.diffusers as fused_module  # noqa: E402
import fastdiff.diffusers._base as base  # noqa: E402
import fastdiff.diffusers._step as step_template  # noqa: E402  (the step noise draws here)
from fastdiff.diffusers import (  # noqa: E402
    FusedDDIMScheduler,
    FusedDDPMScheduler,
    FusedEulerDiscreteScheduler,
)

SHAPE = (2, 3, 5, 7)  # odd spatial sizes: not a multiple of any block


def randn(*shape, generator=None) -> torch.Tensor:
    """Standard normals on DEVICE, drawn on the CPU (a CPU generator gives the same values
    on any machine)."""
    return torch.randn(*shape, generator=generator).to(DEVICE)


def assert_step_close(got, want, what: str, scale: float = 0.0, rtol=1e-4) -> None:
    """float32 comparison relative to the largest value the loop has read or written so far
    (``scale``, at least |want| and 1; see the module docstring)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != diffusers' {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(1.0, scale, want.abs().max().item())
    torch.testing.assert_close(
        got, want, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}"
    )


def takes_generator(scheduler) -> bool:
    """Whether the scheduler's step takes a ``generator`` (Heun's, deterministic, does not)."""
    return "generator" in inspect.signature(scheduler.step).parameters


def denoise(scheduler, model_output, t, x, **step_kwargs) -> torch.Tensor:
    """One loop iteration as a pipeline does it: scale the model input, then step the sample
    (the model output is given; a ``generator`` only to a step that takes one)."""
    if not takes_generator(scheduler):
        step_kwargs.pop("generator", None)
    scheduler.scale_model_input(x, t)
    return scheduler.step(model_output, t, x, **step_kwargs).prev_sample


# -- random configs -------------------------------------------------------------------------


def _schedule_options(rng: random.Random, cls_name: str) -> dict:
    """Beta schedule, spacing, offset, zero-SNR and prediction options shared by all classes."""
    cfg = {"num_train_timesteps": rng.choice([100, 1000])}
    schedules = ["linear", "scaled_linear", "squaredcos_cap_v2"]
    if cls_name == "ddpm":
        schedules += ["sigmoid"]
    if rng.random() < 0.15:
        t = cfg["num_train_timesteps"]
        cfg["trained_betas"] = torch.linspace(2e-4, 0.03, t).tolist()
    else:
        cfg["beta_schedule"] = rng.choice(schedules)
        cfg["beta_start"] = rng.uniform(5e-5, 1.5e-3)
        cfg["beta_end"] = rng.uniform(0.01, 0.03)
    cfg["timestep_spacing"] = rng.choice(["leading", "trailing", "linspace"])
    cfg["steps_offset"] = rng.choice([0, 1])
    cfg["rescale_betas_zero_snr"] = rng.random() < 0.3
    predictions = {
        "ddpm": ["epsilon", "sample", "v_prediction"],
        "ddim": ["epsilon", "sample", "v_prediction"],
        "euler": ["epsilon", "sample", "v_prediction", "original_sample"],
        "euler_a": ["epsilon", "v_prediction"],
        "dpm": ["epsilon", "sample", "v_prediction"],
    }[cls_name]
    # zero terminal SNR goes with v-prediction (Lin et al. 2023): epsilon cannot give x0 there
    cfg["prediction_type"] = (
        "v_prediction" if cfg["rescale_betas_zero_snr"] else rng.choice(predictions)
    )
    return cfg


def _processing_options(rng: random.Random, clip: bool = True) -> dict:
    if rng.random() < 0.3:
        return {
            "thresholding": True,
            "dynamic_thresholding_ratio": rng.uniform(0.8, 0.999),
            "sample_max_value": rng.uniform(1.0, 3.0),
        }
    if clip:
        return {"clip_sample": rng.random() < 0.5, "clip_sample_range": rng.uniform(0.5, 3.0)}
    return {}


def random_case(name: str, rng: random.Random) -> dict:
    """A config, the set_timesteps arguments and the step arguments for one loop."""
    cfg = _schedule_options(rng, name)
    steps = rng.randint(2, 7)
    set_kwargs = {"num_inference_steps": steps}
    step_kwargs = {}
    learned = False
    if name == "ddpm":
        cfg.update(_processing_options(rng))
        cfg["variance_type"] = rng.choice(
            ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"]
        )
        learned = cfg["variance_type"] == "learned_range"
        if rng.random() < 0.2 and not cfg["steps_offset"]:
            t = cfg["num_train_timesteps"]
            plan = sorted(rng.sample(range(t), steps), reverse=True)
            set_kwargs = {"timesteps": plan}
    elif name == "ddim":
        cfg.update(_processing_options(rng))
        cfg["set_alpha_to_one"] = rng.random() < 0.5
        # eta = 1 where alpha_bar(T - 1) is ~0 (zero terminal SNR, cosine): diffusers' float32
        # direction coefficient sqrt(1 - ab' - sigma^2) is exactly 0 there but comes out as
        # the square root of a rounding error, NaN or ~3e-4 (the fused step: 0); excluded
        near_zero_snr = cfg["rescale_betas_zero_snr"] or cfg.get("beta_schedule") == (
            "squaredcos_cap_v2"
        )
        step_kwargs = {
            "eta": rng.choice([0.0, 0.3, 0.8] + ([] if near_zero_snr else [1.0])),
            "use_clipped_model_output": rng.random() < 0.5,
        }
    elif name == "euler":
        cfg["interpolation_type"] = rng.choice(["linear", "log_linear"])
        sigmas = rng.choice(["plain", "karras", "exponential", "beta"])
        if sigmas != "plain":
            cfg[f"use_{sigmas}_sigmas"] = True
            if rng.random() < 0.3:
                cfg["sigma_min"], cfg["sigma_max"] = 0.05, 10.0
        cfg["final_sigmas_type"] = rng.choice(["zero", "sigma_min"])
        cfg["timestep_type"] = rng.choice(["discrete", "continuous"])
        if sigmas == "plain" and rng.random() < 0.3:
            set_kwargs = {"sigmas": sorted([rng.uniform(0.1, 12.0) for _ in range(steps)])[::-1]}
            set_kwargs["sigmas"].append(0.0)
        elif sigmas == "plain" and rng.random() < 0.3 and cfg["timestep_type"] == "discrete":
            t = cfg["num_train_timesteps"]
            set_kwargs = {"timesteps": sorted(rng.sample(range(t), steps), reverse=True)}
    elif name == "dpm":
        cfg.update(_processing_options(rng, clip=False))
        cfg["solver_order"] = rng.choice([1, 2])
        cfg["lower_order_final"] = rng.random() < 0.6
        cfg["euler_at_final"] = rng.random() < 0.2
        cfg["final_sigmas_type"] = rng.choice(["zero", "sigma_min"])
        if cfg["final_sigmas_type"] == "sigma_min" and rng.random() < 0.5:
            cfg["algorithm_type"] = "deis"  # diffusers maps it to dpmsolver++
        sigmas = rng.choice(["plain", "karras", "exponential", "beta", "lu_lambdas"])
        if sigmas == "lu_lambdas":
            cfg["use_lu_lambdas"] = True
        elif sigmas != "plain":
            cfg[f"use_{sigmas}_sigmas"] = True
        if rng.random() < 0.2:
            cfg["lambda_min_clipped"] = -5.1
        if cfg["prediction_type"] == "epsilon" and rng.random() < 0.3:
            cfg["variance_type"] = "learned_range"
            learned = True
        if rng.random() < 0.3:
            steps = rng.randint(15, 17)  # lower_order_final only acts below 15 steps
            set_kwargs = {"num_inference_steps": steps}
    return {"config": cfg, "set": set_kwargs, "step": step_kwargs, "learned": learned}


# -- the loop -------------------------------------------------------------------------------


def run_pair(
    name,
    case,
    backend,
    seed,
    *,
    noise_mode="generator",
    fused_kwargs=None,
    x=None,
    config_dir=None,
    own_timesteps=False,
):
    """Run the diffusers scheduler and the fused one side by side; compare every step.

    ``noise_mode``: "generator" (the same seed in two generators), "variance_noise" (the same
    explicit noise) or "global" (no generator: the global RNG seeded alike before each step,
    and in the same state after it). ``config_dir``: load both schedulers from the
    scheduler_config.json there (``case["config"]`` is then unused). ``own_timesteps``: the
    fused scheduler always gets its own plan's elements (values known on the host, as in a
    pipeline), never diffusers' tensors (on CUDA those take the device step-index path)."""
    d_cls, f_cls = PAIRS[name]
    fused_kwargs = {"backend": backend, **(fused_kwargs or {})}
    if config_dir is None:
        d = d_cls(**case["config"])
        f = f_cls.from_config(d.config, **fused_kwargs)
    else:
        d = d_cls.from_pretrained(config_dir)
        f = f_cls.from_pretrained(config_dir, **fused_kwargs)
    d.set_timesteps(**case["set"], device=DEVICE)
    f.set_timesteps(**case["set"], device=DEVICE)
    assert torch.equal(d.timesteps, f.timesteps)
    gen = torch.Generator().manual_seed(seed)
    if x is None:
        x = randn(SHAPE, generator=gen) * d.init_noise_sigma
    xd, xf = x.clone(), x.clone()
    gen_d = torch.Generator().manual_seed(seed + 1)
    gen_f = torch.Generator().manual_seed(seed + 1)
    channels = SHAPE[1] * (2 if case["learned"] else 1)
    scale = 0.0
    for k, t in enumerate(d.timesteps):
        model_output = torch.randn(SHAPE[0], channels, *SHAPE[2:], generator=gen)
        if case["learned"]:
            model_output[:, SHAPE[1] :].uniform_(-1, 1, generator=gen)
        model_output = model_output.to(DEVICE)
        md = d.scale_model_input(xd, t)
        mf = f.scale_model_input(xd, f.timesteps[k] if own_timesteps else t)
        assert torch.equal(md, mf), f"scale_model_input differs at step {k}"
        kw_d, kw_f = dict(case["step"]), dict(case["step"])
        if noise_mode == "generator" and takes_generator(d):
            kw_d["generator"], kw_f["generator"] = gen_d, gen_f
        elif noise_mode == "variance_noise":
            noise = randn(SHAPE, generator=gen)
            kw_d["variance_noise"] = kw_f["variance_noise"] = noise
        step_seed = seed + 2 + k
        if noise_mode == "global":
            torch.manual_seed(step_seed)
        try:
            out_d = d.step(model_output, t, xd, **kw_d)
        except IndexError:
            # plans with repeated timesteps (beta / Karras-like sigmas with many steps) make
            # diffusers start at the second repeat and run off the end; the fused scheduler
            # follows the same rule and stops there too: an error when the step index is on
            # the host, NaN (the poison row) when it lives on the device
            try:
                out_f = f.step(model_output, t, xf, **kw_f)
            except ValueError as err:
                assert "more often" in str(err)
            else:
                assert isinstance(f.step_index, torch.Tensor), "ran past the plan silently"
                assert out_f.prev_sample.isnan().all()
            return d, f
        if noise_mode == "global":
            after_d = torch.randn(3, device=DEVICE)
            torch.manual_seed(step_seed)
        # in "global" mode the fused scheduler's own timestep, as a pipeline passes it: its
        # value is known on the host, so the draws follow diffusers' on CUDA too (none at t = 0)
        t_f = f.timesteps[k] if own_timesteps or noise_mode == "global" else t
        out_f = f.step(model_output, t_f, xf, **kw_f)
        what = f"{name}[{backend}] step {k} (t={t.item()}), seed={seed}, case={case}"
        if noise_mode == "global":
            assert torch.equal(torch.randn(3, device=DEVICE), after_d), "global RNG: " + what
        assert type(out_f) is type(out_d)
        outputs = [out_d.prev_sample]
        if hasattr(out_d, "pred_original_sample"):
            outputs.append(out_d.pred_original_sample)
        if any(o.isnan().any() for o in outputs):
            # diffusers' float32 arithmetic rounds into sqrt(negative) in a few extreme configs
            # (see the module docstring); the fused step stays finite there
            assert all(torch.isfinite(o).all() for o in out_f[: len(outputs)]), what
            return d, f
        scale = max([scale, xd.abs().max().item()] + [o.abs().max().item() for o in outputs])
        assert_step_close(out_f.prev_sample, out_d.prev_sample, "prev_sample of " + what, scale)
        if hasattr(out_d, "pred_original_sample"):
            x0d, x0f = out_d.pred_original_sample, out_f.pred_original_sample
            assert_step_close(x0f, x0d, "pred_original_sample of " + what, scale)
        xd, xf = out_d.prev_sample, out_f.prev_sample
    return d, f


@pytest.fixture
def seed():
    return random.randrange(2**31)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("draw", range(6))
def test_random_configs_match_diffusers(name, backend, draw, seed):
    if name == "heun":
        pytest.skip(
            "diffusers' float32 Heun loses digits on long steps (cosine, sigma 2e4 -> 3.8: "
            "1e-3 of the largest value off its float64 result, the fused step 2e-7); "
            "test_heun.py's "
            "test_random_configs_match_diffusers draws the Heun configs and compares with "
            "diffusers' Heun in float64"
        )
    rng = random.Random(seed)
    case = random_case(name, rng)
    run_pair(name, case, backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddim_variance_noise_matches_diffusers(backend, seed):
    case = random_case("ddim", random.Random(seed))
    case["step"]["eta"] = 0.6
    run_pair("ddim", case, backend, seed, noise_mode="variance_noise")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler_a"])
def test_global_rng_noise_matches_diffusers(name, backend, seed):
    """Without a generator the fused step draws what diffusers draws, from the global RNG: the
    same results, and the global stream in the same state after every step."""
    case = random_case(name, random.Random(seed))
    if name == "ddim":
        case["step"]["eta"] = 0.6
    run_pair(name, case, backend, seed, noise_mode="global")


def test_noise_option(tmp_path):
    f = FusedDDPMScheduler()
    assert f.uses_philox_noise is False
    g = FusedDDPMScheduler.from_config(f.config, noise="philox")
    assert g.uses_philox_noise is True and "noise" not in g.config
    with pytest.raises(AttributeError):
        g.uses_philox_noise = False
    with pytest.raises(ValueError, match="noise"):
        FusedDDPMScheduler(noise="cuda")
    g.noise = "torch"  # switchable, like backend
    assert g.noise == "torch" and not g.uses_philox_noise
    with pytest.raises(ValueError, match="noise"):
        g.noise = "cuda"
    g.noise = "philox"
    g.save_pretrained(tmp_path)
    assert "noise" not in json.loads((tmp_path / "scheduler_config.json").read_text())
    assert FusedDDPMScheduler.from_pretrained(tmp_path, noise="philox").uses_philox_noise
    assert not FusedDDPMScheduler.from_pretrained(tmp_path).uses_philox_noise


# SD1.5's scheduler_config.json (a PNDMScheduler's, as released) and variants with the x0
# processing keys other checkpoints' JSONs carry; a class that does not use a key ignores it
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
CHECKPOINT_CONFIGS = {
    "sd15": SD15_SCHEDULER,
    "sd15-clip": {**SD15_SCHEDULER, "clip_sample": True},
    "sd15-threshold": {**SD15_SCHEDULER, "clip_sample": True, "thresholding": True},
    "sdxl-euler": {  # an EulerDiscreteScheduler JSON that still carries DDIM/PNDM keys
        **SD15_SCHEDULER,
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.19.0.dev0",
        "interpolation_type": "linear",
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "use_karras_sigmas": False,
    },
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CHECKPOINT_CONFIGS))
@pytest.mark.parametrize("name", list(PAIRS))
def test_checkpoint_configs_with_leftover_keys(name, config, backend, seed, tmp_path):
    """Loaded from a checkpoint's JSON, each scheduler honours the x0 processing options its
    diffusers class honours (DDPM / DDIM: clip and threshold; DPM: threshold; Euler: none) and
    ignores the rest, as the diffusers class does."""
    (tmp_path / "scheduler_config.json").write_text(json.dumps(CHECKPOINT_CONFIGS[config]))
    step = {"eta": 0.5} if name == "ddim" else {}
    case = {"config": config, "set": {"num_inference_steps": 4}, "step": step, "learned": False}
    run_pair(name, case, backend, seed, config_dir=tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddpm_variance_type_each(backend, seed):
    for variance_type in ("fixed_small", "fixed_small_log", "fixed_large", "learned_range"):
        case = {
            "config": {"variance_type": variance_type, "clip_sample": False},
            "set": {"num_inference_steps": 4},
            "step": {},
            "learned": variance_type == "learned_range",
        }
        run_pair("ddpm", case, backend, seed)


def test_ddpm_without_set_timesteps_steps_to_t_minus_one(seed):
    d, f = DDPMScheduler(num_train_timesteps=20), FusedDDPMScheduler(num_train_timesteps=20)
    x = randn(SHAPE)
    gd, gf = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for t in (19, 18, 1, 0):
        m = randn(SHAPE)
        want = d.step(m, t, x, generator=gd).prev_sample
        got = f.step(m, t, x, generator=gf).prev_sample
        assert_step_close(got, want, f"t={t}")


# -- per-sample and mid-schedule timesteps ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_per_sample_timesteps(name, backend, seed):
    """A [B] timestep tensor steps each sample from its own timestep (img2img / inpainting
    batches); each row matches diffusers stepping that sample alone."""
    d_cls, f_cls = PAIRS[name]
    d = d_cls(clip_sample=False, prediction_type="v_prediction")
    f = f_cls.from_config(d.config, backend=backend)
    d.set_timesteps(10)
    f.set_timesteps(10)
    batch = 3
    x = randn(batch, *SHAPE[1:])
    m = randn(batch, *SHAPE[1:])
    t = d.timesteps[torch.tensor([0, 4, 9])]
    kw = {"eta": 0.5} if name == "ddim" else {}
    # diffusers' DDPM has no variance_noise: each sample's normals come from its generator
    gens = [lambda b=b: torch.Generator().manual_seed(seed + b) for b in range(batch)]
    noise = torch.cat([randn(1, *SHAPE[1:], generator=g()) for g in gens])
    got = f.step(m, t, x, variance_noise=noise, **kw)
    for b in range(batch):
        if name == "ddim":
            want = d.step(m[b : b + 1], t[b], x[b : b + 1], variance_noise=noise[b : b + 1], **kw)
        else:
            want = d.step(m[b : b + 1], t[b], x[b : b + 1], generator=gens[b]())
        assert_step_close(got.prev_sample[b : b + 1], want.prev_sample, f"sample {b}")
        assert_step_close(got.pred_original_sample[b : b + 1], want.pred_original_sample, "x0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_img2img_start_mid_schedule(name, backend, seed):
    """Noise a clean sample to an inner timestep with add_noise and denoise from there, as the
    img2img pipelines do (set_begin_index for the step-index schedulers)."""
    d_cls, f_cls = PAIRS[name]
    d = d_cls()
    f = f_cls.from_config(d.config, backend=backend)
    n, start = 8, 3
    d.set_timesteps(n)
    f.set_timesteps(n)
    for s in (d, f):
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(start)
    x0 = randn(SHAPE).clamp(-1, 1)
    noise = randn(SHAPE)
    t0 = d.timesteps[start : start + 1].repeat(SHAPE[0])
    xd = d.add_noise(x0, noise, t0)
    xf = f.add_noise(x0, noise, t0)
    assert_step_close(xf, xd, "add_noise")
    gd, gf = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    scale = 0.0
    for t in d.timesteps[start:]:
        m = randn(SHAPE)
        scale = max(scale, xd.abs().max().item())
        xd = denoise(d, m, t, xd, generator=gd)
        xf = denoise(f, m, t, xf, generator=gf)
        assert_step_close(xf, xd, f"{name} t={t.item()}", scale)


@pytest.mark.parametrize("name", list(PAIRS))
def test_new_plan_on_the_same_scheduler(name, seed):
    """set_timesteps again with another plan (other step counts, Euler's custom sigmas; then
    the first plan again): the tables follow the plan, every loop matches diffusers."""
    d_cls, f_cls = PAIRS[name]
    d, f = d_cls(), f_cls.from_config(d_cls().config)
    plans = [{"num_inference_steps": 4}, {"num_inference_steps": 6}]
    if name == "euler":
        plans.append({"sigmas": [9.0, 3.0, 1.0, 0.0]})
    for plan in [*plans, plans[0]]:
        d.set_timesteps(**plan, device=DEVICE)
        f.set_timesteps(**plan, device=DEVICE)
        xd = xf = randn(SHAPE) * d.init_noise_sigma
        gd, gf = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        scale = 0.0
        for t in d.timesteps:
            m = randn(SHAPE)
            scale = max(scale, xd.abs().max().item())
            xd = denoise(d, m, t, xd, generator=gd)
            xf = denoise(f, m, t, xf, generator=gf)
            assert_step_close(xf, xd, f"{name} plan {plan} t={t.item()}", scale)


@pytest.mark.parametrize("name", list(PAIRS))
def test_add_noise_matches_diffusers(name):
    d_cls, f_cls = PAIRS[name]
    d, f = d_cls(), f_cls()
    d.set_timesteps(6)
    f.set_timesteps(6)
    x0, noise = randn(SHAPE), randn(SHAPE)
    t = d.timesteps[torch.tensor([1, 4])]
    assert_step_close(f.add_noise(x0, noise, t), d.add_noise(x0, noise, t), "add_noise")


# -- host syncs -----------------------------------------------------------------------------


@pytest.fixture
def device_timesteps(monkeypatch):
    """Treat every timestep tensor as if it lived on a GPU (its value is not read on the host)
    and fail on any tensor-to-python conversion during the steps."""
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
    """With timesteps that live on the device, the fused loop reads no tensor value on the
    host (device lookup of the step index, device row arithmetic) and still matches
    diffusers."""
    d_cls, f_cls = PAIRS[name]
    d = d_cls(prediction_type="v_prediction") if name != "euler_a" else d_cls()
    f = f_cls.from_config(d.config, backend=backend)
    d.set_timesteps(5, device=DEVICE)
    f.set_timesteps(5, device=DEVICE)
    zeros = torch.zeros(SHAPE, device=DEVICE)
    f.step(zeros, f.timesteps[0], zeros)  # build the tables (and upload them) once
    f.set_timesteps(5, device=DEVICE)
    x = randn(SHAPE) * d.init_noise_sigma
    xd, xf = x.clone(), x.clone()
    gd, gf = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    scale = 0.0
    for k, t in enumerate(d.timesteps):
        m = randn(SHAPE)
        scale = max(scale, xd.abs().max().item())
        xd = denoise(d, m, t, xd, generator=gd)
        device_timesteps.active = True
        try:
            xf = denoise(f, m, t.clone(), xf, generator=gf)
        finally:
            device_timesteps.active = False
        assert_step_close(xf, xd, f"{name} step {k}", scale)
        if name in ("euler", "euler_a", "dpm"):
            assert isinstance(f.step_index, torch.Tensor)


@pytest.mark.parametrize("name", list(PAIRS))
def test_plan_elements_are_read_from_the_host_copy(name, monkeypatch, seed):
    """Timesteps taken from ``scheduler.timesteps`` (on the GPU in Stable Diffusion pipelines)
    are located by their storage offset, so their values come from the host copy of the plan:
    the step index stays a python int and DDPM draws noise on exactly the steps diffusers
    draws it (the generators end in the same state)."""
    monkeypatch.setattr(base, "on_host", lambda t: False)  # as if every tensor were on a GPU
    d_cls, f_cls = PAIRS[name]
    d, f = d_cls(), f_cls()
    d.set_timesteps(5, device=DEVICE)
    f.set_timesteps(5, device=DEVICE)
    x = randn(SHAPE) * d.init_noise_sigma
    xd, xf = x.clone(), x.clone()
    gd, gf = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    scale = 0.0
    for td, tf in zip(d.timesteps, f.timesteps[0:]):  # a slice is a view of the plan too
        m = randn(SHAPE)
        scale = max(scale, xd.abs().max().item())
        xd = denoise(d, m, td, xd, generator=gd)
        xf = denoise(f, m, tf, xf, generator=gf)
        assert_step_close(xf, xd, f"{name} t={td.item()}", scale)
        assert isinstance(getattr(f, "_step_index", 0), int)
    assert torch.equal(gd.get_state(), gf.get_state())


def test_device_lookup_miss_gives_nan_not_a_wrong_step(device_timesteps):
    f = FusedEulerDiscreteScheduler(backend="reference")
    f.set_timesteps(4, device=DEVICE)
    out = f.step(randn(SHAPE), torch.tensor(123.5, device=DEVICE), randn(SHAPE)).prev_sample
    assert out.isnan().all()


def test_device_index_rule_matches_diffusers():
    """The device lookup follows index_for_timestep: first match, second of repeats."""
    plan = torch.tensor([9.0, 7.0, 7.0, 3.0, 1.0])
    got = base.device_index(plan, torch.tensor([9.0, 7.0, 3.0, 5.0]), miss=-1)
    assert got.tolist() == [0, 2, 3, -1]


# -- config handling ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIRS))
def test_signatures_match_diffusers(name):
    """Pipelines inspect set_timesteps and step (timesteps= / sigmas= / eta / generator)."""
    d_cls, f_cls = PAIRS[name]
    for method in ("set_timesteps", "step", "scale_model_input", "add_noise"):
        want = list(inspect.signature(getattr(d_cls, method)).parameters)
        got = list(inspect.signature(getattr(f_cls, method)).parameters)
        extra = {"variance_noise"} if (name, method) == ("ddpm", "step") else set()
        assert [p for p in got if p not in extra] == want, method
    init = set(inspect.signature(f_cls.__init__).parameters)
    assert init == set(inspect.signature(d_cls.__init__).parameters) | {"backend", "noise"}


def test_step_binds_its_arguments_as_diffusers_does():
    """The step built from diffusers' signature (``mirrored_step``): positional and keyword
    arguments name the same parameters, defaults are diffusers', and a call diffusers' step
    would refuse is the same TypeError."""
    from diffusers import DDIMScheduler

    from fastdiff.diffusers import FusedDDIMScheduler

    f, d = FusedDDIMScheduler(), DDIMScheduler()
    for s in (f, d):
        s.set_timesteps(10)
    x, m, z = randn(*SHAPE), randn(*SHAPE), randn(*SHAPE)
    t = f.timesteps[3]
    by_position = f.step(m, t, x, 0.5, False, None, z, False)
    by_name = f.step(m, t, x, eta=0.5, variance_noise=z, return_dict=False)
    want = d.step(m, t, x, 0.5, variance_noise=z, return_dict=False)
    assert isinstance(by_position, tuple) and len(by_position) == 2
    for got in (by_position, by_name):
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(f.step(m, t, x).prev_sample, f.step(m, t, x, eta=0.0).prev_sample)
    for call in (
        lambda s: s.step(m, t, x, etaa=0.5),  # misspelt
        lambda s: s.step(m, t, x, 0.5, eta=0.5),  # twice
        lambda s: s.step(m, t, x, 0.0, False, None, None, True, 1),  # too many
    ):
        with pytest.raises(TypeError):
            call(d)
        with pytest.raises(TypeError):
            call(f)
    assert "DDIMScheduler.step" in FusedDDIMScheduler.step.__doc__


@pytest.mark.parametrize("name", list(PAIRS))
def test_attributes_and_config_roundtrip(name, tmp_path):
    d_cls, f_cls = PAIRS[name]
    d = d_cls(beta_schedule="scaled_linear", num_train_timesteps=500)
    f = f_cls.from_config(d.config)
    assert isinstance(f, d_cls) and f.order == d.order and len(f) == len(d) == 500
    for n in (3, 8):
        d.set_timesteps(n)
        f.set_timesteps(n)
        assert torch.equal(torch.as_tensor(f.init_noise_sigma), torch.as_tensor(d.init_noise_sigma))
    f.save_pretrained(tmp_path)
    g = f_cls.from_pretrained(tmp_path, backend="reference")
    assert g.backend == "reference" and "backend" not in g.config
    assert {k: v for k, v in g.config.items() if not k.startswith("_")} == {
        k: v for k, v in f.config.items() if not k.startswith("_")
    }
    back = d_cls.from_pretrained(tmp_path)  # a diffusers class reads the saved config
    assert back.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("source", list(PAIRS))
@pytest.mark.parametrize("name", list(PAIRS))
def test_from_config_of_any_scheduler(name, source):
    """X.from_config(other.config) gives what diffusers' own X.from_config gives."""
    d_cls, f_cls = PAIRS[name]
    other = PAIRS[source][0](num_train_timesteps=300, beta_schedule="squaredcos_cap_v2")
    want = d_cls.from_config(other.config)
    got = f_cls.from_config(other.config)
    assert {k: v for k, v in got.config.items() if k != "_class_name"} == {
        k: v for k, v in want.config.items() if k != "_class_name"
    }


UNSUPPORTED = [
    ("ddpm", {"variance_type": "learned"}, "variance_type"),
    ("ddpm", {"variance_type": "fixed_large_log"}, "variance_type"),
    ("ddpm", {"thresholding": True, "sample_max_value": 0.5}, "sample_max_value"),
    ("ddim", {"clip_sample": True, "clip_sample_range": 0.0}, "clip_sample_range"),
    ("euler_a", {"prediction_type": "sample"}, "prediction_type"),
    # sde-dpmsolver++, solver_type="heun" and solver_order=3 are supported now
    # (tests/test_dpm_ext.py); diffusers takes order 4 and runs it at order 3
    ("dpm", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, "algorithm"),
    ("dpm", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, "algorithm_type"),
    ("dpm", {"solver_order": 4}, "solver_order"),
    # flow sigmas are supported now (tests/test_flow_diffusers.py); a flow model on VP sigmas is not
    ("dpm", {"prediction_type": "flow_prediction"}, "use_flow_sigmas"),
    ("dpm", {"variance_type": "learned_range", "prediction_type": "sample"}, "variance_type"),
]


@pytest.mark.parametrize("name, options, option", UNSUPPORTED)
def test_unsupported_options_raise_at_construction(name, options, option):
    with pytest.raises(ValueError, match=option):
        PAIRS[name][1](**options)
    with pytest.raises(ValueError, match=option):
        PAIRS[name][1].from_config(PAIRS[name][0](**options).config)


@pytest.mark.parametrize("backend", BACKENDS)
def test_config_patched_after_construction_is_read_at_step_time(backend, seed):
    """Pipelines patch scheduler configs after construction; the step reads the patch."""
    d = DDIMScheduler(clip_sample=True)
    f = FusedDDIMScheduler.from_config(d.config, backend=backend)
    d.set_timesteps(5)
    f.set_timesteps(5)
    x, m = randn(SHAPE) * 3, randn(SHAPE)
    t = d.timesteps[2]
    for patch in (
        {"clip_sample": False},
        {"prediction_type": "v_prediction"},
        {"thresholding": True},
    ):
        d.register_to_config(**patch)
        f.register_to_config(**patch)
        want = d.step(m, t, x)
        got = f.step(m, t, x)
        assert_step_close(got.prev_sample, want.prev_sample, str(patch))
    f.register_to_config(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="prediction_type"):
        f.step(m, t, x)


def test_step_argument_errors():
    f = FusedDDIMScheduler()
    x = randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        f.step(x, 10, x)
    f.set_timesteps(4)
    with pytest.raises(ValueError, match="eta"):
        f.step(x, f.timesteps[0], x, eta=1.5)
    with pytest.raises(ValueError, match="generator"):
        f.step(x, f.timesteps[0], x, eta=0.5, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="timestep"):
        f.step(x, 1000, x)
    e = FusedEulerDiscreteScheduler()
    e.set_timesteps(2)
    with pytest.raises(ValueError, match="s_churn"):  # churn works: a negative one is refused
        e.step(x, e.timesteps[0], x, s_churn=-1.0)
    with pytest.raises(ValueError, match="integer"):
        e.step(x, 3, x)
    for t in e.timesteps:
        e.step(x, t, x)
    with pytest.raises(ValueError, match="more often"):
        e.step(x, e.timesteps[0], x)
    p = FusedDDPMScheduler()
    p.set_timesteps(4)
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        p.step(x, 5, x)
    with pytest.raises(ValueError, match="backend"):
        FusedDDPMScheduler(backend="cuda")


@pytest.mark.parametrize("name", list(PAIRS))
def test_return_dict_false(name):
    d_cls, f_cls = PAIRS[name]
    f = f_cls(backend="reference")
    f.set_timesteps(3)
    x = randn(SHAPE)
    out = f.step(x, f.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == (1 if name == "dpm" else 2)


# -- scale_model_input: the same bits with the step index on the host or on the device ------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_scale_model_input_same_bits_with_host_or_device_index(name, dtype, monkeypatch):
    """scale_model_input gives diffusers' bits whether the step index is found on the host (a
    timestep of the plan, as an eager loop passes it) or on the device (any other timestep
    tensor, as in a captured CUDA graph: the index stays a device tensor). On CUDA diffusers'
    division by a CPU scalar runs as a multiplication by its float32 reciprocal; the device
    path must not round that reciprocal to the sample's dtype first (1 fp16 ulp)."""
    monkeypatch.setattr(base, "on_host", lambda t: False)  # on CPU too: the device lookup
    d_cls, f_cls = PAIRS[name]
    d, host, dev = d_cls(), f_cls(), f_cls()
    for s in (d, host, dev):
        s.set_timesteps(10, device=DEVICE)
    x = (randn(2, 4, 6, 6) * 30).to(dtype)
    for k, t in enumerate(d.timesteps):
        for s in (d, host, dev):
            s._step_index = None  # looked up from the timestep on every call
        want = d.scale_model_input(x, t)
        got_host = host.scale_model_input(x, host.timesteps[k])
        got_dev = dev.scale_model_input(x, t.clone())
        assert isinstance(host.step_index, int) and isinstance(dev.step_index, torch.Tensor)
        assert got_host.dtype == got_dev.dtype == want.dtype == dtype
        assert torch.equal(got_host, want), f"host index, step {k}"
        assert torch.equal(got_dev, want), f"device index, step {k}"


@pytest.mark.parametrize("name", list(PAIRS))
def test_step_output_is_what_the_dataclass_constructor_builds(name):
    """make_output (the steps' fast constructor) builds the object the output class's own
    constructor builds: same type, items, attributes, tuple, pickle round trip."""
    import pickle

    f = PAIRS[name][1](backend="reference")
    f.set_timesteps(3)
    x = randn(SHAPE)
    got = f.step(x, f.timesteps[0], x)
    cls = type(got)
    values = [getattr(got, field.name) for field in dataclasses.fields(cls)]
    want = cls(*values)
    assert list(got.items()) == list(want.items()) and vars(got) == vars(want)
    assert got.to_tuple() == want.to_tuple() and got[0] is want[0] is values[0]
    back = pickle.loads(pickle.dumps(got))
    assert type(back) is cls and all(torch.equal(a, b) for a, b in zip(back.to_tuple(), values))
    assert base.make_output(cls, *values[:1], *[None] * (len(values) - 1)).to_tuple() == (
        values[0],
    )


# -- dtypes and layouts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "sample_dtype, output_dtype",
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float16, torch.float32),
    ],
)
@pytest.mark.parametrize("name", list(PAIRS))
def test_half_precision_steps(name, sample_dtype, output_dtype, monkeypatch):
    """Half-precision inputs: output dtypes as diffusers', values within one rounding of the
    exact step on the same inputs (diffusers run in float64 on the upcast inputs, with the
    same noise and, for DPM, the same stored x0 history). diffusers itself rounds every
    intermediate to the half dtype and can be ~30 ulps off (x0 = (x - sqrt(1 - ab) m) /
    sqrt(ab) at t = T - 1), so the fused result is checked against the exact one, not
    against diffusers' half result.

    Tolerance: rtol = the output dtype's eps (one rounding of the output; the interpreter
    truncates bfloat16 stores, still below 1 ulp), plus atol 4e-5 (|x| + |m|) for the
    float32 arithmetic: a few float32 ulps (1.2e-7) of terms up to ~200 (|x| + |m|)
    (1/sqrt(ab) ~ 160 at t = T - 1; Euler's sigma_max ~ 157)."""
    if name == "heun":
        pytest.skip(
            "the steps here all take the same sample, and Heun's second half reads the first "
            "half's x0, which the fused step keeps rounded to the half dtype and diffusers "
            "does not; test_heun.py's test_half_precision_dtypes_and_values continues the "
            "float64 run from the kept x0"
        )
    d_cls, f_cls = PAIRS[name]
    d, d64, f = d_cls(), d_cls(), f_cls(backend="triton")
    for s in (d, d64, f):
        s.set_timesteps(6)
    # every scheduler draws the same normals, as rounded to the model output's dtype
    noise = randn(SHAPE).to(output_dtype)
    for target in (sys.modules[d_cls.__module__], step_template):
        if not hasattr(target, "randn_tensor"):  # a deterministic step (Heun)
            continue
        monkeypatch.setattr(
            target, "randn_tensor", lambda shape, generator, device, dtype: noise.to(dtype)
        )
    x = randn(SHAPE).to(sample_dtype)
    for t in d.timesteps[:3]:
        m = randn(SHAPE).to(output_dtype)
        kw = {"generator": torch.Generator()} if takes_generator(d) and name != "dpm" else {}
        for s, sample in ((d, x), (d64, x.double()), (f, x)):
            s.scale_model_input(sample, t)  # the model input; the step takes the sample itself
        want = d.step(m, t, x, **kw)
        exact = d64.step(m.double(), t, x.double(), **kw)
        got = f.step(m, t, x, **kw)
        atol = 4e-5 * (x.abs().max().item() + m.abs().max().item())
        for field in ("prev_sample", "pred_original_sample"):
            if hasattr(want, field):
                w, g, e = getattr(want, field), getattr(got, field), getattr(exact, field)
                assert g.dtype == w.dtype, field
                eps = torch.finfo(g.dtype).eps
                torch.testing.assert_close(
                    g.double(), e, rtol=eps, atol=atol, msg=f"{field} at t={t.item()}"
                )
        if name == "dpm":  # the exact run continues from the same (rounded) x0 history
            d64.model_outputs = [None if o is None else o.double() for o in f.model_outputs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ddpm", "euler_a", "dpm"])
def test_channels_last(name, backend, seed):
    d_cls, f_cls = PAIRS[name]
    d, f = d_cls(), f_cls(backend=backend)
    d.set_timesteps(3)
    f.set_timesteps(3)
    x = randn(SHAPE).contiguous(memory_format=torch.channels_last)
    xd, xf = x, x
    gd, gf = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    scale = 0.0
    for t in d.timesteps:
        m = randn(SHAPE).contiguous(memory_format=torch.channels_last)
        scale = max(scale, xd.abs().max().item())
        xd = denoise(d, m, t, xd, generator=gd)
        xf = denoise(f, m, t, xf, generator=gf)
        assert xf.is_contiguous(memory_format=torch.channels_last)
        assert_step_close(xf, xd, f"t={t.item()}", scale)


# -- noise without a generator: in-kernel Philox --------------------------------------------


def _philox_run(name, backend, steps=3, **step_kwargs):
    d_cls, f_cls = PAIRS[name]
    f = f_cls(backend=backend, noise="philox")
    f.set_timesteps(steps)
    x = torch.linspace(-2, 2, math.prod(SHAPE), device=DEVICE).reshape(SHAPE)
    outs = []
    for t in f.timesteps:
        m = torch.cos(x * 3)  # a fixed function of x: no RNG used outside the scheduler
        x = denoise(f, m, t, x, **step_kwargs)
        outs.append(x)
    return outs


@pytest.mark.parametrize("name, kw", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler_a", {})])
def test_philox_noise_same_on_both_backends_and_reproducible(name, kw, seed):
    torch.manual_seed(seed)
    a = _philox_run(name, "triton", **kw)
    torch.manual_seed(seed)
    b = _philox_run(name, "reference", **kw)
    torch.manual_seed(seed + 1)
    c = _philox_run(name, "triton", **kw)
    for k, (ka, kb) in enumerate(zip(a, b)):
        # same seeds -> the same Philox normals; float32 step arithmetic in both
        assert_step_close(ka, kb, f"step {k}")
    assert not torch.allclose(a[0], c[0]), "a new global seed must give new noise"


def test_philox_noise_is_standard_normal(seed):
    """The noise a DDIM eta=1 step adds, (x_eta - x_noiseless) / sigma_t, over 6144 elements:
    mean within 5.5 standard errors of 0 (1/sqrt(n) = 0.0128) and variance within 5.5 of 1
    (sqrt(2/n) = 0.018): a false failure rate below 1e-7 per check."""
    torch.manual_seed(seed)
    f = FusedDDIMScheduler(clip_sample=False, backend="triton", noise="philox")
    f.set_timesteps(10)
    shape = (2, 3, 32, 32)
    x, m, t = randn(shape), randn(shape), f.timesteps[3]
    noisy = f.step(m, t, x, eta=1.0).prev_sample
    clean = f.step(m, t, x, eta=1.0, variance_noise=torch.zeros(shape, device=DEVICE)).prev_sample
    ab, ab_prev = f.alphas_cumprod[t].double(), f.alphas_cumprod[t - 100].double()
    sigma = ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    z = ((noisy - clean).double() / sigma).flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5.5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5.5 * math.sqrt(2 / n)
    # the two samples of the batch get different noise
    assert not torch.allclose(z[: n // 2], z[n // 2 :])


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm"])
def test_deterministic_schedulers_leave_global_rng_alone(name):
    state = torch.get_rng_state()
    _philox_run(name, "triton")
    assert torch.equal(torch.get_rng_state(), state)


def test_import_error_names_the_extra():
    code = "import sys; sys.modules['diffusers'] = None; import fastdiff.diffusers"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert 'pip install "fastdiff[diffusers]"' in result.stderr


# -- GPU: no host sync at all, and the loop captured in a CUDA graph -------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PAIRS))
def test_gpu_loop_has_no_host_sync(name):
    device = torch.device("cuda")
    d_cls, f_cls = PAIRS[name]
    f = f_cls(backend="triton")
    d = d_cls()
    shape = (2, 4, 16, 16)
    gen_f = torch.Generator(device).manual_seed(0)
    gen_d = torch.Generator(device).manual_seed(0)
    for s in (f, d):
        s.set_timesteps(6, device=device)
    f.step(torch.zeros(shape, device=device), f.timesteps[0], torch.zeros(shape, device=device))
    f.set_timesteps(6, device=device)  # same plan: the tables built above are kept
    x = torch.randn(shape, device=device) * float(d.init_noise_sigma)
    xd, xf = x.clone(), x.clone()
    ms = [torch.randn(shape, device=device) for _ in f.timesteps]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t, m in zip(f.timesteps, ms):
            xf = denoise(f, m, t, xf, generator=gen_f)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scale = 0.0
    for t, m in zip(d.timesteps, ms):
        scale = max(scale, xd.abs().max().item())
        xd = denoise(d, m, t, xd, generator=gen_d)
    assert_step_close(xf, xd, name, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PAIRS))
def test_gpu_loop_captured_in_cuda_graph(name):
    device = torch.device("cuda")
    f = PAIRS[name][1](backend="triton", noise="philox")  # graphs replay in-kernel noise only
    shape = (2, 4, 16, 16)
    x_in = torch.randn(shape, device=device)
    weight = torch.randn(shape, device=device)

    def loop():
        x = x_in * float(f.init_noise_sigma)
        for t in f.timesteps:
            m = torch.tanh(f.scale_model_input(x, t) * weight)
            x = f.step(m, t, x).prev_sample
        return x

    f.set_timesteps(5, device=device)
    eager = loop()  # warm-up: builds and uploads the tables
    f.set_timesteps(5, device=device)  # same plan: tables kept, step state reset
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = loop()
    graph.replay()
    torch.cuda.synchronize()
    if name in ("ddpm", "euler_a"):  # new Philox seed per set_timesteps: compare shapes only
        assert captured.shape == eager.shape and torch.isfinite(captured).all()
    else:
        torch.testing.assert_close(captured, eager)


@pytest.mark.parametrize("name", [n for n in fused_module.__all__ if n.endswith("Scheduler")])
def test_step_refuses_a_model_output_or_sample_that_is_not_a_tensor(name):
    """A step given something other than a tensor says which argument it is (not an
    AttributeError from deep inside)."""
    scheduler = getattr(fused_module, name)()
    scheduler.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    t = scheduler.timesteps[0]
    with pytest.raises(TypeError, match="model_output must be a tensor, got NoneType"):
        scheduler.step(None, t, x)
    with pytest.raises(TypeError, match="sample must be a tensor, got float"):
        scheduler.step(torch.randn_like(x), t, 1.0)
