"""Tests for accountant.events / accounting: every figure is checked against an independent
computation (dp_accounting built separately here, or a brute-force formula)."""

from __future__ import annotations

import json
import math
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from accountant import (
    DEFAULT_ORDERS,
    JobEvent,
    epsilon,
    epsilon_from_rdp,
    epsilon_pld,
    epsilon_rdp,
    gaussian_epsilon_exact,
    rdp_curve,
)
from accountant.amplification import amplified_epsilon
from accountant.renyi import randomized_response_rdp

ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


# ---------------------------------------------------------------------------------------------
# Independent reference computations.


def pld_subsampled_gaussian(sigma: float, q: float, steps: int, delta: float, vdi: float) -> float:
    acc = pld.PLDAccountant(neighboring_relation=ADD_REMOVE, value_discretization_interval=vdi)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def pld_gaussian(sigma: float, steps: int, delta: float, pessimistic: bool) -> float:
    dist = pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma / math.sqrt(steps),
        pessimistic_estimate=pessimistic,
        value_discretization_interval=1e-4,
    )
    return dist.get_epsilon_for_delta(delta)


def pld_pure(step_epsilon: float, steps: int, delta: float) -> float:
    """Default 1e-4 grid: pessimistic rounding of the step ε up to the grid."""
    base = pld.privacy_loss_distribution.from_privacy_parameters(
        pld.common.DifferentialPrivacyParameters(step_epsilon, 0.0)
    )
    return base.self_compose(steps).get_epsilon_for_delta(delta)


def rdp_reference(event: dp_accounting.DpEvent, delta: float, relation=ADD_REMOVE) -> float:
    acc = rdp.RdpAccountant(orders=list(DEFAULT_ORDERS), neighboring_relation=relation)
    acc.compose(event)
    return acc.get_epsilon(delta)


def binomial_rr_delta(step_epsilon: float, steps: int, eps: float) -> float:
    """Exact δ(ε) of `steps` composed ε-randomized responses: the privacy loss is
    (2k − steps)·step_epsilon with k ~ Binomial(steps, e^ε/(1+e^ε))."""
    log_p = -math.log1p(math.exp(-step_epsilon))
    log_1mp = -step_epsilon + log_p
    total = 0.0
    for k in range(steps + 1):
        loss = (2 * k - steps) * step_epsilon
        if loss <= eps:
            continue
        log_mass = (
            math.lgamma(steps + 1)
            - math.lgamma(k + 1)
            - math.lgamma(steps - k + 1)
            + k * log_p
            + (steps - k) * log_1mp
        )
        total += math.exp(log_mass) * -math.expm1(eps - loss)
    return total


# ---------------------------------------------------------------------------------------------
# The reported figure equals a direct dp_accounting computation.


@pytest.mark.parametrize(
    "sigma,q,steps,delta",
    [(0.39, 6.7e-4, 100, 3.3e-5), (1.0, 0.01, 400, 1e-6), (2.0, 0.2, 50, 1e-6)],
)
def test_gaussian_resampled_equals_pld_accountant(sigma, q, steps, delta):
    event = JobEvent("gaussian", "resampled", steps, noise_multiplier=sigma, q=q)
    ours = epsilon(event, delta)
    # Same grid: identical computation.
    assert ours == pld_subsampled_gaussian(sigma, q, steps, delta, vdi=1e-3)
    # Ten times finer grid: our coarser (still pessimistic) figure is within 0.2%.
    fine = pld_subsampled_gaussian(sigma, q, steps, delta, vdi=1e-4)
    assert fine - 1e-9 <= ours <= fine * 1.002
    assert epsilon_pld(event, delta) == ours


@pytest.mark.parametrize(
    "sigma,steps,delta",
    [(10.0, 100, 1e-5), (30.0, 1000, 1e-6), (1.0, 1, 1e-5), (3.0, 20, 1e-8), (1.0, 10, 1e-3)],
)
def test_gaussian_closed_form_equals_pld(sigma, steps, delta):
    """Exact GDP lies between dp_accounting's optimistic and pessimistic PLDs (grid 1e-4),
    which are at most 0.1% apart here."""
    exact = gaussian_epsilon_exact(sigma, steps, delta)
    upper = pld_gaussian(sigma, steps, delta, pessimistic=True)
    lower = pld_gaussian(sigma, steps, delta, pessimistic=False)
    assert lower - 1e-9 <= exact <= upper + 1e-9
    assert upper - exact <= 1e-3 * max(1.0, exact)
    event = JobEvent("gaussian", "fixed", steps, noise_multiplier=sigma)
    assert epsilon(event, delta) == exact == epsilon_pld(event, delta)
    assert epsilon_rdp(event, delta) == pytest.approx(
        rdp_reference(dp_accounting.GaussianDpEvent(sigma), delta)
        if steps == 1
        else rdp_reference(
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), steps), delta
        ),
        rel=1e-12,
    )


@pytest.mark.parametrize(
    "epsilon0,steps,delta", [(0.1, 100, 1e-6), (0.05, 400, 1e-6), (1.0, 10, 1e-5)]
)
def test_exponential_fixed_is_min_of_pld_and_zcdp(epsilon0, steps, delta):
    event = JobEvent("exponential", "fixed", steps, epsilon0=epsilon0)
    pld_ref = pld_pure(epsilon0, steps, delta)  # ε0 on the 1e-4 grid: no rounding
    zcdp_event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.ZCDpEvent(epsilon0**2 / 8.0), steps
    )
    rdp_ref = rdp_reference(zcdp_event, delta)
    assert epsilon_pld(event, delta) == pytest.approx(pld_ref, rel=1e-9)
    assert epsilon_rdp(event, delta) == pytest.approx(rdp_ref, rel=1e-12)
    ours = epsilon(event, delta)
    # Our zCDP conversion uses a denser order grid, so it may only be (slightly) smaller.
    assert 0.98 * min(pld_ref, rdp_ref) <= ours <= min(pld_ref, rdp_ref) + 1e-12
    assert ours <= epsilon_pld(event, delta)


@pytest.mark.parametrize(
    "epsilon0,q,steps,delta",
    [
        (2.73, 2e-3, 100, 2.5e-5),
        (1.0, 0.05, 200, 1e-6),
        (0.3, 1.0, 50, 1e-6),
        (5.0, 0.01, 30, 1e-6),
    ],
)
def test_exponential_resampled_is_amplified_pure_dp(epsilon0, q, steps, delta):
    event = JobEvent("exponential", "resampled", steps, epsilon0=epsilon0, q=q)
    step = math.log1p(q * math.expm1(epsilon0))
    ours = epsilon(event, delta)
    assert ours == epsilon_pld(event, delta)
    # dp_accounting on its default grid rounds ε' up to 1e-4 per step: ours is below it by at
    # most steps·1e-4.
    reference = pld_pure(step, steps, delta)
    assert reference - steps * 1e-4 - 1e-9 <= ours <= reference + 1e-9
    # And ours is the exact binomial composition: δ(ours) = δ (from above).
    exact_delta = binomial_rr_delta(step, steps, ours)
    assert exact_delta <= delta * (1 + 1e-6)
    assert binomial_rr_delta(step, steps, ours - 1e-3) > delta


def test_exponential_fixed_pld_is_exact_binomial():
    epsilon0, steps, delta = 0.0123, 300, 1e-6  # not on any decimal grid
    ours = epsilon_pld(JobEvent("exponential", "fixed", steps, epsilon0=epsilon0), delta)
    assert binomial_rr_delta(epsilon0, steps, ours) <= delta * (1 + 1e-6)
    assert binomial_rr_delta(epsilon0, steps, ours - 1e-3) > delta


# ---------------------------------------------------------------------------------------------
# Reference numbers from the anchors ([ran]).


def test_anchor_numbers():
    unsampled = JobEvent("gaussian", "fixed", 100, noise_multiplier=10.0)
    assert epsilon(unsampled, 1e-5) == pytest.approx(4.377, abs=1e-3)
    assert epsilon_rdp(unsampled, 1e-5) == pytest.approx(4.729, abs=1e-3)
    big = JobEvent("gaussian", "fixed", 1000, noise_multiplier=30.0)
    assert epsilon(big, 1e-6) == pytest.approx(5.189, abs=1e-3)
    assert epsilon_rdp(big, 1e-6) == pytest.approx(5.543, abs=1e-3)
    agnews = JobEvent("gaussian", "resampled", 100, noise_multiplier=0.39, q=6.7e-4)
    assert epsilon(agnews, 3.3e-5) == pytest.approx(3.82, abs=0.02)
    assert epsilon_rdp(agnews, 3.3e-5) == pytest.approx(5.60, abs=0.02)
    em1 = JobEvent("exponential", "fixed", 100, epsilon0=0.1)
    assert epsilon_pld(em1, 1e-6) == pytest.approx(4.78, abs=0.01)
    em2 = JobEvent("exponential", "fixed", 400, epsilon0=0.05)
    assert epsilon_pld(em2, 1e-6) == pytest.approx(4.86, abs=0.01)
    # Bounded range / zCDP is tighter still for the exponential mechanism.
    assert epsilon(em1, 1e-6) < 0.6 * epsilon_pld(em1, 1e-6)
    dbpedia_em = JobEvent("exponential", "resampled", 100, epsilon0=2.73, q=2e-3)
    assert epsilon(dbpedia_em, 2.5e-5) == pytest.approx(0.98, abs=0.01)


# ---------------------------------------------------------------------------------------------
# Randomized-response RDP and amplification.


@settings(max_examples=60, deadline=None)
@given(
    eps=st.floats(min_value=1e-4, max_value=30.0),
    alpha=st.sampled_from([1.01, 1.1, 1.5, 2.0, 3.7, 10.0, 63.0, 256.0, 1024.0]),
)
def test_rr_rdp_matches_dp_accounting_and_bounds(eps, alpha):
    ours = float(randomized_response_rdp(eps, [alpha])[0])
    acc = rdp.RdpAccountant(orders=[alpha], neighboring_relation=REPLACE_ONE)
    acc.compose(dp_accounting.RandomizedResponseDpEvent(2.0 / (1.0 + math.exp(eps)), 2))
    reference = float(acc.rdp[0])
    assert ours == pytest.approx(reference, rel=1e-6, abs=1e-12)
    assert 0.0 <= ours <= min(eps, alpha * eps**2 / 2.0) + 1e-15


@pytest.mark.parametrize("eps", [1e-3, 0.05, 0.5, 2.0, 8.0])
def test_rr_rdp_brute_force(eps):
    orders = [1.25, 2.0, 5.0, 20.0]
    p = math.exp(eps) / (1.0 + math.exp(eps))
    brute = [
        math.log(p**a * (1 - p) ** (1 - a) + (1 - p) ** a * p ** (1 - a)) / (a - 1) for a in orders
    ]
    np.testing.assert_allclose(randomized_response_rdp(eps, orders), brute, rtol=1e-8)


def test_rr_rdp_near_order_one_tends_to_kl():
    for eps in [1e-4, 1e-2, 1.0]:
        kl = eps * math.tanh(eps / 2.0)  # KL of ε-randomized response
        value = float(randomized_response_rdp(eps, [1.0 + 1e-7])[0])
        assert value == pytest.approx(kl, rel=1e-5)


@settings(max_examples=80, deadline=None)
@given(
    eps0=st.floats(min_value=1e-3, max_value=30.0),
    q=st.floats(min_value=1e-6, max_value=1.0),
)
def test_amplification_matches_subsampled_randomized_response(eps0, q):
    """Brute force: RR on a Poisson-sampled record vs RR without it (add/remove): the largest
    absolute log-ratio of the two output distributions is the amplified ε'."""
    p, not_p = 1.0 / (1.0 + math.exp(-eps0)), 1.0 / (1.0 + math.exp(eps0))
    with_record = np.array([q * p + (1 - q) * not_p, q * not_p + (1 - q) * p])
    without = np.array([not_p, p])
    brute = float(np.max(np.abs(np.log(with_record) - np.log(without))))
    ours = amplified_epsilon(eps0, q)
    assert ours == pytest.approx(brute, rel=1e-9, abs=1e-12)
    assert ours == pytest.approx(math.log1p(q * math.expm1(eps0)), rel=1e-12)
    assert 0.0 < ours <= eps0


def test_amplification_edges():
    assert amplified_epsilon(0.7, 1.0) == 0.7
    assert amplified_epsilon(1000.0, 0.5) == pytest.approx(1000.0 + math.log(0.5))
    assert amplified_epsilon(1.0, 0.1) < amplified_epsilon(1.0, 0.2)


def test_exponential_resampled_rdp_curve_matches_dp_accounting():
    event = JobEvent("exponential", "resampled", 70, epsilon0=1.5, q=0.03)
    acc = rdp.RdpAccountant(orders=list(DEFAULT_ORDERS), neighboring_relation=REPLACE_ONE)
    acc.compose(event.dp_event())  # RR dominating pair, the event's declared dp_event
    np.testing.assert_allclose(rdp_curve(event), acc.rdp, rtol=1e-8)
    assert epsilon_rdp(event, 1e-6) == pytest.approx(acc.get_epsilon(1e-6), rel=1e-8)
    # The reported (PLD) figure is the tighter one.
    assert epsilon(event, 1e-6) <= epsilon_rdp(event, 1e-6)


# ---------------------------------------------------------------------------------------------
# RDP curves add up across jobs (the ledger's Rényi filter).


def test_rdp_curves_add_up():
    jobs = [
        JobEvent("gaussian", "resampled", 100, noise_multiplier=0.8, q=0.01),
        JobEvent("gaussian", "fixed", 40, noise_multiplier=20.0),
        JobEvent("exponential", "fixed", 60, epsilon0=0.2),
    ]
    total = sum((rdp_curve(job) for job in jobs), np.zeros(len(DEFAULT_ORDERS)))
    acc = rdp.RdpAccountant(orders=list(DEFAULT_ORDERS), neighboring_relation=ADD_REMOVE)
    for job in jobs:
        acc.compose(job.dp_event())
    np.testing.assert_allclose(total, acc.rdp, rtol=1e-12)
    assert epsilon_from_rdp(total, DEFAULT_ORDERS, 1e-6) == pytest.approx(
        acc.get_epsilon(1e-6), rel=1e-12
    )
    # And a job built independently of JobEvent composes to the same curve.
    independent = rdp.RdpAccountant(orders=list(DEFAULT_ORDERS), neighboring_relation=ADD_REMOVE)
    independent.compose(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(0.8)), 100
    )
    np.testing.assert_allclose(rdp_curve(jobs[0]), independent.rdp, rtol=1e-12)


def test_rdp_curve_custom_orders_and_copy():
    event = JobEvent("gaussian", "fixed", 3, noise_multiplier=2.0)
    orders = (2.0, 4.0, 8.0)
    np.testing.assert_allclose(rdp_curve(event, orders), [3 * a / 8.0 for a in orders])
    curve = rdp_curve(event, orders)
    curve[:] = -1.0  # callers get a fresh array; the cache is not shared
    assert rdp_curve(event, orders)[0] == pytest.approx(0.75)


def test_default_orders_match_dp_accounting():
    expected = tuple(float(a) for a in rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    assert expected == DEFAULT_ORDERS


@pytest.mark.parametrize(
    "curve,orders,delta",
    [([1.0], (2.0, 3.0), 1e-6), ([1.0, -1.0], (2.0, 3.0), 1e-6), ([1.0], (1.0,), 1e-6)]
    + [([1.0], (2.0,), d) for d in (0.0, 1.0, -1e-6)],
)
def test_epsilon_from_rdp_rejects_bad_input(curve, orders, delta):
    with pytest.raises(ValueError):
        epsilon_from_rdp(curve, orders, delta)


# ---------------------------------------------------------------------------------------------
# JobEvent: validation and the ledger's JSON round trip.


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mechanism="laplace", regime="fixed", steps=1, noise_multiplier=1.0),
        dict(mechanism="gaussian", regime="sometimes", steps=1, noise_multiplier=1.0),
        dict(mechanism="gaussian", regime="fixed", steps=0, noise_multiplier=1.0),
        dict(mechanism="gaussian", regime="fixed", steps=2.5, noise_multiplier=1.0),
        dict(mechanism="gaussian", regime="fixed", steps=True, noise_multiplier=1.0),
        dict(mechanism="gaussian", regime="fixed", steps=1),
        dict(mechanism="gaussian", regime="fixed", steps=1, noise_multiplier=0.0),
        dict(mechanism="gaussian", regime="fixed", steps=1, noise_multiplier=-1.0),
        dict(mechanism="gaussian", regime="fixed", steps=1, noise_multiplier=math.inf),
        dict(mechanism="gaussian", regime="fixed", steps=1, noise_multiplier=math.nan),
        dict(mechanism="gaussian", regime="fixed", steps=1, noise_multiplier=1.0, epsilon0=1.0),
        dict(mechanism="gaussian", regime="fixed", steps=1, noise_multiplier=1.0, q=0.5),
        dict(mechanism="gaussian", regime="resampled", steps=1, noise_multiplier=1.0),
        dict(mechanism="gaussian", regime="resampled", steps=1, noise_multiplier=1.0, q=0.0),
        dict(mechanism="gaussian", regime="resampled", steps=1, noise_multiplier=1.0, q=1.5),
        dict(mechanism="exponential", regime="fixed", steps=1),
        dict(mechanism="exponential", regime="fixed", steps=1, epsilon0=0.0),
        dict(mechanism="exponential", regime="fixed", steps=1, epsilon0=1.0, noise_multiplier=1),
        dict(mechanism="exponential", regime="resampled", steps=1, epsilon0=1.0, q=-0.1),
    ],
)
def test_job_event_validation(kwargs):
    with pytest.raises(ValueError):
        JobEvent(**kwargs)


def test_job_event_normalises_numbers():
    # A numpy integer on purpose (the point of the test): JobEvent normalises it to int.
    steps: Any = np.int64(5)
    a = JobEvent("gaussian", "resampled", steps, noise_multiplier=np.float64(2), q=1)
    b = JobEvent("gaussian", "resampled", 5, noise_multiplier=2.0, q=1.0)
    assert a == b and hash(a) == hash(b)
    assert type(a.steps) is int and type(a.noise_multiplier) is float and type(a.q) is float


events = st.one_of(
    st.builds(
        JobEvent,
        mechanism=st.just("gaussian"),
        regime=st.just("fixed"),
        steps=st.integers(1, 10_000),
        noise_multiplier=st.floats(1e-3, 1e3),
    ),
    st.builds(
        JobEvent,
        mechanism=st.just("gaussian"),
        regime=st.just("resampled"),
        steps=st.integers(1, 10_000),
        noise_multiplier=st.floats(1e-3, 1e3),
        q=st.floats(1e-6, 1.0),
    ),
    st.builds(
        JobEvent,
        mechanism=st.just("exponential"),
        regime=st.sampled_from(["fixed"]),
        steps=st.integers(1, 10_000),
        epsilon0=st.floats(1e-4, 50.0),
    ),
    st.builds(
        JobEvent,
        mechanism=st.just("exponential"),
        regime=st.just("resampled"),
        steps=st.integers(1, 10_000),
        epsilon0=st.floats(1e-4, 50.0),
        q=st.floats(1e-6, 1.0),
    ),
)


@settings(max_examples=100, deadline=None)
@given(event=events)
def test_job_event_dict_round_trip(event):
    data = json.loads(json.dumps(event.to_dict()))
    assert JobEvent.from_dict(data) == event
    assert isinstance(event.dp_event(), dp_accounting.SelfComposedDpEvent)


def test_job_event_from_dict_rejects_unknown_and_missing_keys():
    good = JobEvent("gaussian", "fixed", 3, noise_multiplier=1.0).to_dict()
    with pytest.raises(ValueError):
        JobEvent.from_dict({**good, "sigma": 1.0})
    with pytest.raises(ValueError):
        JobEvent.from_dict({k: v for k, v in good.items() if k != "steps"})
    with pytest.raises(ValueError):
        JobEvent.from_dict([("mechanism", "gaussian")])  # type: ignore[arg-type]  # not a dict, on purpose
    assert JobEvent.from_dict(
        {"mechanism": "gaussian", "regime": "fixed", "steps": 3, "noise_multiplier": 1.0}
    ) == JobEvent.from_dict(good)


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, math.nan])
def test_epsilon_rejects_bad_delta(delta):
    event = JobEvent("gaussian", "fixed", 3, noise_multiplier=1.0)
    for fn in (epsilon, epsilon_pld, epsilon_rdp):
        with pytest.raises(ValueError):
            fn(event, delta)
    with pytest.raises(ValueError):
        gaussian_epsilon_exact(1.0, 3, delta)


@settings(max_examples=30, deadline=None)
@given(
    sigma=st.floats(0.3, 50.0),
    steps=st.integers(1, 2000),
    delta=st.sampled_from([1e-10, 1e-6, 1e-5, 1e-3]),
)
def test_gaussian_closed_form_is_monotone_and_below_rdp(sigma, steps, delta):
    eps = gaussian_epsilon_exact(sigma, steps, delta)
    assert eps <= gaussian_epsilon_exact(sigma * 0.99, steps, delta)
    assert eps <= gaussian_epsilon_exact(sigma, steps, delta / 2)
    event = JobEvent("gaussian", "fixed", steps, noise_multiplier=sigma)
    assert eps <= epsilon_rdp(event, delta) + 1e-9


@pytest.mark.parametrize("sigma,steps", [(15000.0, 10), (50.0, 100), (3.0, 30)])
def test_resampled_with_q_one_matches_exact_gaussian(sigma, steps):
    """q = 1 is the unsampled Gaussian: the PLD figure is above the exact one and within 0.2%
    of it, also at small ε (where the PLD grid is refined)."""
    delta = 1e-6
    exact = gaussian_epsilon_exact(sigma, steps, delta)
    resampled = epsilon(
        JobEvent("gaussian", "resampled", steps, noise_multiplier=sigma, q=1.0), delta
    )
    assert exact - 1e-12 <= resampled <= exact * 1.002
