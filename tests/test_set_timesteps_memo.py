"""The plan memo of the fused schedulers' ``set_timesteps`` (``fastdiff.diffusers._plan``).

A repeated call with the same scalar arguments puts diffusers' attributes back instead of
planning again. Every test runs a sequence of calls (repeats, other arguments in between,
config changes, steps that move the state) on a scheduler with the memo and on one without
it (``MEMO_ENTRIES = 0``: diffusers plans every call), and checks after every call that the
two hold exactly the same attributes (tensors equal, same dtype and device), that they are
those of a fresh scheduler's single call, and diffusers' own scheduler's where it has them;
then that a loop of steps gives the same outputs. Configs and arguments are drawn at random
(a fresh seed per run, printed on failure).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff.diffusers._plan as plan_module  # noqa: E402
from fastdiff.diffusers import (  # noqa: E402
    FusedDDIMScheduler,
    FusedDDPMScheduler,
    FusedDPMSolverMultistepScheduler,
    FusedEulerAncestralDiscreteScheduler,
    FusedEulerDiscreteScheduler,
    FusedFlowMatchEulerDiscreteScheduler,
    FusedHeunDiscreteScheduler,
    FusedLCMScheduler,
    FusedTCDScheduler,
    FusedUniPCMultistepScheduler,
)

SHAPE = (2, 3, 4, 5)
CLASSES = {
    "ddpm": FusedDDPMScheduler,
    "ddim": FusedDDIMScheduler,
    "euler": FusedEulerDiscreteScheduler,
    "euler_a": FusedEulerAncestralDiscreteScheduler,
    "dpm": FusedDPMSolverMultistepScheduler,
    "unipc": FusedUniPCMultistepScheduler,
    "heun": FusedHeunDiscreteScheduler,
    "lcm": FusedLCMScheduler,
    "tcd": FusedTCDScheduler,
    "flow": FusedFlowMatchEulerDiscreteScheduler,
}
MEMO = "_plan_memo"  # the memo's own bookkeeping (not scheduler state)


@pytest.fixture
def seed():
    return random.randrange(2**31)


# -- random configs and arguments ------------------------------------------------------------


def draw_config(name: str, rng: random.Random) -> dict:
    """A config the fused class supports, over the options that change the plan."""
    if name == "flow":
        cfg = {"shift": rng.choice([1.0, 3.0, rng.uniform(0.5, 6.0)])}
        if rng.random() < 0.4:
            cfg.update(use_dynamic_shifting=True, time_shift_type="exponential")
        if rng.random() < 0.3:
            cfg["shift_terminal"] = rng.uniform(0.02, 0.3)
        if rng.random() < 0.3:
            cfg[f"use_{rng.choice(['karras', 'exponential', 'beta'])}_sigmas"] = True
        cfg["stochastic_sampling"] = rng.random() < 0.3
        return cfg
    cfg = {
        "num_train_timesteps": rng.choice([100, 1000]),
        "beta_schedule": rng.choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
    }
    if name in ("lcm", "tcd"):
        cfg["original_inference_steps"] = rng.choice([10, 50])
        return cfg
    cfg["timestep_spacing"] = rng.choice(["leading", "trailing", "linspace"])
    cfg["steps_offset"] = rng.choice([0, 1])
    if name in ("euler", "heun", "dpm", "unipc") and rng.random() < 0.3:
        cfg["use_karras_sigmas"] = True
    if name == "euler" and rng.random() < 0.3:
        cfg.update(prediction_type="v_prediction", timestep_type="continuous")
    if name == "dpm" and rng.random() < 0.4:
        cfg.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
        cfg.pop("use_karras_sigmas", None)
        if rng.random() < 0.5:
            cfg["use_dynamic_shifting"] = True
    if name == "unipc" and rng.random() < 0.3:
        cfg.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=2.0)
        cfg.pop("use_karras_sigmas", None)
    if name in ("dpm", "unipc"):
        cfg["solver_order"] = rng.choice([1, 2, 3] if name == "unipc" else [1, 2])
    return cfg


def draw_call(name: str, cfg: dict, rng: random.Random, device) -> tuple[tuple, dict]:
    """set_timesteps arguments (positional, keyword): a step count, by position or by name,
    the device, ``mu`` where the config needs it, sometimes a custom list (not memoized)."""
    steps = rng.randint(2, 8) if name not in ("lcm", "tcd") else rng.randint(1, 4)
    kwargs = {}
    if cfg.get("use_dynamic_shifting"):
        kwargs["mu"] = rng.choice([0.5, 1.0, rng.uniform(0.2, 1.5)])
    if rng.random() < 0.5:
        args = (steps,)
    else:
        args, kwargs["num_inference_steps"] = (), steps
    if device is not None:
        kwargs["device"] = device
    if rng.random() < 0.15:  # custom plans: planned by diffusers every time
        if name == "euler" and not cfg.get("timestep_type"):
            kwargs.pop("num_inference_steps", None)
            return (), {**kwargs, "sigmas": [9.0, 3.0, 1.0, 0.0], "num_inference_steps": None}
        if name == "flow":
            kwargs.pop("num_inference_steps", None)
            sigmas = np.linspace(1.0, 1.0 / steps, steps)  # Flux passes an array
            return (), {**kwargs, "sigmas": sigmas}
    return args, kwargs


# -- state comparison ------------------------------------------------------------------------


def assert_same(got, want, where: str) -> None:
    """Deep equality: tensors bit for bit with dtype and device, containers item by item,
    other objects by type and attributes (or ==)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and got.device == want.device, where
        assert got.shape == want.shape, where
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, got, want)
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), (where, got, want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(want, np.ndarray):
        assert np.array_equal(got, want), where
    elif hasattr(want, "__dict__") and type(want).__eq__ is object.__eq__:
        assert type(got) is type(want), where
        assert_same(vars(got), vars(want), where)
    elif isinstance(want, float) and want != want:
        assert got != got, where
    else:
        assert type(got) is type(want) and got == want, (where, got, want)


def state(scheduler) -> dict:
    """The scheduler's attributes; the plan's address (a pointer) checked against the plan."""
    plan = scheduler._plan_tensor
    address = scheduler._plan_address
    assert address[0] == plan.data_ptr() and address[2:] == (plan.dtype, plan.device)
    skip = {MEMO, "_plan_address"}
    return {k: v for k, v in vars(scheduler).items() if k not in skip}


PLANNED = (  # what a set_timesteps call decides (diffusers' attributes, the host plan)
    "timesteps",
    "sigmas",
    "num_inference_steps",
    "_step_index",
    "_begin_index",
    "model_outputs",
    "lower_order_nums",
    "last_sample",
    "prev_derivative",
    "dt",
    "sample",
    "_plan_host",
    "_plan_values",
    "_plan_len",
    "_plan_state",
    "_plan_sigmas",
    "_seed",
)


def plan_state(scheduler) -> dict:
    return {k: vars(scheduler).get(k, "missing") for k in PLANNED}


def no_memo(monkeypatch):
    monkeypatch.setattr(plan_module, "MEMO_ENTRIES", 0)


class Pair:
    """A scheduler with the memo and one without, driven through the same calls."""

    def __init__(self, cls, cfg, monkeypatch):
        self.cls, self.monkeypatch = cls, monkeypatch
        self.cfg, self.changes = cfg, {}
        self.memo = cls(**cfg, backend="reference")
        self.plain = cls(**cfg, backend="reference")
        self.stock = cls._diffusers_cls(**cfg)

    def call(self, args, kwargs, what: str) -> None:
        self.memo.set_timesteps(*args, **kwargs)
        with self.monkeypatch.context() as m:
            m.setattr(plan_module, "MEMO_ENTRIES", 0)
            self.plain.set_timesteps(*args, **kwargs)
            fresh = self.cls(**self.cfg, backend="reference")
            if self.changes:
                fresh.register_to_config(**self.changes)
            fresh.set_timesteps(*args, **kwargs)
        self.stock.set_timesteps(*args, **kwargs)
        assert_same(state(self.memo), state(self.plain), f"{what}: memo vs no memo")
        if self.memo.num_inference_steps == fresh.num_inference_steps:  # (DDPM custom: kept)
            assert_same(plan_state(self.memo), plan_state(fresh), f"{what}: memo vs fresh")
        assert dict(self.memo.config) == dict(self.stock.config), what
        assert vars(self.memo.config) == vars(self.stock.config), what
        for k, v in vars(self.stock).items():
            if k in PLANNED and k != "sample":  # (the fused Heun's own half state)
                assert_same(vars(self.memo)[k], v, f"{what}: memo vs diffusers")

    def config(self, **changes) -> None:
        self.changes.update(changes)
        for s in (self.memo, self.plain, self.stock):
            s.register_to_config(**changes)

    def steps(self, count: int, seed: int) -> None:
        """``count`` steps on the memo and no-memo schedulers: the same outputs."""
        # (at most all steps but the last: a plan with a repeated first timestep, diffusers'
        # index rule starts it at the second one, ends one step early)
        count = min(count, len(self.memo.timesteps) - 1)
        results = []
        for s in (self.memo, self.plain):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(SHAPE, generator=g)
            out = []
            for t in list(s.timesteps)[:count]:
                m = torch.randn(SHAPE, generator=g)
                kwargs = {"generator": g} if "generator" in _params(s.step) else {}
                x = s.step(m, t, s.scale_model_input(x, t), **kwargs).prev_sample
                out.append(x)
            results.append(out)
        for i, (a, b) in enumerate(zip(*results)):
            assert_same(a, b, f"step {i}")


def _params(fn) -> set:
    import inspect

    return set(inspect.signature(fn).parameters)


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")], ids=str)
@pytest.mark.parametrize("name", list(CLASSES))
def test_repeated_calls_leave_the_state_of_one_call(name, device, seed, monkeypatch):
    """Calls repeated (memo hits), other arguments in between, steps in between, a config
    change: after every call the state of the scheduler without the memo, of a fresh one,
    and of diffusers' scheduler; then steps give the same outputs."""
    rng = random.Random(seed)
    cfg = draw_config(name, rng)
    pair = Pair(CLASSES[name], cfg, monkeypatch)
    a, b = draw_call(name, cfg, rng, device), draw_call(name, cfg, rng, device)
    calls = [a, a, a, b, a, b, b, a]
    for i, (args, kwargs) in enumerate(calls):
        pair.call(args, kwargs, f"seed {seed} call {i} {args} {kwargs}")
        if i in (2, 5):
            pair.steps(rng.randint(1, 3), seed + i)
    if name == "flow":  # (``shift`` is read at construction: set_shift, another test)
        pair.config(shift_terminal=None if pair.memo.config.shift_terminal else 0.1)
    elif name in ("lcm", "tcd"):
        pair.config(original_inference_steps=pair.memo.config.original_inference_steps * 2)
    else:
        spacing = ["leading", "trailing", "linspace"]
        spacing.remove(pair.memo.config.timestep_spacing)
        pair.config(timestep_spacing=rng.choice(spacing))
    for i, (args, kwargs) in enumerate([a, a, a]):
        pair.call(args, kwargs, f"seed {seed} after register_to_config, call {i}")
    pair.steps(len(pair.memo.timesteps), seed)


@pytest.mark.parametrize("name", list(CLASSES))
def test_memo_is_hit_and_state_reset(name, seed, monkeypatch):
    """The third identical call is recalled (diffusers' set_timesteps not run), and the state
    that steps moved (step index, multistep history) is reset: new lists each call."""
    rng = random.Random(seed)
    cfg = draw_config(name, rng)
    args, kwargs = draw_call(name, cfg, random.Random(0), "cpu")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("sigmas", "timesteps")}
    kwargs.setdefault("num_inference_steps", 4) if not args else None
    pair = Pair(CLASSES[name], cfg, monkeypatch)
    pair.call(args, kwargs, "first")
    pair.call(args, kwargs, "second (traced, recorded)")
    pair.steps(3, seed)
    stepped = vars(pair.memo).get("model_outputs")
    if name == "dpm":
        assert any(o is not None for o in stepped)
    if name in ("dpm", "unipc"):  # (the fused UniPC keeps its history in its own ring)
        assert pair.memo.lower_order_nums > 0 and pair.memo.step_index is not None
    calls = []
    plan = pair.cls._diffusers_cls.set_timesteps
    monkeypatch.setattr(
        pair.cls._diffusers_cls, "set_timesteps", lambda *a, **k: calls.append(1) or plan(*a, **k)
    )
    pair.memo.set_timesteps(*args, **kwargs)
    assert calls == [], "the third call planned again"
    if name in ("dpm", "unipc"):
        outputs = pair.memo.model_outputs
        assert outputs is not stepped and outputs == [None] * pair.memo.config.solver_order
        assert pair.memo.lower_order_nums == 0 and pair.memo.step_index is None
        pair.memo.set_timesteps(*args, **kwargs)
        assert pair.memo.model_outputs is not outputs
    monkeypatch.undo()
    pair.plain.set_timesteps(*args, **kwargs)
    assert_same(state(pair.memo), state(pair.plain), "recalled vs planned")


@pytest.mark.parametrize("name", ["euler", "dpm", "flow"])
def test_inputs_changed_plan_again(name, monkeypatch):
    """What diffusers' set_timesteps reads besides its arguments and config: a new
    ``alphas_cumprod`` (or ``set_shift``), timesteps changed in place: planned again, as
    diffusers plans."""
    cls = CLASSES[name]
    memo, stock = cls(backend="reference"), cls._diffusers_cls()
    for _ in range(3):
        memo.set_timesteps(5)
    if name == "flow":
        for s in (memo, stock):
            s.set_shift(2.5)
    else:
        for s in (memo, stock):
            s.alphas_cumprod = s.alphas_cumprod * 0.9
            if name == "dpm":
                s.lambda_t = torch.log(s.alphas_cumprod.sqrt()) - torch.log(
                    (1 - s.alphas_cumprod).sqrt()
                )
    memo.set_timesteps(5)
    stock.set_timesteps(5)
    assert_same(memo.timesteps, stock.timesteps, "timesteps")
    assert_same(memo.sigmas, stock.sigmas, "sigmas")
    memo.set_timesteps(5)
    memo.timesteps.add_(1)  # in place: the recorded plan is not reused
    memo.set_timesteps(5)
    assert_same(memo.timesteps, stock.timesteps, "timesteps after an in-place change")


def test_dpm_mu_writes_the_config_as_diffusers(monkeypatch):
    """DPM-Solver's set_timesteps writes ``config.flow_shift = exp(mu)``: alternating mu
    values leave the config as diffusers leaves it."""
    cfg = {
        "use_flow_sigmas": True,
        "prediction_type": "flow_prediction",
        "use_dynamic_shifting": True,
        "flow_shift": 3.0,
    }
    pair = Pair(FusedDPMSolverMultistepScheduler, cfg, monkeypatch)
    for i, mu in enumerate([0.5, 0.5, 0.5, 1.0, 0.5, 0.5, 1.0, 1.0, 0.5]):
        pair.call((6,), {"mu": mu}, f"call {i} mu {mu}")
        assert pair.memo.config.flow_shift == pair.stock.config.flow_shift == np.exp(mu)
