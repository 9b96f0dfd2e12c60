"""Mechanisms: noise scale, selection law, sensitivity of the aggregate, one draw per position.

Statistical tests use z-scores against the exact selection probabilities with |z| < 5; for a
correct implementation each check fails with probability < 5.8e-7 (two-sided normal tail);
the file makes 15 such checks, so its false-positive rate is below 15 × 5.8e-7 < 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dp_decoding.generate import DemoGenerator
from dp_decoding.mechanisms import (
    ExponentialMechanism,
    GaussianNoisyArgmax,
    aggregate,
)
from dp_decoding.plan import make_plan
from prompts import generic_task
from tests.fakes import CountingRng, FakeEngine, two_label_records

Z = 5.0
TRIALS = 20_000


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _z(hits: int, n: int, p: float) -> float:
    return (hits - n * p) / math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("sigma", [0.5, 2.0, 7.0])
def test_gaussian_selection_matches_sigma(sigma: float) -> None:
    """With scores (0, d): P(pick 1) = Φ(d / (σ√2)) exactly when the noise std is σ."""
    rng = np.random.default_rng(1)
    mech = GaussianNoisyArgmax(sigma)
    d = sigma
    hits = sum(mech.select(np.array([0.0, d]), rng) for _ in range(TRIALS))
    p = _phi(d / (sigma * math.sqrt(2)))
    assert abs(_z(hits, TRIALS, p)) < Z
    # power: the same counts are far from what half or double the noise would give
    for wrong in (sigma / 2, sigma * 2):
        assert abs(_z(hits, TRIALS, _phi(d / (wrong * math.sqrt(2))))) > Z


@pytest.mark.parametrize("eps0", [0.3, 1.0, 3.0])
def test_exponential_selection_law(eps0: float) -> None:
    rng = np.random.default_rng(2)
    mech = ExponentialMechanism(eps0)
    scores = np.array([0.0, 1.0, 2.5])
    counts = np.bincount([mech.select(scores, rng) for _ in range(TRIALS)], minlength=3)
    w = np.exp(eps0 * scores / 2)
    probs = w / w.sum()
    for c, p in zip(counts, probs, strict=True):
        assert abs(_z(int(c), TRIALS, float(p))) < Z


@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0])
def test_exponential_with_public_prior_selection_law(lam: float) -> None:
    """P(v) ∝ p_pub(v)^λ · exp(ε₀ s_v / 2): the prior multiplies, the private vote still
    decides the ratio between neighbours."""
    rng = np.random.default_rng(4)
    eps0 = 1.0
    mech = ExponentialMechanism(eps0, prior_weight=lam)
    scores = np.array([0.0, 1.0, 2.5])
    prior = np.log(np.array([0.6, 0.3, 0.1]))
    counts = np.bincount([mech.select(scores, rng, prior) for _ in range(TRIALS)], minlength=3)
    w = np.exp(eps0 * scores / 2 + lam * prior)
    for c, p in zip(counts, w / w.sum(), strict=True):
        assert abs(_z(int(c), TRIALS, float(p))) < Z


def _exp_probs(eps0: float, s: np.ndarray, prior: np.ndarray, lam: float) -> np.ndarray:
    z = eps0 * s / 2 + lam * prior
    w = np.exp(z - z.max())
    return w / w.sum()


@settings(max_examples=200, deadline=None)
@given(
    s=arrays(np.float64, 6, elements=st.floats(0, 8)),
    shift=arrays(np.float64, 6, elements=st.floats(-1, 1)),
    prior=arrays(np.float64, 6, elements=st.floats(-20, 0)),
    lam=st.floats(0, 3),
    eps0=st.floats(0.01, 4),
)
def test_public_prior_keeps_the_privacy_bound(
    s: np.ndarray, shift: np.ndarray, prior: np.ndarray, lam: float, eps0: float
) -> None:
    """Scores moved by ≤ 1 per coordinate (one prompt changed) change every outcome's log
    probability by ≤ ε₀ and every pairwise log ratio (bounded range) by ≤ ε₀, whatever the
    public prior: it is the same on both sides and cancels."""
    a = _exp_probs(eps0, s, prior, lam)
    b = _exp_probs(eps0, s + shift, prior, lam)
    assert np.max(np.abs(np.log(a) - np.log(b))) <= eps0 + 1e-9
    ratio = np.log(a) - np.log(b)
    assert ratio.max() - ratio.min() <= eps0 + 1e-9


def test_public_prior_is_declared_for_exponential_public_topk_only() -> None:
    from dp_decoding.plan import PlanError

    plan = make_plan(labels=["A"], mechanism="exponential", public_prior=1.0)
    mechanism = plan.mechanism_obj()
    assert isinstance(mechanism, ExponentialMechanism) and mechanism.prior_weight == 1.0
    assert plan.to_dict()["public_prior"] == 1.0
    for bad in ({"mechanism": "gaussian"}, {"mechanism": "exponential", "candidates": "all"}):
        with pytest.raises(PlanError):
            make_plan(labels=["A"], public_prior=1.0, **bad)  # type: ignore[arg-type]  # refused on purpose
    with pytest.raises(PlanError):
        make_plan(labels=["A"], mechanism="exponential", public_prior=-1.0)


def test_noiseless_limits_are_argmax() -> None:
    rng = np.random.default_rng(0)
    s = np.array([0.1, 3.0, 2.0])
    assert GaussianNoisyArgmax(0.0).select(s, rng) == 1
    assert ExponentialMechanism(math.inf).select(s, rng) == 1


rows = arrays(
    np.float64,
    st.tuples(st.integers(1, 6), st.integers(2, 9)),
    elements=st.floats(-30, 0, allow_nan=False),
)


@settings(max_examples=200, deadline=None)
@given(lp=rows, replacement=arrays(np.float64, 9, elements=st.floats(-30, 0)), i=st.integers(0, 5))
def test_aggregate_sensitivity(lp: np.ndarray, replacement: np.ndarray, i: int) -> None:
    """Changing one prompt's row moves the sum by ≤ √2 in L2 and ≤ 1 per coordinate."""
    i = i % lp.shape[0]
    other = lp.copy()
    other[i] = replacement[: lp.shape[1]]
    a, b = aggregate(lp), aggregate(other)
    assert np.isclose(a.sum(), lp.shape[0])
    assert np.linalg.norm(a - b) <= math.sqrt(2) + 1e-9
    assert np.max(np.abs(a - b)) <= 1 + 1e-9
    # add/remove of one whole prompt row
    fewer = aggregate(np.delete(lp, i, axis=0)) if lp.shape[0] > 1 else np.zeros(lp.shape[1])
    assert np.linalg.norm(a - fewer) <= 1 + 1e-9


def test_aggregate_handles_rows_without_mass() -> None:
    lp = np.array([[-np.inf, -np.inf], [0.0, -np.inf]])
    assert np.allclose(aggregate(lp), [1.5, 0.5])


@pytest.mark.parametrize("mechanism", ["gaussian", "exponential"])
@pytest.mark.parametrize("regime", ["fixed", "resampled"])
def test_exactly_one_noisy_draw_per_position(mechanism: str, regime: str) -> None:
    plan = make_plan(
        labels=["A", "B"],
        epsilon=2.0,
        shots=2,
        max_tokens=6,
        regime=regime,
        mechanism=mechanism,
        prompts=3,
        q=0.5 if regime == "resampled" else None,
        candidates="all",
    )
    records = two_label_records(20)
    rng = CountingRng()
    gen = DemoGenerator(FakeEngine(), plan, generic_task(["A", "B"]), rng=rng)  # type: ignore[arg-type]  # CountingRng duck-types the noise source
    demos = gen.run(records)
    # every released position (a kept token, or the stop token that ended a demonstration)
    # took exactly one draw
    positions = sum(d.tokens + (1 if d.tokens < plan.max_tokens else 0) for d in demos)
    assert rng.draws["normal"] + rng.draws["gumbel"] == positions
