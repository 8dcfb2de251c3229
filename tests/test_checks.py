"""Bad arguments at the public boundary: the same clear error on both backends, naming the
argument, with the inputs untouched after it (the checks of fastdiff.checks)."""

import pytest
import torch

from fastdiff import checks
from fastdiff.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    EulerAncestralSampler,
    EulerSampler,
)
from fastdiff.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.create("linear", 1000)
BACKENDS = ["triton", "reference"]

# (sampler factory, error, message); each builds a sampler with a bad argument.
INIT_CASES = {
    "prediction_type eps": (
        lambda b: DDIMSampler(SCHEDULE, 10, prediction_type="eps", backend=b),
        ValueError,
        r"unknown prediction_type 'eps'.*'epsilon', 'sample'",
    ),
    "prediction_type x0": (
        lambda b: DDPMSampler(SCHEDULE, 10, prediction_type="x0", backend=b),
        ValueError,
        r"unknown prediction_type 'x0'.*'v_prediction'",
    ),
    "variance_type": (
        lambda b: DDPMSampler(SCHEDULE, 10, variance_type="small", backend=b),
        ValueError,
        r"unknown variance_type 'small'.*'fixed_small'.*'learned",
    ),
    "clip and thresholding": (
        lambda b: DDPMSampler(
            SCHEDULE, 10, clip_sample_range=1.0, thresholding=(0.99, 1.0), backend=b
        ),
        ValueError,
        r"clip_sample_range and thresholding are exclusive",
    ),
    "thresholding not a pair": (
        lambda b: DDIMSampler(SCHEDULE, 10, thresholding=0.9, backend=b),
        ValueError,
        r"thresholding must be a \(ratio, max_value\) pair",
    ),
    "thresholding ratio": (
        lambda b: DDIMSampler(SCHEDULE, 10, thresholding=(1.5, 1.0), backend=b),
        ValueError,
        r"thresholding ratio must be in \(0, 1\]",
    ),
    "thresholding max_value": (
        lambda b: DDIMSampler(SCHEDULE, 10, thresholding=(0.9, 0.5), backend=b),
        ValueError,
        r"thresholding max_value must be >= 1",
    ),
    "clip range": (
        lambda b: DDIMSampler(SCHEDULE, 10, clip_sample_range=-1.0, backend=b),
        ValueError,
        r"clip_sample_range must be a positive number",
    ),
    "ddim eta": (
        lambda b: DDIMSampler(SCHEDULE, 10, eta=-0.1, backend=b),
        ValueError,
        r"eta must be >= 0(\.0)?, got -0.1",
    ),
    "euler ancestral eta": (
        lambda b: EulerAncestralSampler(SCHEDULE, 10, eta=-1.0, backend=b),
        ValueError,
        r"eta must be >= 0",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(INIT_CASES))
def test_bad_sampler_arguments(case, backend):
    make, error, message = INIT_CASES[case]
    with pytest.raises(error, match=message):
        make(backend)


def _x():
    return torch.randn(2, 3, 4, 5)


# (sampler class and kwargs, step arguments from x, error, message)
STEP_CASES = {
    "model_output shape": (
        (EulerSampler, {}),
        lambda x: dict(model_output=x[:, :2]),
        ValueError,
        r"model_output must have the shape of x \(2, 3, 4, 5\)",
    ),
    "broadcastable model_output": (
        (DDIMSampler, {}),
        lambda x: dict(model_output=x[:1]),
        ValueError,
        r"model_output must have the shape of x",
    ),
    "learned variance channels": (
        (DDPMSampler, {"variance_type": "learned_range"}),
        lambda x: dict(noise=torch.randn_like(x)),
        ValueError,
        r"needs model_output of shape \(2, 6, 4, 5\).*2x channels",
    ),
    "guidance doubles the batch": (
        (DDIMSampler, {}),
        lambda x: dict(guidance_scale=7.5),
        ValueError,
        r"guidance doubles the batch",
    ),
    "x0_prev shape": (
        (DPMSolverPP2MSampler, {}),
        lambda x: dict(x0_prev=x[:1]),
        ValueError,
        r"x0_prev must have the shape of x",
    ),
    "noise shape": (
        (DDPMSampler, {}),
        lambda x: dict(noise=torch.randn(2, 3, 4)),
        ValueError,
        r"noise must have the shape of x",
    ),
    "grad shape": (
        (DDIMSampler, {"eta": 0.5}),
        lambda x: dict(noise=torch.randn_like(x), grad=torch.randn(1, 3, 4, 5)),
        ValueError,
        r"grad must have the shape of x",
    ),
    "integer x": (
        (DDIMSampler, {}),
        lambda x: dict(x=x.long()),
        TypeError,
        r"x must be a floating-point tensor, got dtype torch.int64",
    ),
    "integer model_output": (
        (DDPMSampler, {}),
        lambda x: dict(model_output=x.int(), noise=x),
        TypeError,
        r"model_output must be a floating-point tensor",
    ),
    "integer noise": (
        (EulerAncestralSampler, {}),
        lambda x: dict(noise=x.int()),
        TypeError,
        r"noise must be a floating-point tensor",
    ),
    "seeds a list": (
        (DDPMSampler, {}),
        lambda x: dict(seeds=[0, 1]),
        TypeError,
        r"seeds must be a 1-D int64 tensor",
    ),
    "seeds count": (
        (DDPMSampler, {}),
        lambda x: dict(seeds=torch.arange(3)),
        ValueError,
        r"3 seeds for a batch of 2",
    ),
    "noise and seeds": (
        (DDPMSampler, {}),
        lambda x: dict(noise=torch.randn_like(x), seeds=torch.arange(2)),
        ValueError,
        r"pass either noise or seeds, not both",
    ),
    "no noise": (
        (EulerAncestralSampler, {}),
        lambda x: dict(),
        ValueError,
        r"adds noise: pass noise= or seeds=",
    ),
    "guidance_scale nan": (
        (DDIMSampler, {}),
        lambda x: dict(model_output=torch.cat([x, x]), guidance_scale=float("nan")),
        ValueError,
        r"guidance_scale must be finite",
    ),
    "guidance_rescale above 1": (
        (DDIMSampler, {}),
        lambda x: dict(model_output=torch.cat([x, x]), guidance_scale=5.0, guidance_rescale=2.0),
        ValueError,
        r"guidance_rescale must be <= 1",
    ),
    "guidance_rescale without a scale": (
        (DDIMSampler, {}),
        lambda x: dict(guidance_rescale=0.5),
        ValueError,
        r"guidance_rescale needs guidance_scale",
    ),
    "rescale of one element a sample": (
        (DDIMSampler, {}),
        lambda x: dict(
            x=x[:, :1, :1, :1],
            model_output=torch.cat([x, x])[:, :1, :1, :1],
            guidance_scale=5.0,
            guidance_rescale=0.5,
        ),  # fmt: skip
        ValueError,
        r"guidance rescale needs a per-sample std",
    ),
    "step index a float": (
        (DDIMSampler, {}),
        lambda x: dict(i=0.5),
        TypeError,
        r"step index must be an int or an integer tensor",
    ),
    "step index past the end": (
        (DDIMSampler, {}),
        lambda x: dict(i=10),
        IndexError,
        r"step index 10 outside \[0, 10\)",
    ),
    "per-sample step index shape": (
        (DDIMSampler, {}),
        lambda x: dict(i=torch.tensor([1, 2, 3])),
        ValueError,
        r"per-sample step index must have shape \[2\], got \(3,\)",
    ),
    "integer out": (
        (DDIMSampler, {}),
        lambda x: dict(out=torch.zeros(x.shape, dtype=torch.int64)),
        TypeError,
        r"out must be a floating-point tensor",
    ),
    "broadcastable out": (
        (DDIMSampler, {}),
        lambda x: dict(out=torch.zeros(1, 3, 4, 5)),
        ValueError,
        r"out must have the shape of x",
    ),
    "out laid out differently": (
        (DDIMSampler, {}),
        lambda x: dict(out=torch.zeros_like(x).to(memory_format=torch.channels_last)),
        ValueError,
        r"out must be laid out like x",
    ),
    "bad x0_out with out=x": (
        (DPMSolverPP2MSampler, {}),
        lambda x: dict(out=x, x0_out=torch.zeros(2, 3, 4)),
        ValueError,
        r"x0_out must have the shape of x",
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_bad_step_arguments(case, backend):
    (cls, kwargs), arguments, error, message = STEP_CASES[case]
    sampler = cls(SCHEDULE, 10, backend=backend, **kwargs)
    x = _x()
    args = {"x": x, "model_output": torch.randn_like(x), "i": 3, **arguments(x)}
    tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
    before = {k: v.clone() for k, v in tensors.items()}
    with pytest.raises(error, match=message):
        sampler.step(args.pop("x"), args.pop("model_output"), args.pop("i"), **args)
    for name, value in tensors.items():  # nothing was written before the error
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("i", [-1, 10])
def test_model_condition_refuses_a_step_outside_the_plan(i):
    sampler = DDIMSampler(SCHEDULE, 10)
    with pytest.raises(IndexError, match=f"step index {i} outside"):
        sampler.model_condition(i, 2, "cpu")


def test_validators_normalize_and_name_the_argument():
    assert checks.check_guidance(7, 0) == (7.0, 0.0)
    assert checks.check_guidance(None) == (None, 0.0)
    assert checks.check_processing(None, [0.9, 2]) == (None, (0.9, 2.0))
    assert checks.check_clip_range(2) == 2.0
    with pytest.raises(ValueError, match="clip_range must be a positive number"):
        checks.check_clip_range(float("inf"))
    with pytest.raises(ValueError, match="x0_prev is on meta"):
        checks.check_like("x0_prev", torch.zeros(2, device="meta"), torch.zeros(2))
    with pytest.raises(ValueError, match="seeds are on meta"):
        checks.check_seeds(torch.zeros(2, dtype=torch.int64, device="meta"), 2, torch.device("cpu"))
    x = torch.zeros(2, 3)
    assert checks.check_model_output(torch.zeros(4, 3), x, guided=True) is not None
    with pytest.raises(ValueError, match="variance_type 'learned' needs x with channels"):
        checks.check_model_output(torch.zeros(2), torch.zeros(2), variance_type="learned")
