"""fastdiff.k_diffusion: the coefficient rows vs the sigma-space reference, and the samplers
vs the real k-diffusion package (PyPI ``k-diffusion``) on an exact GMM denoiser and seed."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from conftest import TOLERANCES, random_mixture
from kdiffusion_loader import load_sampling

from fastdiff import flow_tables, reference, tables
from fastdiff import k_diffusion as K
from fastdiff.kernels.fused_step import fused_step

F64 = torch.float64
COL = tables.COL


def ve_denoiser(gmm):
    """``D(x, sigma) = E[x0 | x0 + sigma eps = x]``: the VP posterior mean at
    ``ab = 1 / (1 + sigma^2)`` of the scaled state ``x sqrt(ab)`` (float64 math, x's dtype)."""

    def model(x, sigma):
        ab = 1.0 / (1.0 + sigma.to(F64) ** 2)
        return gmm.posterior_mean(x.to(F64) * ab.sqrt()[:, None], ab).to(x.dtype)

    return model


def apply_row(row, x, m, x0_prev=None, z=None):
    """The kernel's formula (``fused_step``'s docstring) in float64 on one table row."""
    x0 = row[COL["x0_x"]] * x + row[COL["x0_m"]] * m
    x0_prev = x0 if x0_prev is None else x0_prev
    out = row[COL["x"]] * x + row[COL["x0"]] * x0 + row[COL["m"]] * m
    out = out + row[COL["x0_prev"]] * x0_prev
    return out if z is None else out + row[COL["std"]] * z


# A Karras plan whose steps span 3 decades of sigma (coefficients up to ~1e2) and end at 0.
SIGMAS = K.get_sigmas_karras(6, 0.03, 40.0).to(F64)
S, S_NEXT = SIGMAS[:-1], SIGMAS[1:]
S_PREV = torch.cat([S[:1], S[:-1]])
FIRST = torch.arange(len(S)) == 0
S_HAT = S * 1.25


def _dpm_2m_rows():
    ones = torch.ones_like(S)
    return flow_tables.dpmpp_2m_table_as(ones, S, ones, S_NEXT, ones, S_PREV, "sample", FIRST)


def _dpm_2m_ref(i, x, m, xp, z):
    history = () if i == 0 else [(xp, S_PREV[i])]
    return reference.dpmpp_multistep_step(x, m, S[i], S_NEXT[i], history=history, space="ve")[0]


def _sde_case(eta, solver_type, s_noise=1.0):
    def rows():
        return tables.dpmpp_2m_sde_table(S, S_NEXT, S_PREV, FIRST, eta, s_noise, solver_type)

    def ref(i, x, m, xp, z):
        return reference.dpmpp_2m_sde_step(
            x,
            m,
            S[i],
            float(S_NEXT[i]),
            denoised_prev=None if i == 0 else xp,
            sigma_prev=S_PREV[i],
            eta=eta,
            s_noise=s_noise,
            solver_type=solver_type,
            noise=z,
        )[0]

    return rows, ref


def _heun_ref(i, x2, m, xp, z):
    # x_hat from x_2 by inverting the Euler stage in float64 (x_2 is rounded to the dtype).
    dt = S_NEXT[i] - S_HAT[i]
    x_hat = (S_HAT[i] * x2 + dt * xp) / S_NEXT[i]
    return reference.heun_step(x_hat, xp, m, S_HAT[i], S_NEXT[i])[0]


# name -> (rows(), reference(i, x, m, x0_prev, z), uses x0_prev, uses z, rows skipped)
ROW_CASES = {
    "churn": (
        lambda: tables.churn_table(S, S_HAT, 0.9),
        lambda i, x, m, xp, z: reference.churn_step(x, z, S[i], S_HAT[i], 0.9),
        False,
        True,
        (),
    ),
    "heun": (lambda: tables.heun_table(S_HAT, S_NEXT), _heun_ref, True, False, (len(S) - 1,)),
    "dpmpp_2m": (_dpm_2m_rows, _dpm_2m_ref, True, False, ()),
    "sde_midpoint": (*_sde_case(1.0, "midpoint"), True, True, ()),
    "sde_heun": (*_sde_case(0.6, "heun", 1.05), True, True, ()),
    "sde_eta0": (*_sde_case(0.0, "midpoint"), True, True, ()),
    "lcm": (
        lambda: tables.lcm_table(S_NEXT),
        lambda i, x, m, xp, z: reference.lcm_step(x, m, S_NEXT[i], z)[0],
        False,
        True,
        (),
    ),
}


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, m, xp, z = (torch.randn(shape, generator=g, dtype=F64) for _ in range(4))
    return [t.to(dtype) for t in (x * 5, m, xp, z)]


@pytest.mark.parametrize("name", ROW_CASES)
def test_rows_are_the_reference_in_float64(name):
    rows, ref, _, _, skipped = ROW_CASES[name]
    table = rows()
    assert table.dtype == F64 and table.shape == (len(S), len(tables.COLUMNS))
    x, m, xp, z = _inputs((4, 7), F64, 0)
    for i in range(len(S)):
        if i in skipped:
            assert torch.isnan(table[i]).all()  # the Heun row of the step to 0: never read
            continue
        torch.testing.assert_close(apply_row(table[i], x, m, xp, z), ref(i, x, m, xp, z))


def test_heun_row_is_karras_algorithm_1_from_x_hat():
    """Alg. 1 lines 5-8 from x_hat directly (no inversion): the Euler stage's x_2 and the
    Heun row give the same x' as the reference."""
    x_hat, d1, d2, _ = _inputs((3, 5), F64, 1)
    euler = tables.euler_table(S_HAT, S_NEXT, "sample", 0.0, "sigma")
    heun = tables.heun_table(S_HAT, S_NEXT)
    for i in range(len(S) - 1):
        x2 = apply_row(euler[i], x_hat, d1)
        expected = reference.heun_step(x_hat, d1, d2, S_HAT[i], S_NEXT[i])[0]
        torch.testing.assert_close(apply_row(heun[i], x2, d2, d1), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ROW_CASES)
def test_kernel_rows_match_reference(name, dtype, device):
    """The fused kernel on every row, odd shape (not a multiple of the block), poisoned
    output, vs the float64 reference on the same (rounded) inputs; TOLERANCES by dtype. The
    inputs are N(0, 1) (x: N(0, 25)) and the coefficients at most ~1e2 (the Heun and DPM
    rows at small sigma'), which float32 arithmetic carries to ~1e-5 relative."""
    rows, ref, uses_prev, uses_z, skipped = ROW_CASES[name]
    table = rows().to(device=device, dtype=torch.float32)
    x, m, xp, z = (t.to(device) for t in _inputs((3, 5, 7, 9), dtype, 2))
    for i in range(len(S)):
        if i in skipped:
            continue
        out = torch.full_like(x, float("nan"))  # an unwritten element fails
        got, _ = fused_step(
            x,
            m,
            table,
            torch.tensor([i], device=device),
            x0_prev=xp if uses_prev else None,
            noise=z if uses_z else None,
            out=out,
            write_x0=False,
        )
        assert got is out
        expected = ref(i, *(t.cpu().to(F64) for t in (x, m, xp, z)))
        torch.testing.assert_close(
            got.cpu().to(F64), expected.to(dtype).to(F64), **TOLERANCES[dtype]
        )


# -- the samplers vs k-diffusion -----------------------------------------------------------

SAMPLER_CASES = [
    ("sample_euler", {}),
    ("sample_euler", {"s_churn": 2.0, "s_tmin": 0.1, "s_tmax": 10.0, "s_noise": 1.01}),
    ("sample_heun", {}),
    ("sample_heun", {"s_churn": 3.0}),
    ("sample_euler_ancestral", {}),
    ("sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
    ("sample_dpmpp_2m", {}),
    ("sample_dpmpp_2m_sde", {}),
    ("sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7, "s_noise": 1.02}),
    ("sample_dpmpp_2m_sde", {"eta": 0.0}),
]
# Reference backend in float64: both compute the same float64 math (to rounding); the
# kernels in float32: the kernel's rounding accumulated over 7 steps, ~1e-6 observed on
# |x| ~ 5, within the float32 kernel tolerance.
LOOP_BACKENDS = [
    ("reference", F64, {"rtol": 1e-12, "atol": 1e-12}),
    ("triton", torch.float32, TOLERANCES[torch.float32]),
]


def _sigmas_and_x(dtype, device, batch=5, dim=3):
    sigmas = K.get_sigmas_karras(7, 0.05, 20.0, device=device).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, dim, generator=g, dtype=F64).to(device=device, dtype=dtype) * sigmas[0]
    return sigmas, x


def _recorded(fn, model, x, sigmas, **kwargs):
    """fn's result after ``torch.manual_seed(3)``, its callback dicts and the next draw of
    the global generator (where the call left it)."""
    seen = []
    torch.manual_seed(3)
    with warnings.catch_warnings():
        # torchsde warns that float32 sigmas fall a rounding outside the tree's interval
        # (k-diffusion itself does the same).
        warnings.simplefilter("ignore", UserWarning)
        out = fn(model, x, sigmas, callback=seen.append, disable=True, **kwargs)
    return out, seen, torch.randn(4)


@pytest.mark.parametrize("backend, dtype, tol", LOOP_BACKENDS, ids=[b[0] for b in LOOP_BACKENDS])
@pytest.mark.parametrize("name, kwargs", SAMPLER_CASES, ids=[f"{n}-{k}" for n, k in SAMPLER_CASES])
def test_samplers_match_k_diffusion(name, kwargs, backend, dtype, tol, device):
    ks = load_sampling()
    if backend == "reference" and device.type == "cuda":
        device = torch.device("cpu")
    model = ve_denoiser(random_mixture(0, 3))
    sigmas, x = _sigmas_and_x(dtype, device)
    want, want_seen, want_next = _recorded(getattr(ks, name), model, x, sigmas, **kwargs)
    got, got_seen, got_next = _recorded(
        getattr(K, name), model, x, sigmas, backend=backend, **kwargs
    )
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **tol)
    if name not in ("sample_euler", "sample_heun") or kwargs.get("s_churn", 0) > 0:
        # the same draws from the global generator (k-diffusion's Euler / Heun without churn
        # draw and discard one normal per step; we draw none: documented)
        assert torch.equal(got_next, want_next)
    assert len(got_seen) == len(want_seen) == len(sigmas) - 1
    for a, b in zip(got_seen, want_seen, strict=True):
        assert a.keys() == b.keys() == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"]
        for key in ("sigma", "sigma_hat"):
            torch.testing.assert_close(torch.as_tensor(a[key]), torch.as_tensor(b[key]))
        for key in ("x", "denoised"):
            torch.testing.assert_close(a[key], b[key], **tol)


def _lcm_spec(model, x, sigmas, callback=None, disable=None, noise_sampler=None):
    """ComfyUI's k-diffusion ``sample_lcm`` (not in k-diffusion 0.1.1 on PyPI), written from
    its definition: ``x = D``, then ``x += sigma' z`` unless ``sigma' = 0``."""
    noise_sampler = K.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if callback is not None:
            callback(
                {"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised}
            )
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


@pytest.mark.parametrize("backend, dtype, tol", LOOP_BACKENDS, ids=[b[0] for b in LOOP_BACKENDS])
def test_lcm_matches_its_definition(backend, dtype, tol, device):
    ks_lcm = getattr(sys.modules.get("k_diffusion.sampling"), "sample_lcm", None) or _lcm_spec
    if backend == "reference":
        device = torch.device("cpu")
    model = ve_denoiser(random_mixture(0, 3))
    sigmas, x = _sigmas_and_x(dtype, device)
    want, want_seen, want_next = _recorded(ks_lcm, model, x, sigmas)
    got, got_seen, got_next = _recorded(K.sample_lcm, model, x, sigmas, backend=backend)
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(got_next, want_next)
    assert [d["i"] for d in got_seen] == [d["i"] for d in want_seen]


@pytest.mark.parametrize("name", ["sample_euler_ancestral", "sample_dpmpp_2m_sde", "sample_lcm"])
def test_noise_sampler_is_called_as_k_diffusion_calls_it(name):
    """A user noise_sampler gets the device elements sigmas[i], sigmas[i + 1] of every step
    that adds noise (not the step to 0), in order."""
    model = ve_denoiser(random_mixture(0, 3))
    sigmas, x = _sigmas_and_x(F64, torch.device("cpu"))
    calls = []

    def noise_sampler(sigma, sigma_next):
        calls.append((sigma, sigma_next))
        return torch.zeros_like(x)

    getattr(K, name)(model, x, sigmas, disable=True, noise_sampler=noise_sampler)
    assert len(calls) == len(sigmas) - 2
    for i, (a, b) in enumerate(calls):
        assert isinstance(a, torch.Tensor) and a.ndim == 0
        assert a == sigmas[i] and b == sigmas[i + 1]


def test_brownian_tree_noise_is_k_diffusion_s():
    ks = load_sampling()
    x = torch.zeros(3, 4, dtype=F64)
    for seed in (7, [1, 2, 3]):
        ours = K.BrownianTreeNoiseSampler(x, 0.05, 20.0, seed=seed)
        theirs = ks.BrownianTreeNoiseSampler(x, 0.05, 20.0, seed=seed)
        for a, b in ((20.0, 9.0), (9.0, 0.5), (0.5, 0.05)):
            s, s_next = torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64)
            torch.testing.assert_close(ours(s, s_next), theirs(s, s_next), rtol=0, atol=0)


def test_dpmpp_2m_sde_without_torchsde_asks_for_a_noise_sampler(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchsde", None)
    model = ve_denoiser(random_mixture(0, 3))
    sigmas, x = _sigmas_and_x(F64, torch.device("cpu"))
    with pytest.raises(ImportError, match="torchsde.*noise_sampler"):
        K.sample_dpmpp_2m_sde(model, x, sigmas, disable=True)
    out = K.sample_dpmpp_2m_sde(
        model, x, sigmas, disable=True, noise_sampler=lambda s, s2: torch.randn_like(x)
    )
    assert torch.isfinite(out).all()


def test_sigma_helpers_are_k_diffusion_s():
    ks = load_sampling()
    for n, lo, hi in ((1, 0.1, 10.0), (10, 0.0292, 14.6146), (25, 0.002, 80.0)):
        assert torch.equal(K.get_sigmas_karras(n, lo, hi), ks.get_sigmas_karras(n, lo, hi))
        assert torch.equal(
            K.get_sigmas_karras(n, lo, hi, rho=3.0), ks.get_sigmas_karras(n, lo, hi, rho=3.0)
        )
        assert torch.equal(
            K.get_sigmas_exponential(n, lo, hi), ks.get_sigmas_exponential(n, lo, hi)
        )


def test_one_sigma_is_no_step_and_disable_hides_the_bar(capsys):
    model = ve_denoiser(random_mixture(0, 3))
    sigmas, x = _sigmas_and_x(F64, torch.device("cpu"))
    assert torch.equal(K.sample_dpmpp_2m(model, x, sigmas[:1], disable=True), x)
    K.sample_euler(model, x, sigmas[:3], disable=True)
    assert capsys.readouterr().err == ""
    K.sample_euler(model, x, sigmas[:3], disable=False)
    assert "2/2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, kwargs, sigmas, match",
    [
        ("sample_euler", {}, [[1.0, 0.0]], "1-D"),
        ("sample_euler", {}, [2.0, 0.0, 1.0], "> 0 but for the last"),
        ("sample_heun", {}, [2.0, -1.0], ">= 0"),
        ("sample_lcm", {}, [2.0, float("nan")], "finite"),
        ("sample_euler", {"s_churn": -1.0}, [2.0, 0.0], "s_churn"),
        ("sample_heun", {"s_tmin": float("nan")}, [2.0, 0.0], "s_tmin"),
        ("sample_euler_ancestral", {"eta": -0.5}, [2.0, 0.0], "eta"),
        ("sample_dpmpp_2m_sde", {"solver_type": "euler"}, [2.0, 0.0], "solver_type"),
        ("sample_dpmpp_2m_sde", {"s_noise": float("inf")}, [2.0, 0.0], "s_noise"),
        ("sample_dpmpp_2m", {"backend": "cuda"}, [2.0, 0.0], "backend"),
    ],
)
def test_bad_input_names_the_option(name, kwargs, sigmas, match):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        getattr(K, name)(lambda x, s: x, x, torch.tensor(sigmas), disable=True, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_model_and_noise_of_the_wrong_shape_are_refused(backend):
    x, sigmas = torch.zeros(2, 3), torch.tensor([2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="denoised"):
        K.sample_dpmpp_2m(lambda x, s: x[:1], x, sigmas, disable=True, backend=backend)
    with pytest.raises(ValueError, match="noise"):
        K.sample_lcm(
            lambda x, s: x,
            x,
            sigmas,
            disable=True,
            backend=backend,
            noise_sampler=lambda a, b: torch.zeros(3),
        )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name",
    [
        "sample_euler",
        "sample_heun",
        "sample_euler_ancestral",
        "sample_dpmpp_2m",
        "sample_dpmpp_2m_sde",
        "sample_lcm",
    ],
)
def test_no_host_sync_per_step(name):
    """After the call's setup (its one host copy of sigmas and the table upload), which ends
    before the first model call, every step runs under CUDA's sync debug mode "error"."""
    x = torch.randn(2, 4, 33, 17, device="cuda") * 14.6
    sigmas = K.get_sigmas_karras(6, 0.03, 14.6, device="cuda")
    kwargs = {"s_churn": 1.0} if name in ("sample_euler", "sample_heun") else {}
    if name in ("sample_euler_ancestral", "sample_dpmpp_2m_sde", "sample_lcm"):
        kwargs["noise_sampler"] = lambda s, s2: torch.randn_like(x)
    fn = getattr(K, name)

    def model(x, sigma):  # the first call switches the sync check on
        torch.cuda.set_sync_debug_mode("error")
        return x * 0.5

    fn(lambda x, s: x * 0.5, x, sigmas, disable=True, **kwargs)  # warm up (compiles)
    torch.cuda.synchronize()
    try:
        out = fn(model, x, sigmas, disable=True, backend="triton", **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


# -- distribution: the samplers reproduce a Gaussian mixture from its exact denoiser --------
# test_distribution's 3-component mixture and its 5-SE check. Largest bias measured once with
# n = 100000 (Karras sigmas 0.002..80, seed 0, float64), in SEs of n = 1000 samples: Heun 15
# steps 1.8 (means), DPM++ 2M 20 steps 1.6 (covariances), DPM++ 2M SDE 25 steps 2.2
# (covariances). The n below keep each under 1.3 SE (bias in SEs grows like sqrt(n)), so the
# 5-SE bounds leave >= 3.7 SE of margin: a false failure below 1e-4 per biased statistic.
# (The kernels are tied to the reference by the parity tests; one case runs them here too.)
DIST_CASES = [
    ("sample_heun", 15, 500, "reference"),
    ("sample_dpmpp_2m", 20, 600, "reference"),
    ("sample_dpmpp_2m_sde", 25, 300, "reference"),
    ("sample_dpmpp_2m_sde", 25, 300, "triton"),
]


@pytest.mark.parametrize(
    "name, steps, n, backend", DIST_CASES, ids=[f"{c[0]}-{c[3]}" for c in DIST_CASES]
)
def test_samplers_reproduce_the_mixture(name, steps, n, backend, device):
    from test_distribution import GMM, _mismatches

    dtype = F64 if backend == "reference" else torch.float32
    device = torch.device("cpu") if backend == "reference" else device
    model = ve_denoiser(GMM)
    sigmas = K.get_sigmas_karras(steps, 0.002, 80.0, device=device).to(dtype)
    torch.manual_seed(0)
    x = torch.randn(n, 2, dtype=dtype, device=device) * sigmas[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchsde on float32 sigmas
        out = getattr(K, name)(model, x, sigmas, disable=True, backend=backend)
    assert _mismatches(GMM, out.cpu().to(F64)) == []


@pytest.mark.parametrize(
    "name", ["sample_heun", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_lcm"]
)
def test_a_plan_that_stops_before_zero_matches_k_diffusion(name):
    """sigmas without the final 0 (a partial denoise, as img2img UIs pass): the last step is
    a regular (Heun / second-order / noised) step."""
    ks = load_sampling()
    fn = getattr(ks, name, None) or _lcm_spec
    model = ve_denoiser(random_mixture(0, 3))
    sigmas, x = _sigmas_and_x(F64, torch.device("cpu"))
    sigmas = sigmas[2:-1]
    want, _, want_next = _recorded(fn, model, x, sigmas)
    got, _, got_next = _recorded(getattr(K, name), model, x, sigmas, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if name != "sample_heun":  # (k-diffusion's Heun without churn draws and discards noise)
        assert torch.equal(got_next, want_next)


@pytest.mark.parametrize(
    "name",
    [
        "sample_euler",
        "sample_euler_ancestral",
        "sample_heun",
        "sample_dpmpp_2m",
        "sample_dpmpp_2m_sde",
    ],
)
def test_signatures_are_k_diffusion_s(name):
    """Same parameters, order and defaults as k-diffusion's (UIs call them by position and by
    name), plus the keyword-only ``backend``; a misspelt argument is a TypeError."""
    import inspect

    ks = load_sampling()
    want = inspect.signature(getattr(ks, name)).parameters
    got = inspect.signature(getattr(K, name)).parameters
    assert list(got) == [*want, "backend"]
    for p in want.values():
        assert got[p.name].default == p.default and got[p.name].kind == p.kind, p.name
    model = ve_denoiser(random_mixture(0, 3))
    sigmas, x = _sigmas_and_x(F64, torch.device("cpu"))
    with pytest.raises(TypeError):
        getattr(K, name)(model, x, sigmas, disabled=True)
    outs = []
    for args, kwargs in (((None, None, True), {}), ((), {"disable": True})):
        torch.manual_seed(0)  # the ancestral and SDE samplers' noise: the global generator
        outs.append(getattr(K, name)(model, x, sigmas, *args, **kwargs))
    torch.testing.assert_close(*outs, rtol=0, atol=0)
