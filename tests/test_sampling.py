"""The sampling loop (fastdiff.sampling.sample): noise, seeds, guidance, truncation, errors.

Everything runs on the CPU with the reference backend and a tiny Gaussian-mixture denoiser
(exact, so every output is finite and meaningful). Comparisons of two runs that must be the
same computation are exact (``torch.equal``): every op in the loop is row-wise, so a sample
cannot depend on its batch neighbours, and rounding does not either.
"""

import functools

import pytest
import torch
from conftest import random_mixture

from fastdiff import philox
from fastdiff.loop import SamplingStep
from fastdiff.philox import seeds_from
from fastdiff.samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    EulerAncestralSampler,
)
from fastdiff.sampling import guidance_pair, start_index
from fastdiff.sampling import sample as _sample
from fastdiff.schedules import NoiseSchedule

# CPU tests (the reference backend), also on a machine with a GPU, where sample() would
# otherwise default to CUDA.
sample = functools.partial(_sample, device="cpu")
SCHEDULE = NoiseSchedule.create("linear", 1000)
D = 3

GMM = random_mixture(seed=1234, dim=D)
MODEL = GMM.denoiser(SCHEDULE)


# The loops here run many small ops: one intra-op thread (conftest.py) for every test.
pytestmark = pytest.mark.usefixtures("one_thread")


def _sampler(name="ddpm", steps=8, **kwargs):
    return SAMPLERS[name](SCHEDULE, steps, backend="reference", **kwargs)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_determinism(name, dtype):
    sampler = _sampler(name)
    a = sample(MODEL, sampler, shape=(5, D), seed=3, dtype=dtype, progress=False)
    b = sample(MODEL, sampler, shape=(5, D), seed=3, dtype=dtype, progress=False)
    c = sample(MODEL, sampler, shape=(5, D), seed=4, dtype=dtype, progress=False)
    assert a.shape == (5, D) and a.dtype == dtype and a.device.type == "cpu"
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral", "dpmpp_2m"])
def test_sample_does_not_depend_on_batch(name):
    sampler = _sampler(name)
    small = sample(MODEL, sampler, shape=(3, D), seed=11, progress=False)
    large = sample(MODEL, sampler, shape=(5, D), seed=11, progress=False)
    assert torch.equal(small, large[:3])
    # Explicit per-sample seeds: a sample follows its seed wherever it sits in the batch.
    seeds = torch.tensor([2**40 + 7, 3, 99, 12345], dtype=torch.int64)
    x = sample(MODEL, sampler, shape=(4, D), seeds=seeds, progress=False)
    y = sample(MODEL, sampler, shape=(2, D), seeds=seeds[[2, 0]], progress=False)
    assert torch.equal(x[[2, 0]], y)


def test_int_seed_rule_and_explicit_noise():
    assert torch.equal(seeds_from(5, 3), torch.tensor([5 * 2**32, 5 * 2**32 + 1, 5 * 2**32 + 2]))
    sampler = _sampler("ddpm")
    by_seed = sample(MODEL, sampler, shape=(4, D), seed=5, progress=False)
    by_seeds = sample(MODEL, sampler, shape=(4, D), seeds=seeds_from(5, 4), progress=False)
    assert torch.equal(by_seed, by_seeds)
    # The initial noise is Philox stream 1, step 0 of the same seeds.
    noise = philox.randn(seeds_from(5, 4), 0, (4, D), stream=1)
    by_x = sample(MODEL, sampler, x=noise, seed=5, progress=False)
    assert torch.equal(by_seed, by_x)


def test_callback_sees_every_step():
    sampler = _sampler("dpmpp_2m", 7)
    seen = []

    def callback(i, x, x0):
        assert x.shape == (2, D) and x0.shape == (2, D)
        seen.append(i)

    out = sample(MODEL, sampler, shape=(2, D), callback=callback, progress=False)
    assert seen == list(range(sampler.num_steps))
    # The loop's x0_prev is the previous step's x0: a manual loop with the sampler agrees.
    x = philox.randn(seeds_from(0, 2), 0, (2, D), stream=1)
    x0_prev = torch.zeros_like(x)
    for i in range(sampler.num_steps):
        step = sampler.step(x, MODEL(x, sampler.model_condition(i, 2, "cpu")), i, x0_prev=x0_prev)
        x, x0_prev = step.prev_sample, step.pred_original_sample
    assert torch.equal(out, x)


def test_progress_bar(capsys):
    sample(MODEL, _sampler("ddim", 3), shape=(2, D), progress=False)
    assert capsys.readouterr().err == ""
    sample(MODEL, _sampler("ddim", 3), shape=(2, D), progress=True)
    assert "DDIMSampler" in capsys.readouterr().err


def test_guidance_halves_order():
    # A model predicting x0 ("sample") that returns U for the first half and C for the second;
    # one DDIM step to clean returns the guided x0 = U + w (C - U) itself.
    calls = []

    def model(x, cond):
        calls.append((x.clone(), cond.clone()))
        b = x.shape[0] // 2
        return torch.cat([torch.full_like(x[:b], -1.0), torch.full_like(x[b:], 2.0)])

    sampler = DDIMSampler(SCHEDULE, 1, prediction_type="sample", backend="reference")
    out = sample(model, sampler, shape=(3, 4), guidance_scale=3.0, progress=False)
    torch.testing.assert_close(out, torch.full((3, 4), -1.0 + 3.0 * (2.0 + 1.0)))
    x2, c2 = calls[0]
    assert x2.shape == (6, 4) and torch.equal(x2[:3], x2[3:])
    assert c2.shape == (6,) and torch.equal(c2[:3], c2[3:])


def test_guidance_pair_and_rescale():
    uncond = GMM.denoiser(SCHEDULE, "sample")
    cond = GMM.denoiser(SCHEDULE, "sample", component=1)
    model = guidance_pair(uncond, cond)
    x = torch.randn(6, D)
    t = torch.full((6,), 400.0)
    out = model(x, t)
    assert torch.equal(out[:3], uncond(x[:3], t[:3])) and torch.equal(out[3:], cond(x[3:], t[3:]))
    sampler = DDIMSampler(SCHEDULE, 4, prediction_type="sample", backend="reference")
    a = sample(model, sampler, shape=(4, D), guidance_scale=2.0, progress=False)
    b = sample(
        model, sampler, shape=(4, D), guidance_scale=2.0, guidance_rescale=0.7, progress=False
    )
    assert torch.isfinite(b).all() and not torch.equal(a, b)


def test_classifier_guidance_grad():
    sampler = _sampler("ddpm", 6)
    base = sample(MODEL, sampler, shape=(3, D), seed=2, progress=False)
    zero = sample(
        MODEL,
        sampler,
        shape=(3, D),
        seed=2,
        cond_fn=lambda x, c: torch.zeros_like(x),
        progress=False,
    )
    assert torch.equal(base, zero)
    seen = []

    def push(x, cond):
        seen.append(cond.shape)
        return torch.full_like(x, 5.0)

    pushed = sample(MODEL, sampler, shape=(3, D), seed=2, cond_fn=push, progress=False)
    assert seen == [(3,)] * sampler.num_steps
    assert (pushed > base).all()  # mean += variance * grad with a positive grad


@pytest.mark.parametrize(
    "num_steps,strength,start",
    [(50, 1.0, 0), (50, 0.5, 25), (50, 0.3, 35), (10, 0.25, 7), (10, 0.35, 6), (50, 0.001, 49)],
)
def test_start_index_rule(num_steps, strength, start):
    # start = num_steps - max(1, round_half_up(strength * num_steps))
    assert start_index(num_steps, strength) == start


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_truncated_chain_starts_from_noised_image(name):
    sampler = _sampler(name, 10)
    init = torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    inputs, steps = [], []

    def model(x, cond):
        inputs.append(x.clone())
        return MODEL(x, cond)

    sample(
        model,
        sampler,
        x=noise,
        init_image=init,
        strength=0.35,
        callback=lambda i, x, x0: steps.append(i),
        progress=False,
    )
    start = 10 - 4  # round(3.5) = 4 steps
    assert steps == list(range(start, 10))
    expected = SCHEDULE.add_noise(init, noise, int(sampler.timesteps[start]))
    torch.testing.assert_close(inputs[0], expected, rtol=0, atol=0)


def test_truncated_multistep_chain_starts_first_order():
    sampler = _sampler("dpmpp_2m", 10)
    init = torch.randn(3, D, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(3, D, generator=torch.Generator().manual_seed(3))
    out = sample(MODEL, sampler, x=noise, init_image=init, strength=0.5, progress=False)
    # Manual loop: first order on its first step (no previous x0), then second order.
    start = 5
    x = SCHEDULE.add_noise(init, noise, int(sampler.timesteps[start]))
    x0_prev = None
    for i in range(start, 10):
        step = sampler.step(x, MODEL(x, sampler.model_condition(i, 3, "cpu")), i, x0_prev=x0_prev)
        x, x0_prev = step.prev_sample, step.pred_original_sample
    # Same math in two forms (a second-order step with x0_prev == x0 vs a first-order step):
    # float32 rounding of a few operations on O(1) values.
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_errors():
    sampler = _sampler("ddpm", 4)
    with pytest.raises(TypeError, match="callable"):
        sample("not a model", sampler, shape=(2, D))
    with pytest.raises(TypeError, match="sampler"):
        sample(MODEL, object(), shape=(2, D))
    with pytest.raises(ValueError, match="not both"):
        sample(MODEL, sampler, shape=(2, D), x=torch.zeros(2, D))
    with pytest.raises(ValueError, match="give shape"):
        sample(MODEL, sampler)
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        sample(MODEL, sampler, shape=(2, D), seeds=torch.arange(3))
    with pytest.raises(TypeError, match="seeds"):
        sample(MODEL, sampler, shape=(2, D), seeds=torch.zeros(2))
    with pytest.raises(ValueError, match="seed"):
        sample(MODEL, sampler, shape=(2, D), seed=-1)
    with pytest.raises(ValueError, match=r"\[2B=4"):
        half = lambda x, c: x[: x.shape[0] // 2]  # noqa: E731  (forgets the unconditional half)
        sample(half, sampler, shape=(2, D), guidance_scale=2.0, progress=False)
    with pytest.raises(ValueError, match="returned batch 4"):
        sample(lambda x, c: torch.cat([x, x]), sampler, shape=(2, D), progress=False)
    with pytest.raises(TypeError, match="return a tensor"):
        sample(lambda x, c: None, sampler, shape=(2, D), progress=False)
    init = torch.zeros(2, D)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="strength"):
            sample(MODEL, sampler, init_image=init, strength=bad)
    with pytest.raises(ValueError, match="strength applies only with init_image"):
        sample(MODEL, sampler, shape=(2, D), strength=0.5)
    with pytest.raises(ValueError, match="init_image has shape"):
        sample(MODEL, sampler, shape=(3, D), init_image=init, strength=0.5)
    with pytest.raises(ValueError, match="init_image has shape"):
        sample(MODEL, sampler, x=torch.zeros(2, D + 1), init_image=init, strength=0.5)
    with pytest.raises(ValueError, match="guidance_rescale needs guidance_scale"):
        sample(MODEL, sampler, shape=(2, D), guidance_rescale=0.5)
    with pytest.raises(TypeError, match="shape"):
        sample(MODEL, sampler, shape=(2, 1.5))
    with pytest.raises(TypeError, match="cond_fn"):
        sample(MODEL, sampler, shape=(2, D), cond_fn=3)


def test_samplers_of_other_kinds_run_in_the_loop():
    # Every native sampler class with non-default options goes through the same loop.
    for sampler in (
        DDPMSampler(SCHEDULE, "4,3", variance_type="fixed_large", backend="reference"),
        DDIMSampler(SCHEDULE, 5, eta=1.0, backend="reference"),
        EulerAncestralSampler(SCHEDULE, 5, eta=0.5, backend="reference"),
        DPMSolverPP2MSampler(SCHEDULE, 5, timestep_spacing="trailing", backend="reference"),
    ):
        out = sample(MODEL, sampler, shape=(3, D), progress=False)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_loop_with_fused_kernels_matches_reference(name, device):
    # The loop on the fused kernels (on the card, or under the Triton interpreter on the CPU)
    # against the reference, with the same Philox noise; also a truncated multistep chain,
    # whose first step the loop makes first order. Tolerance: the kernel works in float32
    # from a float32 coefficient table, the reference in float32 from float64 schedule values;
    # over 3 steps on O(1) data the two differ by ~1e-6 (measured), bounded here by 1e-4.
    kwargs = {"timestep_spacing": "trailing"}
    fused = SAMPLERS[name](SCHEDULE, 3, backend="triton", **kwargs)
    ref = SAMPLERS[name](SCHEDULE, 3, backend="reference", **kwargs)
    a = _sample(MODEL, fused, shape=(3, D), seed=9, device=device, progress=False)
    b = _sample(MODEL, ref, shape=(3, D), seed=9, device=device, progress=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    init = torch.randn(3, D, generator=torch.Generator().manual_seed(4)).to(device)
    a = _sample(MODEL, fused, init_image=init, strength=0.7, seed=9, progress=False)
    b = _sample(MODEL, ref, init_image=init, strength=0.7, seed=9, progress=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class ChannelsLastConv(torch.nn.Module):
    """A conv model with channels_last weights: its output is channels_last even for a
    contiguous input (what PyTorch's convolutions do), as in a model converted with
    ``model.to(memory_format=torch.channels_last)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1).to(memory_format=torch.channels_last)

    def forward(self, x, cond):
        out = torch.tanh(self.conv(x)) * (cond[:, None, None, None] / 1000)
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        return out


def test_channels_last_model(monkeypatch, device):
    # Same samples on both backends; the kernel path lays the model output out like x. The
    # graphed loop (through the eager stand-in runtime) gives bitwise the eager samples.
    from graph_fakes import EagerRuntime

    from fastdiff import capture

    monkeypatch.setattr(capture, "make_runtime", EagerRuntime)
    model = ChannelsLastConv().to(device)
    out = {}
    with torch.no_grad():
        for backend in ("reference", "triton"):
            sampler = SAMPLERS["dpmpp_2m"](SCHEDULE, 4, backend=backend)
            for graphed in (False, True):
                out[backend, graphed] = sample(
                    model,
                    sampler,
                    shape=(2, 2, 5, 3),
                    seed=1,
                    device=device,
                    progress=False,
                    cuda_graph=graphed,
                )
            assert torch.equal(out[backend, True], out[backend, False]), backend
    assert torch.isfinite(out["triton", False]).all()
    torch.testing.assert_close(out["triton", False], out["reference", False], rtol=1e-4, atol=1e-4)


def test_step_body_condition_is_one_kind_of_tensor():
    # The eager loop (an int step) and a graph (a 0-d counter) give the model the same kind
    # of conditioning tensor: a torch.compile'd model then runs one compiled graph in both.
    sampler = _sampler("ddim", 5)
    step = SamplingStep(MODEL, sampler)
    for i in range(5):
        by_int = step.condition(i, 3, torch.device("cpu"))
        by_counter = step.condition(torch.tensor(i), 3, torch.device("cpu"))
        assert torch.equal(by_int, sampler.model_condition(i, 3, "cpu"))
        assert torch.equal(by_int, by_counter) and by_int.dtype == torch.float32
        for cond in (by_int, by_counter):
            assert cond.stride() == (1,) and cond.storage_offset() == 0
