"""The public-token gate: its accounting, its sensitivity, its noise law, and the generation
loop's use of it (at most c private selections per demonstration, one decision per position).

Statistical checks use |z| < 5 against exact probabilities: each fails for a correct
implementation with probability < 5.8e-7; the file makes 4 such checks (false-positive rate
below 2.4e-6).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from accountant import JobEvent, calibrate, epsilon, epsilon_pld, rdp_curve
from accountant.renyi import randomized_response_rdp
from dp_decoding.generate import DemoGenerator
from dp_decoding.mechanisms import PublicTokenGate, aggregate
from dp_decoding.plan import PlanError, make_plan
from prompts import generic_task
from tests.accountant.test_accounting import binomial_rr_delta
from tests.fakes import CountingRng, FakeEngine, two_label_records

Z = 5.0
TRIALS = 20_000


# -- accounting ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("epsilon0", "rounds"), [(0.26, 10), (0.05, 40), (1.3, 3)])
def test_gated_pld_is_the_exact_composition_of_2c_pure_steps(epsilon0: float, rounds: int) -> None:
    event = JobEvent("exponential", "fixed", rounds, epsilon0=epsilon0, gated=True)
    ours = epsilon_pld(event, 1e-6)
    assert binomial_rr_delta(epsilon0, 2 * rounds, ours) <= 1e-6 * (1 + 1e-6)
    assert binomial_rr_delta(epsilon0, 2 * rounds, ours - 1e-3) > 1e-6
    assert ours == epsilon_pld(
        JobEvent("exponential", "fixed", 2 * rounds, epsilon0=epsilon0), 1e-6
    )


def test_gated_rdp_curve_is_selections_plus_randomized_response() -> None:
    orders = [1.5, 2.0, 8.0, 64.0]
    eps0, c = 0.3, 7
    curve = rdp_curve(JobEvent("exponential", "fixed", c, epsilon0=eps0, gated=True), orders)
    expected = c * eps0**2 / 8 * np.array(orders) + c * randomized_response_rdp(eps0, orders)
    np.testing.assert_allclose(curve, expected, rtol=1e-12)
    # the reported figure is the smaller of the PLD and this curve's conversion
    event = JobEvent("exponential", "fixed", c, epsilon0=eps0, gated=True)
    via_rdp, _ = rdp.compute_epsilon(orders, list(curve), 1e-6)
    assert epsilon(event, 1e-6) <= min(epsilon_pld(event, 1e-6), via_rdp) + 1e-12


def test_gated_event_validation_and_old_ledger_rows() -> None:
    with pytest.raises(ValueError, match="gate"):
        JobEvent("gaussian", "fixed", 3, noise_multiplier=1.0, gated=True)
    with pytest.raises(ValueError, match="gate"):
        JobEvent("exponential", "resampled", 3, epsilon0=1.0, q=0.1, gated=True)
    old = {"mechanism": "exponential", "regime": "fixed", "steps": 4, "epsilon0": 0.5, "q": None}
    assert JobEvent.from_dict(old).gated is False
    gated = JobEvent("exponential", "fixed", 4, epsilon0=0.5, gated=True)
    assert JobEvent.from_dict(gated.to_dict()) == gated


@pytest.mark.parametrize("target", [1.0, 4.0])
def test_gated_calibration_lands_at_or_below_target(target: float) -> None:
    eps0 = calibrate("exponential", "fixed", 5, target, 1e-6, gated=True)
    assert epsilon(JobEvent("exponential", "fixed", 5, epsilon0=eps0, gated=True), 1e-6) <= target
    above = JobEvent("exponential", "fixed", 5, epsilon0=eps0 * 1.01, gated=True)
    assert epsilon(above, 1e-6) > target


def test_plan_charges_c_rounds_and_validates() -> None:
    base: dict[str, Any] = dict(
        labels=["a"], epsilon=4.0, mechanism="exponential", max_tokens=20, prompts=8
    )
    plan = make_plan(**base, gate_cutoff=4)
    assert plan.steps == 4 and plan.event().gated and plan.gate_threshold == 0.5
    assert plan.epsilon() <= 4.0
    ungated = make_plan(**base)
    # c = T/5 rounds cost no more than T ungated selections (5·ε0²/8 vs ε0²/8 zCDP per
    # round; the PLD of 2c pure steps is tighter still): each private token gets as much ε0
    assert plan.epsilon0 is not None and ungated.epsilon0 is not None
    assert plan.epsilon0 >= ungated.epsilon0
    bad: list[tuple[dict[str, Any], str]] = [
        (dict(gate_cutoff=21), "between 1 and max-tokens"),
        (dict(gate_cutoff=0), "between 1 and max-tokens"),
        (dict(gate_cutoff=4, gate_threshold=1.5), "gate-threshold"),
        (dict(gate_threshold=0.3), "cutoff"),
        (dict(gate_cutoff=4, mechanism="gaussian"), "fixed regime, the exponential"),
        (dict(gate_cutoff=4, regime="resampled", q=0.1), "fixed regime, the exponential"),
        (dict(gate_cutoff=4, candidates="all"), "fixed regime, the exponential"),
    ]
    for kw, msg in bad:
        with pytest.raises(PlanError, match=msg):
            make_plan(**{**base, **kw})


# -- the gate's query and noise ----------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    lp=arrays(np.float64, (6, 9), elements=st.floats(-30, 0)),
    replacement=arrays(np.float64, (9,), elements=st.floats(-30, 0)),
    public=arrays(np.float64, (9,), elements=st.floats(-30, 0)),
    i=st.integers(0, 5),
)
def test_gate_distance_has_sensitivity_one(
    lp: np.ndarray, replacement: np.ndarray, public: np.ndarray, i: int
) -> None:
    gate = PublicTokenGate(1.0, 0.5, 3)
    other = lp.copy()
    other[i] = replacement
    d1 = gate.distance(aggregate(lp), public)
    d2 = gate.distance(aggregate(other), public)
    assert 0.0 <= d1 <= 6 + 1e-9
    assert abs(d1 - d2) <= 1.0 + 1e-9


def _laplace_cdf(x: float, b: float) -> float:
    return 0.5 * math.exp(x / b) if x < 0 else 1 - 0.5 * math.exp(-x / b)


def _z(hits: int, n: int, p: float) -> float:
    return (hits - n * p) / math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize(("eps", "gap"), [(0.5, 3.0), (1.0, -2.0)])
def test_gate_answers_follow_the_laplace_law(eps: float, gap: float) -> None:
    """P(above) for a fixed noisy threshold t and distance d is P(Lap(4/ε) ≥ t − d)."""
    gate = PublicTokenGate(eps, 0.5, 1)
    rng = np.random.default_rng()
    t = 5.0
    hits = sum(gate.above(t - gap, t, rng) for _ in range(TRIALS))
    p = 1 - _laplace_cdf(gap, 4 / eps)
    assert abs(_z(hits, TRIALS, p)) < Z


def test_gate_threshold_noise_is_laplace_2_over_eps() -> None:
    eps, members = 0.8, 10
    gate = PublicTokenGate(eps, 0.4, 1)
    rng = np.random.default_rng()
    draws = np.array([gate.new_threshold(members, rng) for _ in range(TRIALS)])
    for x in (4.0 - 1.0, 4.0 + 2.5):
        p = _laplace_cdf(x - 4.0, 2 / eps)
        assert abs(_z(int((draws <= x).sum()), TRIALS, p)) < Z


# -- the generation loop -------------------------------------------------------------------------
@pytest.mark.parametrize(("threshold", "cutoff"), [(0.05, 2), (0.5, 3), (1.0, 4)])
def test_at_most_c_private_selections_and_one_decision_per_position(
    threshold: float, cutoff: int
) -> None:
    plan = make_plan(
        labels=["A", "B"],
        epsilon=2.0,
        shots=2,
        max_tokens=8,
        mechanism="exponential",
        prompts=3,
        top_k=8,
        gate_cutoff=cutoff,
        gate_threshold=threshold,
    )
    rng = CountingRng(5)
    gen = DemoGenerator(FakeEngine(), plan, generic_task(["A", "B"]), rng=rng)  # type: ignore[arg-type]  # CountingRng duck-types the noise source
    selections: list[int] = []
    mechanism = gen.mechanism

    def spy(*a, **k):
        selections.append(1)
        return mechanism.select(*a, **k)

    gen.mechanism = type("Spy", (), {"select": staticmethod(spy)})()
    demos = gen.run(two_label_records(30))
    groups = len(plan.labels) * plan.shots
    assert len(selections) <= cutoff * groups
    # every released position took exactly one Gumbel draw: a selection or a public draw
    positions = sum(d.tokens + (1 if d.tokens < plan.max_tokens else 0) for d in demos)
    assert rng.draws["gumbel"] == positions
    # gate draws (grid Laplace, one ``geometric(size=2)`` call each from a numpy source): one
    # query per position while private tokens are left, one threshold per instance; at most c
    # instances per demonstration
    assert 0 < rng.draws["geometric"] <= positions + cutoff * groups


def test_private_rows_stop_once_every_gate_of_the_wave_is_spent() -> None:
    """ε = ∞ and a tiny θ make every position "above" until the cutoff: the private batch is
    read for exactly c positions, then closed; the rest of the demonstration is public."""
    cutoff, T = 2, 8
    plan = make_plan(
        labels=["A"],
        epsilon=math.inf,
        max_tokens=T,
        mechanism="exponential",
        prompts=3,
        top_k=8,
        gate_cutoff=cutoff,
        gate_threshold=1e-9,
    )

    class NeverStops(DemoGenerator):  # every demonstration runs all T positions
        def _is_stop(self, token: int) -> bool:
            return False

    engine = FakeEngine()
    gen = NeverStops(engine, plan, generic_task(["A"]), rng=CountingRng(5))  # type: ignore[arg-type]  # CountingRng duck-types the noise source
    (demo,) = gen.run(two_label_records(10))
    private = [b for b in engine.batches if b.rows == plan.M]
    public = [b for b in engine.batches if b.rows == 1]
    assert len(private) == 1 and len(public) == 1
    assert private[0].calls == cutoff and private[0].closed
    assert demo.tokens == T and public[0].calls == T  # the public model wrote the rest


def test_a_threshold_no_vote_can_pass_releases_only_public_tokens() -> None:
    """ε = ∞ makes the gate exact; θ = 1 needs TV = 1, which a softmax never reaches: every
    token is the public model's, and the mechanism never runs."""
    plan = make_plan(
        labels=["A"],
        epsilon=math.inf,
        max_tokens=6,
        mechanism="exponential",
        prompts=3,
        top_k=8,
        gate_cutoff=3,
        gate_threshold=1.0,
    )
    gen = DemoGenerator(FakeEngine(), plan, generic_task(["A"]), rng=CountingRng(5))  # type: ignore[arg-type]  # CountingRng duck-types the noise source
    calls: list[int] = []

    def select(*a: Any, **k: Any) -> int:
        calls.append(1)
        return 0

    gen.mechanism = type("Never", (), {"select": select})()
    gen.run(two_label_records(10))
    assert calls == []
