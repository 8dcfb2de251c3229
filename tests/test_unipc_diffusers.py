"""FusedUniPCMultistepScheduler against diffusers' UniPCMultistepScheduler.

Random configs over every supported option (bh1/bh2, orders 1-3, predict_x0, lower_order_final,
disable_corrector, thresholding; VP plans: beta schedules, spacings, Karras / exponential /
beta sigmas, final sigma types, zero terminal SNR, epsilon / v / sample prediction; flow:
flow_shift, dynamic shifting with mu, given sigmas, Karras sigmas on flow), both backends, the
same model outputs into both schedulers, every step compared. A fresh seed per run, printed
on failure.

Tolerance (float32): the fused step folds the schedule into float64 coefficients rounded
once to float32 and computes in float32; it is compared with diffusers' own step run in
float64 (diffusers' float32 result is itself ~1e-3 off where the first alpha is ~1e-3, as
with noise prediction on a cosine schedule): a few float32 ulps of the largest term times the
coefficients' amplification, rtol 1e-4 and atol 1e-4 * the largest value the loop has read
or written (tests/test_diffusers_adapter.py's rule).

Where diffusers' float32 arithmetic multiplies 0 by infinity on the step to sigma = 0
(bh1, and noise prediction: NaN) the loop checks that the fused step is finite and stops;
noise prediction (predict_x0=False) on plans whose first alpha is ~1e-4 (cosine schedule,
zero terminal SNR) is left out of the random configs: its corrector cancels terms of
~|x| / alpha, which no float32 state (diffusers' included) keeps to better than ~1e-3;
where the fused table refuses a plan (a coefficient that is not finite), diffusers' loop must
give a non-finite sample too.
"""

from __future__ import annotations

import inspect
import math
import random

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import UniPCMultistepScheduler  # noqa: E402

import fastdiff.diffusers._base as base  # noqa: E402
from fastdiff.diffusers.unipc import FusedUniPCMultistepScheduler  # noqa: E402
from fastdiff.gmm import GaussianMixture  # noqa: E402

BACKENDS = ["triton", "reference"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (2, 3, 5, 7)  # odd sizes: not a multiple of any block
WAN = dict(  # Wan 2.1's scheduler config (flow matching on UniPC)
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
)


def randn(*shape, generator=None) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(DEVICE)


def assert_close_step(got, want, what, scale=0.0):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    scale = max(1.0, scale, want.abs().max().item())
    torch.testing.assert_close(
        got, want, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{what}: {m}"
    )


def random_case(rng: random.Random) -> dict:
    """A config and the set_timesteps arguments of one loop."""
    order = rng.choice([1, 2, 3])
    steps = rng.randint(2, 8)
    cfg = {
        "solver_order": order,
        "solver_type": rng.choice(["bh1", "bh2"]),
        "lower_order_final": rng.random() < 0.7,
        "disable_corrector": sorted(rng.sample(range(steps), rng.choice([0, 0, 1, 2]))),
        "final_sigmas_type": rng.choice(["zero", "sigma_min"]),
    }
    set_kwargs: dict = {"num_inference_steps": steps}
    if rng.random() < 0.4:  # flow matching
        cfg.update(use_flow_sigmas=True, prediction_type="flow_prediction", predict_x0=True)
        plan = rng.choice(["shift", "shift", "dynamic", "sigmas", "karras"])
        cfg["flow_shift"] = rng.choice([1.0, 3.0, 5.0])
        if plan == "dynamic":
            cfg["use_dynamic_shifting"] = True
            set_kwargs["mu"] = rng.uniform(0.3, 1.5)
        elif plan == "sigmas":
            sigmas = sorted(rng.uniform(0.05, 1.0) for _ in range(steps))[::-1]
            set_kwargs = {"sigmas": np.array(sigmas)}  # diffusers' shift needs an array
        elif plan == "karras":
            cfg["use_karras_sigmas"] = True
    else:
        cfg["predict_x0"] = rng.random() < 0.7
        cfg["num_train_timesteps"] = rng.choice([100, 1000])
        cfg["beta_schedule"] = rng.choice(["linear", "scaled_linear", "squaredcos_cap_v2"])
        cfg["timestep_spacing"] = rng.choice(["leading", "trailing", "linspace"])
        cfg["steps_offset"] = rng.choice([0, 1])
        # Noise prediction where the first alpha is ~1e-4 (cosine schedule, zero terminal
        # SNR): the corrector cancels terms of ~|x| / alpha between the last sample and the
        # stored eps, and any float32 state (diffusers' too) keeps ~1e-3 of it: left out.
        if not cfg["predict_x0"]:
            cfg["beta_schedule"] = rng.choice(["linear", "scaled_linear"])
        cfg["rescale_betas_zero_snr"] = cfg["predict_x0"] and rng.random() < 0.2
        cfg["prediction_type"] = (
            "v_prediction"
            if cfg["rescale_betas_zero_snr"]
            else rng.choice(["epsilon", "v_prediction", "sample"])
        )
        sigmas = rng.choice(["plain", "plain", "karras", "exponential", "beta"])
        if sigmas != "plain":
            cfg[f"use_{sigmas}_sigmas"] = True
        if cfg["predict_x0"] and rng.random() < 0.3:
            cfg["thresholding"] = True
            cfg["dynamic_thresholding_ratio"] = rng.uniform(0.8, 0.999)
            cfg["sample_max_value"] = rng.uniform(1.0, 3.0)
    if not cfg["lower_order_final"] and order > 1:
        # Without lower_order_final a high-order last step is degenerate on many plans (a
        # zero-length step to sigma_min: diffusers' solve is singular or gives inf, and the
        # fused scheduler refuses it, see test_unsupported_options_raise_at_construction);
        # the random loops keep orders above 1 to the plans diffusers can step through.
        cfg["final_sigmas_type"] = "sigma_min"
        cfg["lower_order_final"] = order > 2
    return {"config": cfg, "set": set_kwargs}


def _float64(scheduler: UniPCMultistepScheduler) -> UniPCMultistepScheduler:
    """The same diffusers scheduler computing in float64 (its sigmas and the tensors it gets)."""
    scheduler.sigmas = scheduler.sigmas.double()
    return scheduler


def run_pair(case, backend, seed, *, x=None, begin=None):
    """diffusers and the fused scheduler side by side over one loop; every step compared.

    diffusers runs twice: in float32 (the spec of what happens: step index, errors, NaN) and
    in float64 (the values: diffusers' own float32 rounding is ~1e-3 relative where the first
    alpha is ~1e-3, e.g. noise prediction on a cosine schedule).
    """
    d = UniPCMultistepScheduler(**case["config"])
    d64 = UniPCMultistepScheduler(**case["config"])
    f = FusedUniPCMultistepScheduler.from_config(d.config, backend=backend)
    for s in (d, d64, f):
        s.set_timesteps(**case["set"], device=DEVICE)
    _float64(d64)
    assert torch.equal(d.timesteps, f.timesteps) and torch.equal(d.sigmas, f.sigmas)
    timesteps = d.timesteps
    if begin is not None:
        for s in (d, d64, f):
            s.set_begin_index(begin)
        timesteps = timesteps[begin:]
    gen = torch.Generator().manual_seed(seed)
    if x is None:
        x = randn(SHAPE, generator=gen)
    xd, xe, xf = x.clone(), x.double(), x.clone()
    scale = 0.0
    for k, t in enumerate(timesteps):
        m = randn(SHAPE, generator=gen)
        what = f"[{backend}] step {k} (t={t.item()}), seed={seed}, case={case}"
        try:
            out_d = d.step(m, t, xd)
        except (IndexError, AssertionError):
            # a plan with a repeated first timestep: diffusers starts at its second occurrence
            # and runs off the end; the fused scheduler follows the rule and stops too: with
            # an error on a host plan, on the poison (NaN) row of a device plan (no sync)
            if t.device.type == "cpu":
                with pytest.raises(ValueError, match="more often"):
                    f.step(m, t, xf)
            else:
                assert torch.isnan(f.step(m, t, xf).prev_sample).all(), what
            return d, f
        try:
            out_f = f.step(m, t, xf)
        except ValueError as err:
            assert "not finite" in str(err) and k == 0, what
            try:  # diffusers' loop goes non-finite too (or runs off its plan)
                for t_rest in timesteps[1:]:
                    out_d = d.step(randn(SHAPE, generator=gen), t_rest, out_d.prev_sample)
            except (IndexError, AssertionError):
                return d, f
            assert not torch.isfinite(out_d.prev_sample).all(), what
            return d, f
        exact = d64.step(m.double(), t, xe).prev_sample
        assert type(out_f) is type(out_d) and f.step_index == d.step_index
        if not torch.isfinite(out_d.prev_sample).all():
            assert d.step_index == len(d.timesteps), what  # only the step to sigma = 0
            assert torch.isfinite(out_f.prev_sample).all(), what
            return d, f
        assert out_f.prev_sample.dtype == out_d.prev_sample.dtype, what
        scale = max(scale, xe.abs().max().item(), exact.abs().max().item())
        assert_close_step(out_f.prev_sample.double(), exact, what, scale)
        xd, xe, xf = out_d.prev_sample, exact, out_f.prev_sample
    return d, f


@pytest.fixture
def seed():
    return random.randrange(2**31)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draw", range(8))
def test_random_configs_match_diffusers(draw, backend, seed):
    run_pair(random_case(random.Random(seed)), backend, seed)


# every option value at least once, on both backends (the random draws cover combinations)
FIXED_CASES = {
    "wan": WAN,
    "wan-order3-bh1": {**WAN, "solver_order": 3, "solver_type": "bh1"},
    "vp-eps-karras-order3": {"use_karras_sigmas": True, "solver_order": 3},
    "vp-v-noise-prediction": {
        "prediction_type": "v_prediction",
        "predict_x0": False,
        "final_sigmas_type": "sigma_min",
        "disable_corrector": [0, 2],
    },
    "vp-sample-no-lower-final": {
        "prediction_type": "sample",
        "lower_order_final": False,
        "final_sigmas_type": "sigma_min",
        "timestep_spacing": "trailing",
    },
    "vp-thresholding": {"thresholding": True, "sample_max_value": 1.5, "solver_order": 3},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FIXED_CASES))
def test_fixed_configs_match_diffusers(name, backend, seed):
    run_pair({"config": FIXED_CASES[name], "set": {"num_inference_steps": 7}}, backend, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flow", [False, True])
def test_img2img_begin_index_and_add_noise(flow, backend, seed):
    config = WAN if flow else {"solver_order": 3}
    d = UniPCMultistepScheduler(**config)
    f = FusedUniPCMultistepScheduler.from_config(d.config, backend=backend)
    for s in (d, f):
        s.set_timesteps(8)
        s.set_begin_index(3)
    x0, noise = randn(SHAPE).clamp(-1, 1), randn(SHAPE)
    t0 = d.timesteps[3:4].repeat(SHAPE[0])
    xd, xf = d.add_noise(x0, noise, t0), f.add_noise(x0, noise, t0)
    assert_close_step(xf, xd, "add_noise")
    run_pair({"config": config, "set": {"num_inference_steps": 8}}, backend, seed, x=xd, begin=3)


def test_add_noise_per_sample_timesteps():
    d, f = UniPCMultistepScheduler(**WAN), FusedUniPCMultistepScheduler(**WAN)
    for s in (d, f):
        s.set_timesteps(6)
    x0, noise = randn(SHAPE), randn(SHAPE)
    t = d.timesteps[torch.tensor([1, 4])]
    assert_close_step(f.add_noise(x0, noise, t), d.add_noise(x0, noise, t), "add_noise")


def test_channels_last_and_half_precision(seed):
    """channels_last stays channels_last; bfloat16 samples give bfloat16 outputs within a
    few bfloat16 roundings of diffusers in float32 on the same inputs."""
    d = UniPCMultistepScheduler(**WAN)
    f = FusedUniPCMultistepScheduler.from_config(d.config, backend="triton")
    for s in (d, f):
        s.set_timesteps(4)
    gen = torch.Generator().manual_seed(seed)
    x = randn(SHAPE, generator=gen).contiguous(memory_format=torch.channels_last)
    xd, xf = x, x.to(torch.bfloat16)
    for t in d.timesteps:
        m = randn(SHAPE, generator=gen).contiguous(memory_format=torch.channels_last)
        xd = d.step(m, t, xd).prev_sample
        xf = f.step(m.to(torch.bfloat16), t, xf).prev_sample
        assert xf.dtype == torch.bfloat16 and xf.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(xf.float(), xd, rtol=3e-2, atol=3e-2)


# -- the diffusers contract --------------------------------------------------------------------


def test_signatures_match_diffusers():
    for method in ("set_timesteps", "step", "scale_model_input", "add_noise"):
        want = list(inspect.signature(getattr(UniPCMultistepScheduler, method)).parameters)
        got = list(inspect.signature(getattr(FusedUniPCMultistepScheduler, method)).parameters)
        assert got == want, method
    init = set(inspect.signature(FusedUniPCMultistepScheduler.__init__).parameters)
    assert init == set(inspect.signature(UniPCMultistepScheduler.__init__).parameters) | {
        "backend",
        "noise",
    }


def test_attributes_return_dict_and_config_roundtrip(tmp_path):
    d = UniPCMultistepScheduler(**WAN)
    f = FusedUniPCMultistepScheduler.from_config(d.config)
    assert isinstance(f, UniPCMultistepScheduler) and f.order == d.order == 1
    for s in (d, f):
        s.set_timesteps(5)
    assert f.step_index is None and f.begin_index is None
    assert torch.equal(f.timesteps, d.timesteps) and f.init_noise_sigma == d.init_noise_sigma
    x, m = randn(SHAPE), randn(SHAPE)
    assert torch.equal(f.scale_model_input(x, f.timesteps[0]), x)
    out = f.step(m, f.timesteps[0], x, return_dict=False)
    want = d.step(m, d.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and f.step_index == d.step_index == 1
    assert_close_step(out[0], want[0], "return_dict=False")
    f.save_pretrained(tmp_path)
    g = FusedUniPCMultistepScheduler.from_pretrained(tmp_path, backend="reference")
    assert g.backend == "reference" and "backend" not in g.config
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert strip(g.config) == strip(f.config)
    back = UniPCMultistepScheduler.from_pretrained(tmp_path)  # diffusers reads what we saved
    assert back.config.flow_shift == 3.0 and back.config.use_flow_sigmas


@pytest.mark.parametrize(
    "options,option",
    [
        ({"solver_p": UniPCMultistepScheduler()}, "solver_p"),
        ({"solver_order": 4}, "solver_order"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"use_flow_sigmas": True}, "use_flow_sigmas"),
        ({**WAN, "predict_x0": False}, "predict_x0"),
        ({"lower_order_final": False}, "lower_order_final"),
        ({"thresholding": True, "sample_max_value": 0.5}, "sample_max_value"),
    ],
)
def test_unsupported_options_raise_at_construction(options, option):
    with pytest.raises(ValueError, match=option):
        FusedUniPCMultistepScheduler(**options)


def test_bad_set_timesteps_arguments_leave_the_plan_alone():
    f = FusedUniPCMultistepScheduler(**{**WAN, "use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="mu"):
        f.set_timesteps(5)
    f.set_timesteps(5, mu=1.0)
    plan = f.timesteps.clone()
    for bad in ([0.9, 0.95, 0.5], [1.2, 0.5], [0.5, 0.0], [0.9, float("nan")]):
        with pytest.raises(ValueError, match="sigmas"):
            f.set_timesteps(sigmas=bad, mu=1.0)
        assert torch.equal(f.timesteps, plan)
    with pytest.raises(ValueError, match="sigmas"):  # diffusers: VP plans take no sigmas
        FusedUniPCMultistepScheduler().set_timesteps(sigmas=[0.9, 0.5])


def test_step_before_set_timesteps_raises():
    with pytest.raises(ValueError, match="set_timesteps"):
        FusedUniPCMultistepScheduler().step(randn(SHAPE), 999, randn(SHAPE))


# -- no host reads with device timesteps ------------------------------------------------------


def test_device_timesteps_no_host_reads(monkeypatch, seed):
    """Timesteps that live on the device (not elements of the plan tensor): the step index is
    found and advanced on the device, the rows come from a table made on the device at the
    chain's first step, and no tensor value is read on the host."""
    monkeypatch.setattr(base, "on_host", lambda t: False)
    inside = {"step": False}
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, _original=original, _name=name, **kwargs):
            if inside["step"]:
                raise AssertionError(f"host sync: Tensor.{_name} called inside step")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)
    d = UniPCMultistepScheduler(**{**WAN, "solver_order": 3})
    f = FusedUniPCMultistepScheduler.from_config(d.config, backend="triton")
    for s in (d, f):
        s.set_timesteps(6, device=DEVICE)
    zeros = torch.zeros(SHAPE, device=DEVICE)
    f.step(zeros, f.timesteps[0], zeros)  # build the tables (on the host) and upload them once
    f.set_timesteps(6, device=DEVICE)  # the same plan: the tables are kept
    plan = [t.clone() for t in d.timesteps]  # copies: not elements of the plan tensor
    gen = torch.Generator().manual_seed(seed)
    xd = randn(SHAPE, generator=gen)
    xf = xd.clone()
    scale = 0.0
    for t in plan:
        m = randn(SHAPE, generator=gen)
        xd_next = d.step(m, t, xd).prev_sample
        inside["step"] = True
        xf = f.step(m, t, xf).prev_sample
        inside["step"] = False
        assert isinstance(f.step_index, torch.Tensor)
        scale = max(scale, xd.abs().max().item())
        xd = xd_next
        assert_close_step(xf, xd, f"t={t}", scale)


# -- the mixture and the Wan pipeline ---------------------------------------------------------


def _flow_velocity(gmm: GaussianMixture, num_train_timesteps: int = 1000):
    """The exact velocity v = eps - x0 of ``x = (1 - s) x0 + s eps``, t = s T (diffusers'
    flow timesteps): the mixture's posterior mean at the VP point x / c, ab = (1 - s)^2 / c^2,
    c^2 = (1 - s)^2 + s^2."""

    def model(x, t):
        s = (t.double() / num_train_timesteps).reshape(-1, 1)
        c = ((1 - s) ** 2 + s**2).sqrt()
        x0 = gmm.posterior_mean(x / c, ((1 - s) / c).reshape(-1) ** 2)
        eps = (x.double() - (1 - s) * x0) / s
        return (eps - x0).to(x.dtype)

    return model


def _mismatches(gmm, x, z=5.0):
    fit = gmm.fit(x)
    w_se, mu_se, cov_se = gmm.fit_standard_errors(x.shape[0])
    bad = [f"{fit.num_nonfinite} non-finite"] if fit.num_nonfinite else []
    for name, got, want, se in (
        ("weight", fit.weights, gmm.weights, w_se),
        ("mean", fit.means, gmm.means, mu_se),
        ("covariance", fit.covariances, gmm.covariances, cov_se),
    ):
        bad += [f"{name}{i}" for i in (((got - want).abs() / se) > z).nonzero().tolist()]
    return bad


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_mode_reproduces_the_mixture_as_diffusers_does(backend, one_thread):
    """Wan's config, 15 steps, n = 2000: within 5 standard errors of the mixture (the odds
    of tests/test_distribution.py) and a fit (sliced W2) within 10% of diffusers' UniPC on
    the same initial noise. (At 10 steps both miss one covariance by ~5.5 SE: their shared
    discretization bias.)"""
    angles = torch.tensor([math.pi, math.pi / 3, -math.pi / 3], dtype=torch.float64)
    means = 6.0 * torch.stack([angles.cos(), angles.sin()], 1)
    covs = torch.stack([torch.diag(torch.tensor([0.8, 0.5], dtype=torch.float64))] * 3)
    gmm = GaussianMixture([0.5, 0.3, 0.2], means, covs)
    model = _flow_velocity(gmm)
    n = 2000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    results = []
    for s in (
        UniPCMultistepScheduler(**WAN),
        FusedUniPCMultistepScheduler(**WAN, backend=backend),
    ):
        s.set_timesteps(15, device=DEVICE)
        x = noise.clone()
        for t in s.timesteps:
            x = s.step(model(x, t.expand(n)), t, x).prev_sample
        results.append(x.cpu())
    theirs, ours = results
    assert _mismatches(gmm, ours) == []
    ours_w2, theirs_w2 = gmm.fit(ours).sliced_w2, gmm.fit(theirs).sliced_w2
    assert ours_w2 <= 1.1 * theirs_w2 + 1e-3, (ours_w2, theirs_w2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wan_pipeline_swap_gives_the_same_latents(backend):
    """WanPipeline with a tiny random WanTransformer3DModel (~7K parameters), prompt embeddings
    passed directly (no text encoder, no VAE: latent output), classifier-free guidance: the
    fused scheduler gives the stock scheduler's latents."""
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    transformer = transformer.eval().to(DEVICE)
    embeds = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    negative = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    stock = UniPCMultistepScheduler(**WAN)
    latents = []
    for scheduler in (
        stock,
        FusedUniPCMultistepScheduler.from_config(stock.config, backend=backend),
    ):
        pipe = diffusers.WanPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            scheduler=scheduler,
            transformer=transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            out = pipe(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative,
                height=16,
                width=16,
                num_frames=5,
                num_inference_steps=5,
                guidance_scale=4.0,
                generator=torch.Generator(DEVICE).manual_seed(0),
                output_type="latent",
            )
        latents.append(out.frames)
    scale = latents[0].abs().max().item()
    torch.testing.assert_close(latents[1], latents[0], rtol=1e-4, atol=1e-4 * max(1.0, scale))


# -- graphs -------------------------------------------------------------------------------------


def test_capture_denoising_loop_is_bitwise_the_eager_loop(monkeypatch):
    """fastdiff.graph.capture_denoising_loop (the eager stand-in runtime on the CPU): the step
    index is looked up on the device every step, the history is in device buffers."""
    from test_unipc import eager_runtime

    from fastdiff import graph as graph_module

    runtime = eager_runtime(monkeypatch)
    monkeypatch.setattr(base, "on_host", lambda t: False)  # t as a CUDA tensor would be
    f = FusedUniPCMultistepScheduler(**{**WAN, "solver_order": 3}, backend="triton")
    f.set_timesteps(6)
    weight = randn(SHAPE)

    def step_fn(latents, t):
        return f.step(torch.tanh(latents * weight), t, latents).prev_sample

    x = randn(SHAPE)
    eager = x.clone()
    for t in f.timesteps:
        eager = step_fn(eager, t)
    f.set_timesteps(6)
    try:
        loop = graph_module.capture_denoising_loop(step_fn, x, scheduler=f, **runtime)
    except ValueError as err:
        if "multistep history in Python" in str(err):
            pytest.skip(
                "this fastdiff.graph refuses schedulers with model_outputs (it takes "
                "check_capturable() in the newer graph module)"
            )
        raise
    assert torch.equal(loop.run(x), eager)
    assert torch.equal(loop.run(x), eager)


@pytest.mark.gpu
@pytest.mark.parametrize("flow", [False, True])
def test_gpu_loop_has_no_host_sync_and_captures(flow):
    device = torch.device("cuda")
    config = WAN if flow else {"solver_order": 3, "prediction_type": "v_prediction"}
    f = FusedUniPCMultistepScheduler(**config, backend="triton")
    d = UniPCMultistepScheduler(**config)
    shape = (2, 4, 16, 16)
    x_in = torch.randn(shape, device=device)
    weight = torch.randn(shape, device=device)

    def loop(s):
        x = x_in.clone()
        for t in s.timesteps:
            x = s.step(torch.tanh(x * weight), t, x).prev_sample
        return x

    for s in (f, d):
        s.set_timesteps(6, device=device)
    want = loop(d)
    f.set_timesteps(6, device=device)
    eager = loop(f)  # tables built and uploaded, kernels compiled
    torch.testing.assert_close(
        eager, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item())
    )
    f.set_timesteps(6, device=device)  # same plan: tables kept
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = loop(f)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(again, eager)
    f.set_timesteps(6, device=device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = loop(f)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_index_past_the_plan_is_the_poison_row(backend, as_device):
    """A step with a device step index past the plan (diffusers runs off its end there) gives
    NaN on both backends, the kernel's poison row, not an IndexError on the reference one."""
    f = FusedUniPCMultistepScheduler(backend=backend)
    f.set_timesteps(4, device=DEVICE)
    x, m = randn(SHAPE), randn(SHAPE)
    for k in range(4):
        out = f.step(m, f.timesteps[k].clone(), x).prev_sample  # a copy: the device lookup
        assert torch.isfinite(out).all()
    f.prepare_graph_step(torch.tensor(4, device=DEVICE))
    assert torch.isnan(f.step(m, f.timesteps[-1].clone(), x).prev_sample).all()
