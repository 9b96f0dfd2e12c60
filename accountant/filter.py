"""The per-tenant Rényi filter: admit a job's charge only while the RDP sum fits the budget.

Theorem implemented
-------------------
Feldman & Zrnic 2021, "Individual Privacy Accounting via a Rényi Filter" (NeurIPS 2021),
Theorem 3.1 (adaptive composition of RDP with adaptively chosen parameters): fix an order
α > 1 and a budget B ≥ 0. Let the t-th mechanism be (α, ρ_t)-RDP where ρ_t may be chosen
after seeing the outputs of mechanisms 1..t−1. If Σ_t ρ_t ≤ B holds for every possible
history, the whole (adaptively stopped) interaction is (α, B)-RDP. A *filter* guarantees the
condition by construction: it admits the t-th charge only if Σ_{s<t} ρ_s + ρ_t ≤ B, and
otherwise refuses it (a refused job never runs and reads no data).

This module fixes **one** order α* per tenant, chosen at tenant creation from a fixed order
vector and never changed afterwards, so the single-order theorem applies as stated (a rule over
several orders would need its own theorem; we do not use one).

Budget conversion
-----------------
The tenant's (ε, δ) is turned into the RDP budget B(α) at the chosen order with the conversion
of Canonne, Kamath & Steinke 2020 ("The Discrete Gaussian for Differential Privacy"),
Proposition 12 (the same bound as Asoodeh et al. 2020, and the one dp_accounting's
``rdp.compute_epsilon`` and :func:`accountant.epsilon_from_rdp` use): an (α, ρ)-RDP mechanism
is (ε, δ)-DP with

    ε = ρ + log(1 − 1/α) − (log δ + log α)/(α − 1).

The right-hand side is ρ plus a constant, so the inversion is exact:

    B(α) = ε − log(1 − 1/α) + (log δ + log α)/(α − 1),

and Σ ρ_t ≤ B(α*) ⇔ the converted ε of the whole interaction at α* is ≤ the tenant's ε.
B(α) is never smaller than the classic budget ε − log(1/δ)/(α − 1) of Mironov 2017, Prop. 3
(the difference is −log(1 − 1/α) + log(α)/(α − 1) > 0), so it admits at least as much.

Floating point
--------------
Everything is computed in float64 and rounded *against* the tenant:

* :func:`rdp_budget_at` subtracts a margin of 16 machine epsilons times the magnitude of the
  terms it added, so the stored B is below the real-number B;
* :func:`admits` compares the *exact* real sum spent + charge with B (``fractions.Fraction``
  on the binary floats: no rounding at all), so "equal fits, one ulp over does not";
* :func:`add_spent` returns the float sum rounded *up* when it is inexact, so a running total
  is never below the real sum of the charges it holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from .accounting import DEFAULT_ORDERS
from .validation import check_delta, check_positive

__all__ = [
    "RenyiBudget",
    "add_spent",
    "admits",
    "choose_order",
    "curve_value",
    "make_budget",
    "rdp_budget_at",
]

_MARGIN_ULPS = 16.0


@dataclass(frozen=True)
class RenyiBudget:
    """A tenant's filter: the (ε, δ) it was created with, the fixed order and B at that order.

    Invariants: ε finite > 0, δ in (0, 1), order > 1, ``rdp_budget`` = :func:`rdp_budget_at`
    (ε, δ, order) > 0 when made by :func:`make_budget` (a key cap may give B ≤ 0: admits
    nothing).
    """

    epsilon: float
    delta: float
    order: float
    rdp_budget: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RenyiBudget:
        return cls(
            epsilon=float(data["epsilon"]),
            delta=float(data["delta"]),
            order=float(data["order"]),
            rdp_budget=float(data["rdp_budget"]),
        )


def rdp_budget_at(epsilon: float, delta: float, order: float) -> float:
    """B(α) = ε − log(1 − 1/α) + (log δ + log α)/(α − 1), rounded down (may be ≤ 0).

    The largest RDP value at ``order`` whose Canonne-Kamath-Steinke conversion to δ stays ≤ ε.
    """
    eps = check_positive("epsilon", epsilon)
    dlt = check_delta(delta)
    alpha = float(order)
    if not (math.isfinite(alpha) and alpha > 1.0):
        raise ValueError(f"order must be a finite Rényi order > 1; got {order!r}")
    t1 = math.log1p(-1.0 / alpha)  # < 0
    t2 = (math.log(dlt) + math.log(alpha)) / (alpha - 1.0)
    value = eps - t1 + t2
    margin = _MARGIN_ULPS * float(np.finfo(np.float64).eps) * (abs(eps) + abs(t1) + abs(t2))
    return value - margin


def choose_order(
    epsilon: float,
    delta: float,
    reference_curve: np.ndarray | Sequence[float],
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:
    """The order at which the most reference jobs fit: argmax of B(α)/ρ_ref(α) over the orders
    with B(α) > 0 (ties: the smallest such order).

    ``reference_curve`` is the RDP curve of the reference job shape on ``orders``. An infinite
    reference value counts as zero jobs; a zero value as infinitely many. Raises ValueError if
    no order has a positive budget or if no order fits any positive number of jobs.
    """
    curve = np.asarray(reference_curve, dtype=np.float64)
    alphas = [float(a) for a in orders]
    if curve.shape != (len(alphas),):
        raise ValueError(
            f"reference_curve must have one value per order ({len(alphas)}); got {curve.shape}"
        )
    if np.any(np.isnan(curve)) or np.any(curve < 0):
        raise ValueError("reference_curve must hold non-negative RDP values (inf allowed)")
    best_order: float | None = None
    best_ratio = 0.0
    for alpha, ref in zip(alphas, curve, strict=True):
        budget = rdp_budget_at(epsilon, delta, alpha)
        if budget <= 0:
            continue
        ratio = math.inf if ref == 0 else budget / float(ref)
        if ratio > best_ratio:
            best_order, best_ratio = alpha, ratio
    if best_order is None:
        raise ValueError(
            f"no order gives a positive RDP budget (or fits a reference job) for "
            f"epsilon={epsilon!r}, delta={delta!r}"
        )
    return best_order


def make_budget(
    epsilon: float,
    delta: float,
    reference_curve: np.ndarray | Sequence[float],
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> RenyiBudget:
    """Fix the tenant's filter: :func:`choose_order`, then B at that order."""
    order = choose_order(epsilon, delta, reference_curve, orders)
    return RenyiBudget(
        epsilon=float(epsilon),
        delta=float(delta),
        order=order,
        rdp_budget=rdp_budget_at(epsilon, delta, order),
    )


def admits(budget: RenyiBudget, spent_at_order: float, charge_at_order: float) -> bool:
    """True iff spent + charge ≤ B in exact real arithmetic on the given float64 values.

    No slack: equality fits, one ulp over does not. NaN or negative inputs, and infinite
    charges, are refused (fail closed).
    """
    spent = float(spent_at_order)
    charge = float(charge_at_order)
    limit = float(budget.rdp_budget)
    if not (math.isfinite(spent) and math.isfinite(charge) and math.isfinite(limit)):
        return False
    if spent < 0 or charge < 0:
        return False
    return Fraction(spent) + Fraction(charge) <= Fraction(limit)


def add_spent(spent_at_order: float, charge_at_order: float) -> float:
    """spent + charge as a float64 rounded *up* (never below the exact real sum)."""
    spent = float(spent_at_order)
    charge = float(charge_at_order)
    total = spent + charge
    if math.isfinite(total) and Fraction(total) < Fraction(spent) + Fraction(charge):
        total = math.nextafter(total, math.inf)
    return total


def curve_value(
    curve: np.ndarray | Sequence[float], orders: Sequence[float], order: float
) -> float:
    """The value of ``curve`` (one entry per order) at ``order``, which must be one of
    ``orders`` exactly (no interpolation: RDP curves are only valid where computed)."""
    alphas = [float(a) for a in orders]
    values = np.asarray(curve, dtype=np.float64)
    if values.shape != (len(alphas),):
        raise ValueError(f"curve must have one value per order ({len(alphas)}); got {values.shape}")
    target = float(order)
    for index, alpha in enumerate(alphas):
        if alpha == target:
            return float(values[index])
    raise ValueError(f"order {order!r} is not one of the curve's orders")
