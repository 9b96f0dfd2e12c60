"""The Rényi filter (accountant.filter): exact admission, order choice, dp_accounting figures,
and adaptive sequences that never overrun the budget."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from dp_accounting import rdp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accountant import DEFAULT_ORDERS, JobEvent, epsilon_from_rdp, rdp_curve
from accountant.filter import (
    RenyiBudget,
    add_spent,
    admits,
    choose_order,
    curve_value,
    make_budget,
    rdp_budget_at,
)


def gaussian(sigma: float, steps: int = 64) -> JobEvent:
    return JobEvent("gaussian", "fixed", steps, noise_multiplier=sigma)


def reference_curve(sigma: float = 5.2) -> np.ndarray:
    return rdp_curve(gaussian(sigma), DEFAULT_ORDERS)


# -- exact admission ------------------------------------------------------------------------


def test_admits_equal_fits_one_ulp_over_does_not() -> None:
    b = RenyiBudget(epsilon=1.0, delta=1e-6, order=4.0, rdp_budget=1.0)
    assert admits(b, 0.5, 0.5)
    assert admits(b, 0.0, 1.0)
    assert not admits(b, 0.5, math.nextafter(0.5, math.inf))
    assert not admits(b, 0.0, math.nextafter(1.0, math.inf))
    # float addition would round 1 + 2^-53 down to 1.0 and wrongly admit; the exact sum does not
    assert 1.0 + 2.0**-53 == 1.0
    assert not admits(b, 1.0, 2.0**-53)
    # 0.1 + 0.2 in exact binary arithmetic lies between the floats 0.3 and 0.30000000000000004
    assert not admits(RenyiBudget(1.0, 1e-6, 4.0, 0.3), 0.1, 0.2)
    assert admits(RenyiBudget(1.0, 1e-6, 4.0, 0.1 + 0.2), 0.1, 0.2)


def test_admits_fails_closed_on_bad_numbers() -> None:
    b = RenyiBudget(1.0, 1e-6, 4.0, 1.0)
    for spent, charge in [(0.0, math.inf), (math.nan, 0.1), (0.0, math.nan), (-1.0, 0.5)]:
        assert not admits(b, spent, charge)
    assert not admits(RenyiBudget(1.0, 1e-6, 4.0, -0.5), 0.0, 0.0)


def test_add_spent_never_rounds_down() -> None:
    assert add_spent(1.0, 2.0**-53) > 1.0
    assert add_spent(0.5, 0.25) == 0.75  # exact sums are kept exact
    total = 0.0
    exact = Fraction(0)
    rng = np.random.default_rng(0)
    for value in rng.random(1000):
        total = add_spent(total, float(value))
        exact += Fraction(float(value))
        assert Fraction(total) >= exact


def test_curve_value_needs_an_exact_order() -> None:
    curve = reference_curve()
    assert curve_value(curve, DEFAULT_ORDERS, 4.4) == curve[list(DEFAULT_ORDERS).index(4.4)]
    with pytest.raises(ValueError):
        curve_value(curve, DEFAULT_ORDERS, 4.45)
    with pytest.raises(ValueError):
        curve_value(curve[:-1], DEFAULT_ORDERS, 4.4)


# -- the budget conversion ------------------------------------------------------------------


@pytest.mark.parametrize("epsilon,delta", [(8.0, 1e-6), (1.0, 1e-5), (0.3, 1e-8), (20.0, 1e-6)])
def test_budget_converts_back_to_at_most_epsilon(epsilon: float, delta: float) -> None:
    for order in DEFAULT_ORDERS:
        b = rdp_budget_at(epsilon, delta, order)
        classic = epsilon - math.log(1 / delta) / (order - 1)
        assert b > classic  # CKS Prop. 12 is never looser than Mironov Prop. 3
        if b <= 0:
            continue
        # dp_accounting's own conversion of B at this order gives back at most ε, and not less
        # than ε minus rounding: the inversion is exact up to the safety margin.
        converted, _ = rdp.compute_epsilon([order], [b], delta)
        assert converted <= epsilon
        assert converted >= epsilon - 1e-9


def test_choose_order_maximises_number_of_reference_jobs() -> None:
    for epsilon, sigma in [(8.0, 5.2), (1.0, 30.0), (2.0, 3.0), (50.0, 1.0)]:
        ref = reference_curve(sigma)
        order = choose_order(epsilon, 1e-6, ref)
        fits = {
            a: rdp_budget_at(epsilon, 1e-6, a) / r
            for a, r in zip(DEFAULT_ORDERS, ref, strict=True)
            if rdp_budget_at(epsilon, 1e-6, a) > 0
        }
        assert fits[order] == max(fits.values())
        jobs = {a: math.floor(v) for a, v in fits.items()}
        assert jobs[order] == max(jobs.values())


def test_choose_order_refuses_hopeless_budgets() -> None:
    with pytest.raises(ValueError):
        choose_order(1e-4, 1e-12, reference_curve(), orders=[1.1, 1.2])
    with pytest.raises(ValueError):
        choose_order(1.0, 1e-6, reference_curve()[:3])


def test_budget_round_trips_through_dict() -> None:
    b = make_budget(8.0, 1e-6, reference_curve())
    assert RenyiBudget.from_dict(b.to_dict()) == b
    assert b.order in DEFAULT_ORDERS
    assert b.rdp_budget == rdp_budget_at(8.0, 1e-6, b.order)


def test_gaussian_jobs_admitted_match_the_rdp_math() -> None:
    """Tenant (ε=8, δ=1e-6): the filter admits exactly k Gaussian jobs, where k is what the
    closed-form Gaussian RDP α·T/(2σ²) says, and the RDP sum of the k admitted jobs converts
    (dp_accounting, at α*) to at most 8 while k + 1 jobs would exceed it."""
    sigma, steps = 20.0, 64
    event = gaussian(sigma, steps)
    budget = make_budget(8.0, 1e-6, reference_curve())
    alpha = budget.order
    closed_form = alpha * steps / (2 * sigma**2)
    charge = curve_value(rdp_curve(event), DEFAULT_ORDERS, alpha)
    assert charge == pytest.approx(closed_form, rel=1e-12)
    k_math = math.floor(budget.rdp_budget / closed_form)
    assert k_math >= 5

    spent, admitted = 0.0, 0
    for _ in range(10 * k_math + 10):
        if not admits(budget, spent, charge):
            break
        spent = add_spent(spent, charge)
        admitted += 1
    assert admitted == k_math

    accountant = rdp.RdpAccountant(orders=[alpha])
    accountant.compose(event.dp_event(), admitted)
    assert accountant.get_epsilon(1e-6) <= 8.0
    accountant.compose(event.dp_event(), 1)
    assert accountant.get_epsilon(1e-6) > 8.0
    # the reported figure (min over all orders) is no larger than the figure at α*
    total = admitted * rdp_curve(event)
    assert epsilon_from_rdp(total, DEFAULT_ORDERS, 1e-6) <= 8.0


# -- adaptive sequences ---------------------------------------------------------------------

_SIGMAS = (0.8, 1.5, 3.0, 6.0, 12.0)
_EPS0 = (0.05, 0.2, 0.8)


def _draw_event(data: st.DataObject, remaining: float, alpha: float) -> JobEvent:
    kind = data.draw(st.sampled_from(["gaussian", "exp-fixed", "exp-resampled", "exact-fit"]))
    steps = data.draw(st.sampled_from([1, 4, 16, 64]))
    if kind == "gaussian":
        return gaussian(data.draw(st.sampled_from(_SIGMAS)), steps)
    if kind == "exp-fixed":
        return JobEvent("exponential", "fixed", steps, epsilon0=data.draw(st.sampled_from(_EPS0)))
    if kind == "exp-resampled":
        q = data.draw(st.sampled_from([0.01, 0.1, 0.5]))
        return JobEvent(
            "exponential", "resampled", steps, epsilon0=data.draw(st.sampled_from(_EPS0)), q=q
        )
    # adversarial: a one-step Gaussian sized (after seeing the state) to the remaining budget,
    # give or take a relative 1e-15
    fraction = data.draw(st.sampled_from([0.5, 1.0 - 1e-15, 1.0, 1.0 + 1e-15]))
    target = max(remaining * fraction, 1e-9)
    return gaussian(math.sqrt(alpha / (2 * target)), 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    epsilon=st.sampled_from([0.5, 2.0, 8.0]),
    delta=st.sampled_from([1e-5, 1e-6]),
)
def test_adaptive_sequences_never_exceed_the_budget(
    data: st.DataObject, epsilon: float, delta: float
) -> None:
    budget = make_budget(epsilon, delta, reference_curve())
    alpha = budget.order
    spent = 0.0
    exact = Fraction(0)
    total = np.zeros(len(DEFAULT_ORDERS))
    for _ in range(25):
        event = _draw_event(data, budget.rdp_budget - spent, alpha)
        curve = rdp_curve(event)
        charge = curve_value(curve, DEFAULT_ORDERS, alpha)
        if admits(budget, spent, charge):
            spent = add_spent(spent, charge)
            exact += Fraction(charge)
            total += curve
        # the invariants hold after every step, whatever the adversary chose
        assert exact <= Fraction(budget.rdp_budget)
        assert Fraction(spent) >= exact
        at_alpha, _ = rdp.compute_epsilon([alpha], [float(exact)], delta)
        assert at_alpha <= epsilon
        if exact > 0:
            assert epsilon_from_rdp(total, DEFAULT_ORDERS, delta) <= epsilon
        if data.draw(st.booleans(), label="stop"):
            break
