"""UniPC: the reference math, the fused kernel's UniPC switch and the native UniPCSampler.

1. The reference (fastdiff.reference, UniPC section) against closed forms: UniP-1 is DDIM,
   UniP-2 with bh2 is DPM-Solver++(2M), UniC-1 with bh2 is the trapezoidal rule; and
   UniP-3, UniC-2 and UniC-3 integrate a data / noise prediction that is a polynomial in
   lambda of their degree exactly (the order condition of Zhao et al. 2023, Theorem 3.1),
   in float64 to 1e-10, for both B(h).
2. The native sampler against diffusers' UniPCMultistepScheduler on the same plan, both
   backends (the reference path and the kernel's tables: a wrong table is caught).
3. The kernel against the reference for one step from a given state (history ring, last
   sample): every dtype and layout, outputs and written slots poisoned with NaN first
   (tolerances in conftest.py).
4. Chains: truncated chains (a python int index restarts the chain), begin_chain with
   tensor indices, a step run twice, SamplingGraph (eager stand-in runtime) bitwise equal to
   the eager loop.
5. The GMM mixture is reproduced as well as diffusers' UniPC does at the same step count.
"""

import functools
import math

import pytest
import torch
from conftest import TOLERANCES

from fastdiff import reference
from fastdiff.gmm import GaussianMixture
from fastdiff.kernels.fused_step import fused_step
from fastdiff.sampling import sample as _sample
from fastdiff.schedules import NoiseSchedule
from fastdiff.unipc import UniPCSampler
from fastdiff.unipc_tables import ring_slots, step_orders, unipc_table

F64 = torch.float64
SCHEDULE = NoiseSchedule.create("linear", 1000)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
sample = functools.partial(_sample, device="cpu", progress=False)


def _vp(ab: float) -> tuple[float, float]:
    return math.sqrt(ab), math.sqrt(1.0 - ab)


def _lam(alpha: float, sigma: float) -> float:
    return math.log(alpha / sigma)


# -- 1. the reference against closed forms -------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_unip1_is_ddim(prediction_type, predict_x0):
    x, m = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    ab, ab_next = 0.3, 0.7
    (a, s), (a1, s1) = _vp(ab), _vp(ab_next)
    got, corrected, _ = reference.unipc_step(
        x, m, (a1, a), (s1, s), predict_x0=predict_x0, prediction_type=prediction_type
    )
    want, _ = reference.ddim_step(x, m, ab, ab_next, eta=0.0, prediction_type=prediction_type)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(corrected, x)  # no corrector


def test_unip2_bh2_is_dpmpp_2m():
    x, m, x0_prev = (torch.randn(3, 4, dtype=F64) for _ in range(3))
    ab_prev, ab, ab_next = 0.1, 0.3, 0.7
    (a0, s0), (a, s), (a1, s1) = _vp(ab_prev), _vp(ab), _vp(ab_next)
    got, _, _ = reference.unipc_step(
        x, m, (a1, a, a0), (s1, s, s0), history=(x0_prev,), predictor_order=2, solver_type="bh2"
    )
    want, _ = reference.dpmpp_multistep_step(x, m, ab, ab_next, history=[(x0_prev, ab_prev)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_unic1_bh2_is_the_trapezoidal_rule():
    last, x, m, m_prev = (torch.randn(2, 5, dtype=F64) for _ in range(4))
    (a0, s0), (a, s), (a1, s1) = _vp(0.2), _vp(0.5), _vp(0.8)
    _, corrected, converted = reference.unipc_step(
        x,
        m,
        (a1, a, a0),
        (s1, s, s0),
        history=(m_prev,),
        last_sample=last,
        corrector_order=1,
        prediction_type="sample",
    )
    h = _lam(a, s) - _lam(a0, s0)
    want = s / s0 * last + a * (1 - math.exp(-h)) * (m_prev + m) / 2
    torch.testing.assert_close(converted, m)
    torch.testing.assert_close(corrected, want, rtol=1e-12, atol=1e-12)


def _integral(coefs, lam_s, lam_t, sign):
    """int_{lam_s}^{lam_t} e^(sign lam) P(lam) dlam for P(lam) = sum_j coefs[j] lam^j."""

    def antiderivative(lam):
        # d/dl [e^(sl) sum_i (-1/s)^i P^(i)(l) / s] = e^(sl) P(l)
        total = 0.0
        degree = len(coefs) - 1
        for i in range(degree + 1):
            deriv = sum(coefs[j] * math.perm(j, i) * lam ** (j - i) for j in range(i, degree + 1))
            total = total + (-1.0 / sign) ** i * deriv / sign
        return math.exp(sign * lam) * total

    return antiderivative(lam_t) - antiderivative(lam_s)


# (the update, its order, the polynomial degree it integrates exactly)
EXACT = [("predictor", 3, 2), ("corrector", 2, 2), ("corrector", 3, 3)]


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("kind,order,degree", EXACT, ids=[f"{k}{o}" for k, o, _ in EXACT])
def test_exact_for_polynomials_in_lambda(kind, order, degree, predict_x0, solver_type):
    """A model whose prediction is P(lambda), a polynomial of the update's degree: the
    exponential integrator's exact solution (Lu et al. 2022 eq. 9 / DPM-Solver eq. 3:
    x_t = sigma_t/sigma_s x_s + sigma_t int e^lam x0 (data) or alpha_t/alpha_s x_s - alpha_t
    int e^-lam eps (noise)) is what the update gives."""
    g = torch.Generator().manual_seed(order * 10 + degree)
    coefs = [torch.randn(2, 3, generator=g, dtype=F64) for _ in range(degree + 1)]
    abs_ = [0.08, 0.2, 0.38, 0.6, 0.85]  # t_{k-3} .. t_{k+1}: log-SNR steps of 0.5 to 1.1
    points = [_vp(ab) for ab in reversed(abs_)]  # newest first: t_{k+1}, t_k, t_{k-1}, ...
    lams = [_lam(a, s) for a, s in points]

    def poly(lam):
        return sum(c * lam**j for j, c in enumerate(coefs))

    history = [poly(lam) for lam in lams[2:]]
    x = torch.randn(2, 3, generator=g, dtype=F64)
    kw = dict(
        predict_x0=predict_x0,
        solver_type=solver_type,
        prediction_type="sample" if predict_x0 else "epsilon",
        history=history,
    )
    alpha, sigma = [a for a, _ in points], [s for _, s in points]
    sign = 1.0 if predict_x0 else -1.0
    if kind == "predictor":
        got, _, _ = reference.unipc_step(
            x, poly(lams[1]), alpha, sigma, predictor_order=order, **kw
        )
        (a_t, s_t), (a_s, s_s), lam_s, lam_t, start = points[0], points[1], lams[1], lams[0], x
    else:
        last = torch.randn(2, 3, generator=g, dtype=F64)
        _, got, _ = reference.unipc_step(
            x, poly(lams[1]), alpha, sigma, last_sample=last, corrector_order=order, **kw
        )
        (a_t, s_t), (a_s, s_s), lam_s, lam_t, start = points[1], points[2], lams[2], lams[1], last
    integral = _integral(coefs, lam_s, lam_t, sign)
    if predict_x0:
        want = s_t / s_s * start + s_t * integral
    else:
        want = a_t / a_s * start - a_t * integral
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_unip2_is_not_exact_for_lines():
    """The check above can fail: UniP-2's fixed weight 1/2 (not the solve) is not exact."""
    coefs = [torch.ones(1, 1, dtype=F64), torch.ones(1, 1, dtype=F64)]
    points = [_vp(0.6), _vp(0.38), _vp(0.2)]
    lams = [_lam(a, s) for a, s in points]
    x = torch.zeros(1, 1, dtype=F64)
    got, _, _ = reference.unipc_step(
        x,
        coefs[0] + coefs[1] * lams[1],
        [a for a, _ in points],
        [s for _, s in points],
        history=[coefs[0] + coefs[1] * lams[2]],
        predictor_order=2,
        prediction_type="sample",
    )
    s_t = points[0][1]
    want = s_t * _integral(coefs, lams[1], lams[0], 1.0)
    assert (got - want).abs().item() > 1e-4


def test_rhos_corrector2_closed_form():
    r = torch.tensor([[-0.8]], dtype=F64)
    hh = torch.tensor([-0.6], dtype=F64)
    got = reference.unipc_rhos(r, hh, 2, "bh2", corrector=True)[0]
    b1, b2 = (t[0] / math.expm1(-0.6) for t in reference.unipc_phi_terms(hh, 2))
    rho1 = (b1 - b2) / (1 - (-0.8))  # rho1 + rho2 = b1, r1 rho1 + rho2 = b2
    torch.testing.assert_close(got, torch.stack([rho1, b1 - rho1]), rtol=1e-12, atol=1e-12)


# -- 2. the native sampler against diffusers ---------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_sampler_matches_diffusers(order, solver_type, predict_x0, backend, device):
    diffusers = pytest.importorskip("diffusers")
    prediction_type = ["epsilon", "v_prediction", "sample"][order - 1]
    options = dict(
        solver_order=order,
        solver_type=solver_type,
        predict_x0=predict_x0,
        prediction_type=prediction_type,
        disable_corrector=[2],
    )
    d = diffusers.UniPCMultistepScheduler(timestep_spacing="trailing", **options)
    d.set_timesteps(6)
    s = UniPCSampler(SCHEDULE, d.timesteps.tolist(), backend=backend, **options)
    g = torch.Generator().manual_seed(order)
    x = torch.randn(2, 3, 4, 5, generator=g)
    xs = x.to(device)
    for k, t in enumerate(d.timesteps):
        m = torch.randn(2, 3, 4, 5, generator=g)
        x = d.step(m, t, x).prev_sample
        xs = s.step(xs, m.to(device), k, return_x0=False).prev_sample
        if not torch.isfinite(x).all():
            # bh1 / noise prediction on the step to sigma = 0: diffusers' float32 gives
            # 0 * inf; the sampler takes the limit
            assert k == len(d.timesteps) - 1 and torch.isfinite(xs).all()
            break
        scale = max(1.0, x.abs().max().item())
        torch.testing.assert_close(xs.cpu(), x, rtol=1e-4, atol=1e-4 * scale)


# -- 3. the kernel against the reference, one step from a given state ---------------------


def _make(shape, dtype, layout, device, scale=1.0):
    t = (torch.randn(shape) * scale).to(device=device, dtype=dtype)
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" else t


def _state(shape, dtype, layout, device, count):
    """[count, B, ...] normals with every slot laid out like a sample of ``layout``."""
    flat = torch.randn((count * shape[0], *shape[1:])).to(device=device, dtype=dtype)
    if layout == "channels_last":
        flat = flat.contiguous(memory_format=torch.channels_last)
    return flat.view(count, *shape)


# (solver_order, solver_type, predict_x0, prediction_type, processing, k, w)
STEP_CASES = [
    (2, "bh2", True, "epsilon", {}, 4, 2),
    (3, "bh1", True, "v_prediction", {"thresholding": (0.9, 1.5)}, 5, 3),
    (3, "bh2", False, "epsilon", {}, 3, 2),
    (1, "bh1", True, "sample", {"clip_sample_range": 1.2}, 7, 1),  # the last step
    (2, "bh2", False, "v_prediction", {}, 0, 0),  # a chain's first step
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", range(len(STEP_CASES)))
def test_kernel_step_matches_reference(case, layout, dtype, device):
    order, solver_type, predict_x0, prediction_type, processing, k, w = STEP_CASES[case]
    s = UniPCSampler(
        SCHEDULE,
        8,
        solver_order=order,
        solver_type=solver_type,
        predict_x0=predict_x0,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
        **processing,
    )
    shape = (3, 5, 7, 9)  # not a multiple of any block
    x, m = _make(shape, dtype, layout, device), _make(shape, dtype, layout, device)
    slots = ring_slots(order)
    ring = _state(shape, dtype, layout, device, slots)
    last = _state(shape, dtype, layout, device, 2)
    ring[k % slots] = float("nan")  # written by the step, never read
    last[k % 2] = float("nan")
    ring_in, last_in = ring.double(), last.double()
    out = torch.full_like(x, float("nan"))
    table = s.unipc_table.to(device=device, dtype=torch.float32)
    rows = torch.tensor([w * s.num_steps + k], device=device)
    x_next, _ = fused_step(
        x,
        m,
        table,
        rows,
        clip_range=s.clip_sample_range,
        thresholding=s.thresholding,
        out=out,
        write_x0=False,
        history=ring,
        last_sample=last,
    )
    q, p = step_orders(k, w, s.num_steps, order, True)
    depth = max(q, p - 1)
    alpha, sigma = s.noise_levels()
    points = [k + 1, k, *(k - j for j in range(1, depth + 1))]
    want_next, want_corrected, want_m = reference.unipc_step(
        x.double(),
        m.double(),
        [float(alpha[j]) for j in points],
        [float(sigma[j]) for j in points],
        history=[ring_in[(k - j) % slots] for j in range(1, depth + 1)],
        last_sample=last_in[(k - 1) % 2],
        corrector_order=q,
        predictor_order=p,
        predict_x0=predict_x0,
        solver_type=solver_type,
        prediction_type=prediction_type,
        clip_range=s.clip_sample_range,
        thresholding=s.thresholding,
    )
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert x_next is out and out.is_contiguous(memory_format=fmt)
    for got, want in ((out, want_next), (last[k % 2], want_corrected), (ring[k % slots], want_m)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])
    # the other slots are left as they were
    for j in range(slots):
        if j != k % slots:
            assert torch.equal(ring[j].double(), ring_in[j])
    assert torch.equal(last[(k - 1) % 2].double(), last_in[(k - 1) % 2])


def test_kernel_rejects_bad_unipc_state(device):
    s = UniPCSampler(SCHEDULE, 4)
    x = torch.randn(2, 3, device=device)
    table = s.unipc_table.float().to(device)
    rows = torch.zeros(1, dtype=torch.int64, device=device)
    ring, last = torch.zeros(3, 2, 3, device=device), torch.zeros(2, 2, 3, device=device)
    with pytest.raises(ValueError, match="go together"):
        fused_step(x, x, table, rows, history=ring)
    with pytest.raises(ValueError, match="last_sample has 3 slots"):
        fused_step(x, x, table, rows, history=ring, last_sample=ring)
    with pytest.raises(ValueError, match="x0_prev"):
        fused_step(x, x, table, rows, history=ring, last_sample=last, x0_prev=x)
    with pytest.raises(ValueError, match="table must be float32"):
        fused_step(x, x, table[:, :9].contiguous(), rows, history=ring, last_sample=last)
    with pytest.raises(ValueError, match="history has shape"):
        fused_step(x, x, table, rows, history=ring[:, :1], last_sample=last)


# -- 4. chains --------------------------------------------------------------------------------


def _model(x, cond):
    """A smooth stand-in model: its output depends on the sample and the step."""
    return torch.tanh(x) * 0.7 + (cond / 1000.0).to(x.dtype).view(-1, *[1] * (x.dim() - 1))


def _run(s, x, steps, index=int):
    for i in steps:
        cond = s.model_condition(i, x.shape[0], x.device)
        i = i if index is int else torch.tensor(i, device=x.device)
        x = s.step(x, _model(x, cond), i, return_x0=False).prev_sample
    return x


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_truncated_chain_restarts_and_tensor_indices_follow_begin_chain(backend, device):
    s = UniPCSampler(SCHEDULE, 6, solver_order=3, timestep_spacing="trailing", backend=backend)
    x = torch.randn(2, 3, 5, device=device)
    full = _run(s, x, range(6))
    part = _run(s, x, range(2, 6))  # a new chain at step 2: the int index says so
    s.begin_chain(2)
    part_tensor = _run(s, x, range(2, 6), index=torch.tensor)
    fresh = UniPCSampler(SCHEDULE, 6, solver_order=3, timestep_spacing="trailing", backend=backend)
    fresh_part = _run(fresh, x, range(2, 6))
    torch.testing.assert_close(part, fresh_part, rtol=0, atol=0)
    torch.testing.assert_close(part_tensor, part, rtol=1e-6, atol=1e-6)
    assert (part - full).abs().max() > 1e-3  # a different chain, not the tail of the first
    again = _run(s, x, range(6))
    torch.testing.assert_close(again, full, rtol=0, atol=0)


def test_a_step_run_twice_gives_the_same_result(device):
    """No step overwrites what it reads (tensor index): what a graph's verification needs."""
    s = UniPCSampler(SCHEDULE, 6, solver_order=2, timestep_spacing="trailing", backend="triton")
    x = torch.randn(2, 3, 5, device=device)
    s.begin_chain(0)
    x = _run(s, x, range(3), index=torch.tensor)
    i = torch.tensor(3, device=device)
    m = _model(x, s.model_condition(3, 2, device))
    first = s.step(x, m, i).prev_sample
    second = s.step(x, m, i).prev_sample
    assert torch.equal(first, second)


def test_per_sample_step_indices(device):
    """A [B] index steps each sample at its own step (one chain start for the batch)."""
    s = UniPCSampler(SCHEDULE, 6, solver_order=2, backend="triton", timestep_spacing="trailing")
    ref = UniPCSampler(SCHEDULE, 6, solver_order=2, backend="triton", timestep_spacing="trailing")
    x = torch.randn(3, 4, device=device)
    s.begin_chain(0)
    xs = x.clone()
    for i in range(6):
        m = _model(xs, s.model_condition(i, 3, device))
        xs = s.step(xs, m, torch.full((3,), i, device=device)).prev_sample
    torch.testing.assert_close(xs, _run(ref, x, range(6)), rtol=1e-6, atol=1e-6)


def eager_runtime(monkeypatch, device="cpu") -> dict:
    """The eager stand-in for the CUDA runtime (tests of the graph's control flow): the
    keyword arguments for ``SamplingGraph(..., runtime=)``."""
    from graph_fakes import EagerRuntime

    return {"runtime": EagerRuntime(torch.device(device))}


def test_sampling_graph_is_bitwise_the_eager_loop(monkeypatch, device):
    from fastdiff.graph import SamplingGraph

    runtime = eager_runtime(monkeypatch, device)
    s = UniPCSampler(SCHEDULE, 6, solver_order=3, backend="triton", timestep_spacing="trailing")
    noise = torch.randn(2, 3, 4, 4, device=device)
    eager = _sample(_model, s, x=noise, device=device, progress=False)
    g = SamplingGraph(_model, s, (2, 3, 4, 4), device=device, **runtime)
    assert torch.equal(g.run(noise), eager)
    assert torch.equal(g.run(noise), eager)  # replays only


def test_graph_state_is_the_stepped_buffers(device):
    s = UniPCSampler(SCHEDULE, 4, backend="triton")
    x = torch.randn(2, 3, 4, 4, device=device).contiguous(memory_format=torch.channels_last)
    ring, last = s.graph_state(x)
    assert ring.shape == (3, *x.shape) and last.shape == (2, *x.shape)
    assert ring[0].is_contiguous(memory_format=torch.channels_last)
    s.step(x, torch.randn_like(x), 0, return_x0=False)
    assert torch.equal(last[0], x) and ring[0].abs().sum() > 0  # written in place


def test_sampler_options_are_checked():
    with pytest.raises(ValueError, match="solver_order"):
        UniPCSampler(SCHEDULE, 5, solver_order=4)
    with pytest.raises(ValueError, match="solver_type"):
        UniPCSampler(SCHEDULE, 5, solver_type="midpoint")
    with pytest.raises(ValueError, match="lower_order_final"):
        UniPCSampler(SCHEDULE, 5, lower_order_final=False)
    with pytest.raises(ValueError, match="predict_x0"):
        UniPCSampler(SCHEDULE, 5, predict_x0=False, clip_sample_range=1.0)
    with pytest.raises(TypeError, match="disable_corrector"):
        UniPCSampler(SCHEDULE, 5, disable_corrector=[1.5])
    zero_snr = NoiseSchedule.create("linear", 1000, rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        UniPCSampler(zero_snr, 5, solver_type="bh1", prediction_type="v_prediction",
                     timestep_spacing="trailing")  # fmt: skip
    s = UniPCSampler(SCHEDULE, 5)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="no variance"):
        s.step(x, x, 0, grad=x)
    with pytest.raises(IndexError):
        s.step(x, x, 5)
    with pytest.raises(ValueError, match="no x0"):
        UniPCSampler(SCHEDULE, 5, predict_x0=False).step(x, x, 0, x0_out=x.clone())
    with pytest.raises(IndexError):
        s.begin_chain(5)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_on_both_backends(rescale, device):
    """Classifier-free guidance (and its rescale) inside the step, the doubled model output
    unconditional half first: the kernel as the reference, over a chain."""
    fused, ref = (
        UniPCSampler(SCHEDULE, 4, solver_order=2, timestep_spacing="trailing", backend=b)
        for b in ("triton", "reference")
    )
    x = torch.randn(3, 2, 5, device=device)
    xf, xr = x, x.double()
    for i in range(4):
        m = torch.randn(6, 2, 5, device=device)
        kw = dict(guidance_scale=3.0, guidance_rescale=rescale, return_x0=False)
        xf = fused.step(xf, m, i, **kw).prev_sample
        xr = ref.step(xr, m.double(), i, **kw).prev_sample
        torch.testing.assert_close(xf.double(), xr, **TOLERANCES[torch.float32])


def test_x0_output(device):
    s = UniPCSampler(SCHEDULE, 4, backend="triton")
    r = UniPCSampler(SCHEDULE, 4, backend="reference")
    x, m = torch.randn(2, 6, device=device), torch.randn(2, 6, device=device)
    got, want = s.step(x, m, 0), r.step(x, m, 0)
    torch.testing.assert_close(got.pred_original_sample, want.pred_original_sample)
    eps = UniPCSampler(SCHEDULE, 4, predict_x0=False, backend="triton")
    assert eps.step(x, m, 0).pred_original_sample is None


# -- 5. the Gaussian mixture ------------------------------------------------------------------


def _mixture() -> GaussianMixture:
    angles = torch.tensor([math.pi, math.pi / 3, -math.pi / 3], dtype=F64)
    means = 6.0 * torch.stack([angles.cos(), angles.sin()], 1)
    covs = torch.stack([torch.diag(torch.tensor([0.8, 0.5], dtype=F64))] * 3)
    return GaussianMixture([0.5, 0.3, 0.2], means, covs)


def _mismatches(gmm, x, z=5.0):
    fit = gmm.fit(x)
    w_se, mu_se, cov_se = gmm.fit_standard_errors(x.shape[0])
    bad = []
    for name, got, want, se in (
        ("weight", fit.weights, gmm.weights, w_se),
        ("mean", fit.means, gmm.means, mu_se),
        ("covariance", fit.covariances, gmm.covariances, cov_se),
    ):
        over = ((got - want).abs() / se.clamp_min(1e-300)) > z
        bad += [f"{name}{idx}" for idx in over.nonzero().tolist()]
    return bad + ([f"{fit.num_nonfinite} non-finite"] if fit.num_nonfinite else [])


@pytest.mark.parametrize("order,solver_type", [(2, "bh2"), (3, "bh1")])
def test_reproduces_the_mixture_as_diffusers_does(order, solver_type, one_thread):
    """10 steps: the mixture within 5 standard errors of n = 2000 samples (false-failure
    odds as in test_distribution.py), and a fit figure (sliced W2) no worse than diffusers'
    UniPC with the same options, plan and initial noise, within 10%."""
    diffusers = pytest.importorskip("diffusers")
    gmm = _mixture()
    n, steps = 2000, 10
    options = dict(solver_order=order, solver_type=solver_type)
    sampler = UniPCSampler(SCHEDULE, steps, timestep_spacing="trailing", backend="reference",
                           **options)  # fmt: skip
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(3))
    model = gmm.denoiser(SCHEDULE)
    ours = sample(model, sampler, x=noise)
    d = diffusers.UniPCMultistepScheduler(timestep_spacing="trailing", **options)
    d.set_timesteps(steps)
    x = noise.clone()
    for t in d.timesteps:
        x = d.step(model(x, t.expand(n)), t, x).prev_sample
    assert _mismatches(gmm, ours) == []
    ours_w2, theirs_w2 = gmm.fit(ours).sliced_w2, gmm.fit(x).sliced_w2
    assert ours_w2 <= 1.1 * theirs_w2 + 1e-3, (ours_w2, theirs_w2)


# -- on the card ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_host_sync_on_the_card(dtype):
    s = UniPCSampler(SCHEDULE, 8, solver_order=3, backend="triton")
    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=dtype)
    m = torch.randn_like(x)
    s.step(x, m, 0)  # tables uploaded, kernels compiled
    s.begin_chain(0)
    index = torch.zeros((), dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(8):
            x = s.step(x, m, i, return_x0=False).prev_sample
        for _ in range(8):
            x = s.step(x, m, index, return_x0=False).prev_sample
            index += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x.float()).all()


def test_unipc_table_marks_unreachable_rows_and_checks_finiteness():
    alpha = torch.tensor([0.3, 0.6, 1.0], dtype=F64)
    sigma = (1 - alpha**2).sqrt()
    conversion = (torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64))
    kw = dict(solver_type="bh2", predict_x0=True, lower_order_final=True)
    table = unipc_table(alpha, sigma, conversion, solver_order=2, **kw)
    assert table.shape[0] == 3 * 2  # row w * n + k
    assert torch.isnan(table[[2, 4, 5]]).all()  # w > k: no chain gets there
    assert torch.isfinite(table[[0, 1, 3]]).all()
    with pytest.raises(ValueError, match="not finite"):
        unipc_table(alpha, sigma, conversion, solver_order=2, **{**kw, "lower_order_final": False})
