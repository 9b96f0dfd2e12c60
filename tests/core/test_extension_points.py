"""Adding a mechanism takes one module-like class and one registry line, and adding an engine
one small class and one ``register_engine`` line; the plan, the calibration, the accountant and
the generation loop then use them with nothing else changed.

The toy mechanism below is the "report noisy max with Gumbel noise": ``argmax(ε₀·s/2 + G)``,
which is the exponential mechanism in law, so its event is the exponential event (an
ε₀-bounded-range step). It is declared the way :mod:`dp_decoding.mechanisms.gaussian` is: a
sampler, a sensitivity, an event factory and a calibration hook, gathered in a spec.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from accountant import JobEvent
from accountant.calibration import EventFactory, calibrate_event
from accountant.validation import check_regime
from dp_decoding.engines import (
    Batch,
    Describable,
    Engine,
    InEngineAggregation,
    engine_names,
    load_engine,
    register_engine,
    unregister_engine,
)
from dp_decoding.generate import DemoGenerator
from dp_decoding.mechanisms import MechanismSpec, PlanNoise, registry
from dp_decoding.plan import PlanError, make_plan
from prompts import generic_task
from tests.fakes import FakeEngine, two_label_records


# -- the toy mechanism: one module's worth -----------------------------------------------------
def toy_event_factory(regime: str, steps: int, q: float | None) -> EventFactory:
    return lambda eps0: JobEvent("exponential", check_regime(regime), steps, epsilon0=eps0, q=q)


@dataclass(frozen=True)
class ToyNoisyMax:
    epsilon0: float
    sensitivity: float = 1.0
    name: str = "toy-noisy-max"
    calls: list[int] | None = None

    def select(self, scores: np.ndarray, rng: Any, prior: np.ndarray | None = None) -> int:
        if self.calls is not None:
            self.calls.append(len(scores))
        z = self.epsilon0 * np.asarray(scores, dtype=np.float64) / (2.0 * self.sensitivity)
        return int(np.argmax(z + rng.gumbel(size=z.shape)))

    def event(self, steps: int, q: float | None) -> JobEvent:
        regime = "resampled" if q is not None else "fixed"
        return toy_event_factory(regime, steps, q)(self.epsilon0)


CALLS: list[int] = []


def toy_calibrate(
    regime: str, steps: int, epsilon: float, delta: float, q: float | None, gated: bool
) -> dict[str, Any]:
    eps0 = calibrate_event(
        toy_event_factory(regime, steps, q),
        epsilon,
        delta,
        guess=lambda: 0.1,
        noise_grows=False,
    )
    return {"epsilon0": eps0}


def toy_sampler(plan: PlanNoise) -> ToyNoisyMax:
    assert plan.epsilon0 is not None
    return ToyNoisyMax(plan.epsilon0, calls=CALLS)


TOY = MechanismSpec(
    name="toy-noisy-max",
    sensitivity=1.0,
    calibrate=toy_calibrate,
    sampler=toy_sampler,
    accounting=lambda regime, gated: "toy: exponential event",
)


@pytest.fixture
def toy_mechanism() -> Iterator[MechanismSpec]:
    registry.register(TOY)  # the one registry line
    try:
        yield TOY
    finally:
        registry.unregister(TOY.name)
        CALLS.clear()


def test_a_registered_mechanism_runs_a_plan_end_to_end(toy_mechanism: MechanismSpec) -> None:
    plan = make_plan(
        labels=["A", "B"],
        epsilon=2.0,
        shots=2,
        max_tokens=5,
        mechanism="toy-noisy-max",
        prompts=3,
        candidates="all",
    )
    assert plan.mechanism == "toy-noisy-max"
    assert plan.epsilon0 is not None and plan.sigma is None
    assert plan.epsilon() <= 2.0  # calibrated through the toy's own event factory
    assert plan.to_dict()["accounting"] == "toy: exponential event"
    assert isinstance(plan.mechanism_obj(), ToyNoisyMax)

    engine = FakeEngine()
    gen = DemoGenerator(engine, plan, generic_task(["A", "B"]), rng=np.random.default_rng(1))
    demos = gen.run(two_label_records(20))
    assert [d.label for d in demos] == ["A", "A", "B", "B"]
    # every released position (kept tokens, and the stop that ended a demonstration) was the
    # toy's one draw over the full vocabulary
    positions = sum(d.tokens + (1 if d.tokens < plan.max_tokens else 0) for d in demos)
    assert positions > 0
    assert all(k == engine.vocab_size for k in CALLS) and len(CALLS) == positions


# -- the toy engine: one module's worth --------------------------------------------------------
class ToyBatch:
    """Next-token law: a fixed function of the row's last token and its length (each row
    depends on its own tokens alone)."""

    def __init__(self, rows: list[list[int]], vocab: int) -> None:
        self.seqs, self.vocab = rows, vocab

    @property
    def rows(self) -> int:
        return len(self.seqs)

    def logprobs(self, candidates: Any = None) -> np.ndarray:
        logits = np.stack(
            [np.cos(np.arange(self.vocab) * (1 + s[-1]) + len(s)) * 3.0 for s in self.seqs]
        )
        lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return lp if candidates is None else lp[:, np.asarray(candidates)]

    def append(self, tokens: Any) -> None:
        for s, t in zip(self.seqs, tokens, strict=True):
            s.append(int(t))

    def close(self) -> None:
        self.seqs = []


class ToyEngine:
    name = "toy-engine"
    vocab_size = 32
    eos_token_ids = frozenset({0})

    def __init__(self, *, letters: str = "abcdefghijklmnopqrstuvwxyz") -> None:
        self.letters = letters
        self.batches = 0

    def tokenize(self, text: str) -> list[int]:
        return [1 if c == "\n" else 2 + (ord(c) % 30) for c in text]

    def decode(self, token_ids: Any) -> str:
        return "".join("\n" if t == 1 else self.letters[t % 26] for t in token_ids)

    def start(self, prompts: Any, *, width: int | None = None) -> Batch:
        assert width is None or all(len(p) <= width for p in prompts)
        self.batches += 1
        return ToyBatch([list(p) for p in prompts], self.vocab_size)

    def describe(self) -> dict[str, Any]:
        return {"toy": True}


@pytest.fixture
def toy_engine() -> Iterator[str]:
    register_engine("toy-engine", ToyEngine)  # the one registry line
    try:
        yield "toy-engine"
    finally:
        unregister_engine("toy-engine")


@pytest.mark.parametrize("regime", ["fixed", "resampled"])
def test_a_registered_engine_and_mechanism_run_a_plan_end_to_end(
    toy_mechanism: MechanismSpec, toy_engine: str, regime: str
) -> None:
    engine = load_engine(toy_engine, letters="zyxwvutsrqponmlkjihgfedcba")
    assert isinstance(engine, ToyEngine) and isinstance(engine, Engine)
    assert isinstance(engine, Describable) and not isinstance(engine, InEngineAggregation)
    plan = make_plan(
        labels=["A", "B"],
        epsilon=4.0,
        shots=1,
        max_tokens=4,
        regime=regime,
        q=0.5 if regime == "resampled" else None,
        mechanism="toy-noisy-max",
        prompts=2,
        candidates="public-topk",
        top_k=5,
    )
    gen = DemoGenerator(engine, plan, generic_task(["A", "B"]), rng=np.random.default_rng(2))
    assert not gen.uses_in_engine_aggregation()
    demos = gen.run(two_label_records(12))
    assert [d.label for d in demos] == ["A", "B"]
    assert all(set(d.text) <= set(engine.letters) for d in demos)
    assert engine.batches >= 2 and CALLS  # public and private batches; the toy drew
    assert plan.epsilon() <= 4.0


def test_engine_registry_cleans_up() -> None:
    assert engine_names() == ("embedded", "vllm", "upstream")
    with pytest.raises(ValueError, match="available: embedded, vllm, upstream"):
        load_engine("toy-engine")
    with pytest.raises(ValueError, match="built in"):
        unregister_engine("vllm")


def test_options_follow_the_spec_not_the_name(toy_mechanism: MechanismSpec) -> None:
    with pytest.raises(PlanError, match="public-prior"):
        make_plan(labels=["A"], mechanism="toy-noisy-max", public_prior=1.0)
    with pytest.raises(PlanError, match="gate"):
        make_plan(labels=["A"], mechanism="toy-noisy-max", gate_cutoff=2)


def test_registry_cleans_up_and_refuses_unknown_names() -> None:
    assert registry.names() == ("gaussian", "exponential", "clipped")
    with pytest.raises(PlanError, match="mechanism must be gaussian, exponential or clipped"):
        make_plan(labels=["A"], mechanism="toy-noisy-max")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("gaussian"))
    with pytest.raises(ValueError, match="built in"):
        registry.unregister("gaussian")
    assert math.isinf(make_plan(labels=["A"], epsilon=math.inf).epsilon())
