"""The private-prediction mechanism (dp_decoding/prediction): calibration never above the target
and recomputed with dp_accounting, one unit moves one prompt, rows padded to a width that does
not depend on records, the Poisson sampler's rate, exactly one noise draw per release."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_decoding.prediction import make_predictor_plan, rows_for, vote_sum
from dp_decoding.prediction.mechanism import (
    PredictorError,
    aggregate_votes,
    participating_units,
    release,
    select_prompts,
)
from dp_decoding.records import Record, record_unit
from tests.fakes import CountingRng, FakeEngine, two_label_records

LABELS = ["A", "B"]


def _record(i: int, label: str = "A") -> Record:
    return Record(f"text {i}", label, record_unit(f"text {i}", label, None))


@pytest.mark.parametrize("sampling,q", [("poisson", 0.01), ("poisson", 0.3), ("partition", None)])
@pytest.mark.parametrize("eps", [0.1, 1.0, 4.0])
def test_calibration_never_above_target_and_matches_dp_accounting(
    sampling: str, q: float | None, eps: float
) -> None:
    plan = make_predictor_plan(labels=LABELS, epsilon=eps, delta=1e-6, sampling=sampling, q=q)
    nm = plan.sigma / math.sqrt(2.0)
    inner: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(nm)
    if q is not None:
        inner = dp_accounting.PoissonSampledDpEvent(q, inner)
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(inner)
    independent = acc.get_epsilon(1e-6)
    assert plan.achieved_epsilon() <= eps
    assert independent <= eps * 1.001
    assert independent >= eps * 0.95  # within the calibration's 1% of σ


def test_declared_parameters_are_checked() -> None:
    with pytest.raises(PredictorError, match="sampling_rate"):
        make_predictor_plan(labels=LABELS, epsilon=1.0, delta=1e-6)
    with pytest.raises(PredictorError, match="poisson"):
        make_predictor_plan(labels=LABELS, epsilon=1.0, delta=1e-6, sampling="partition", q=0.1)
    with pytest.raises(PredictorError, match="labels"):
        make_predictor_plan(labels=["A"], epsilon=1.0, delta=1e-6, q=0.1)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), m=st.integers(1, 6), cap=st.integers(1, 4), added=st.integers(0, 99))
def test_one_added_unit_moves_at_most_one_prompt(n: int, m: int, cap: int, added: int) -> None:
    plan = make_predictor_plan(
        labels=LABELS, epsilon=1.0, delta=1e-6, prompts=m, examples_per_prompt=cap, q=1.0
    )
    pool = [_record(i, LABELS[i % 2]) for i in range(n)]
    extra = _record(1000 + added, "B")
    key = b"k" * 32
    a = select_prompts(pool, plan, key, np.random.default_rng(0))
    b = select_prompts([*pool, extra], plan, key, np.random.default_rng(0))
    assert sum(x != y for x, y in zip(a, b, strict=True)) <= 1
    assert all(len(p) <= cap for p in b)


def test_votes_are_probability_vectors_and_one_prompt_moves_the_sum_by_at_most_sqrt2() -> None:
    g = np.random.default_rng(4)
    lp = g.normal(size=(8, 5))
    s = aggregate_votes(lp, "distribution")
    assert s.sum() == pytest.approx(8.0)
    moved = lp.copy()
    moved[3] = g.normal(size=5) * 10
    assert np.linalg.norm(aggregate_votes(moved, "distribution") - s) <= math.sqrt(2) + 1e-12
    one_hot = aggregate_votes(lp, "argmax")
    assert one_hot.sum() == 8 and set(np.unique(one_hot)) <= set(range(9))


def test_rows_share_one_width_that_does_not_depend_on_records() -> None:
    engine = FakeEngine()
    plan = make_predictor_plan(
        labels=LABELS, epsilon=1.0, delta=1e-6, prompts=4, examples_per_prompt=3, q=1.0
    )
    for pool in (two_label_records(3), two_label_records(60)):
        vote_sum(engine, plan, pool, "the query", np.random.default_rng(1), key=b"s" * 32)
    assert len(set(engine.widths)) == 1
    width = engine.widths[0]
    assert width is not None
    assert all(len(r) <= width for batch in engine.started for r in batch)
    assert width <= rows_for(engine, plan).worst_case(3)


def test_calibrated_votes_double_the_batch_and_stay_probability_vectors() -> None:
    engine = FakeEngine()
    plan = make_predictor_plan(
        labels=LABELS, epsilon=1.0, delta=1e-6, prompts=4, examples_per_prompt=2, q=1.0,
        calibrate=True,
    )  # fmt: skip
    s = vote_sum(engine, plan, two_label_records(20), "q", np.random.default_rng(2))
    assert len(engine.started[0]) == 8 and s.sum() == pytest.approx(4.0)


def test_poisson_rate() -> None:
    """Each unit participates with probability q: the count of 4,000 units at q = 0.3 is
    Binomial(4000, 0.3); |count − 1200| > 5.5 sd fails with probability < 1e-7."""
    plan = make_predictor_plan(labels=LABELS, epsilon=1.0, delta=1e-6, q=0.3)
    pool = [_record(i) for i in range(4000)]
    count = len(participating_units(pool, plan, np.random.default_rng()))
    assert abs(count - 1200) <= 5.5 * math.sqrt(4000 * 0.3 * 0.7)


def test_release_makes_exactly_one_normal_draw() -> None:
    plan = make_predictor_plan(labels=LABELS, epsilon=1.0, delta=1e-6, q=0.1)
    rng = CountingRng()
    assert release(np.array([3.0, 1.0]), plan, rng) in (0, 1)  # type: ignore[arg-type]  # a test double
    assert rng.draws == {"normal": 1}
