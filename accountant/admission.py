"""Admission arithmetic: which Rényi filters a charge must pass, and what would still fit.

A charge is an event's RDP curve over :data:`DEFAULT_ORDERS`; a :class:`Filter` is one Rényi
filter taking part in an admission (the tenant's, or a capped key's own) with its running
spend at its order. Invariants:

* A charge is admitted only if EVERY filter admits it (:func:`refusing_filter` is None), with
  the exact comparison of :func:`accountant.filter.admits`.
* :func:`largest_admissible` never names a job that would be refused: every candidate ε is
  checked with the same rule, the rounded answer is checked again.
* The reference job shape is passed in (a callable ε → :class:`JobEvent`); this package knows
  nothing of the planner that defines it.

Nothing here reads or writes storage: callers build filters from their stored budgets and
spends, and store what :func:`accountant.filter.add_spent` returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal

import numpy as np

from .accounting import DEFAULT_ORDERS, rdp_curve
from .events import JobEvent
from .filter import RenyiBudget, admits, curve_value, make_budget

__all__ = [
    "Filter",
    "ReferenceShape",
    "cap_budget",
    "charge_at",
    "charge_curve",
    "largest_admissible",
    "refusing_filter",
    "tenant_budget",
]

ReferenceShape = Callable[[float], JobEvent]
"""The reference job shape: target ε → the event of that job (at a fixed δ)."""


def charge_curve(event: JobEvent) -> np.ndarray:
    """The RDP curve a job's event charges, over :data:`DEFAULT_ORDERS`."""
    return rdp_curve(event, DEFAULT_ORDERS)


def charge_at(curve: np.ndarray | Sequence[float], order: float) -> float:
    """The charge of ``curve`` at one filter's ``order`` (an order of DEFAULT_ORDERS)."""
    return curve_value(curve, DEFAULT_ORDERS, order)


@dataclass(frozen=True)
class Filter:
    """One Rényi filter taking part in an admission: the tenant's, or a capped key's."""

    which: str  # "tenant" or "key"
    budget: RenyiBudget
    spent: float

    @property
    def order(self) -> float:
        return self.budget.order

    def admits(self, curve: np.ndarray | Sequence[float]) -> bool:
        """Whether spent + this curve's charge at the filter's order ≤ B (exactly)."""
        return admits(self.budget, self.spent, charge_at(curve, self.order))


def refusing_filter(
    filters: Sequence[Filter], curve: np.ndarray | Sequence[float]
) -> Filter | None:
    """The first filter (in the given order) that refuses ``curve``; None if all admit it."""
    for f in filters:
        if not f.admits(curve):
            return f
    return None


def tenant_budget(epsilon: float, delta: float, reference_event: JobEvent) -> RenyiBudget:
    """A tenant's filter, fixed for good at creation: the order that fits the most jobs of
    ``reference_event``'s shape and the RDP budget B for (ε, δ) at that order."""
    return make_budget(epsilon, delta, charge_curve(reference_event), DEFAULT_ORDERS)


def cap_budget(cap: float, delta: float, reference: ReferenceShape) -> RenyiBudget:
    """A key cap's own filter: order and B for (cap, δ) and the reference shape at ε = cap.
    ValueError if no order has a positive budget."""
    try:
        return make_budget(cap, delta, charge_curve(reference(cap)), DEFAULT_ORDERS)
    except ValueError:
        raise ValueError("epsilon_cap is too small to admit any job at this delta") from None


def largest_admissible(filters: Sequence[Filter], reference: ReferenceShape, limit: float) -> float:
    """Largest target ε (3 significant digits, rounded down) such that ``reference(ε)`` would be
    admitted now by every filter in ``filters``; 0.0 if none.

    Bisection on ε starting from ``limit`` (the tenant's ε); every candidate is checked with
    the real admission rule, and the rounded result is checked again, so the figure never
    names a job that would be refused. Calibration makes the charge only roughly monotone in
    ε (noise within 1% of optimal), so a slightly larger ε may also fit. A reference that
    raises ValueError for some ε counts as "not admitted" there.
    """
    cache: dict[float, bool] = {}

    def admitted(eps: float) -> bool:
        if eps not in cache:
            try:
                cache[eps] = refusing_filter(filters, charge_curve(reference(eps))) is None
            except (ValueError, ArithmeticError):
                cache[eps] = False
        return cache[eps]

    floor = limit * 1e-6
    lo: float | None = None
    hi = limit
    while admitted(hi):
        lo = hi
        if hi >= limit * 1024:
            return _floor_3_digits(hi)
        hi *= 2.0
    if lo is None:
        lo = hi / 2.0
        while not admitted(lo):
            hi = lo
            lo /= 2.0
            if lo < floor:
                return 0.0
    for _ in range(200):
        if hi - lo <= 10.0 ** (math.floor(math.log10(lo)) - 3):
            break
        mid = (lo + hi) / 2.0
        if admitted(mid):
            lo = mid
        else:
            hi = mid
    result = _floor_3_digits(lo)
    for _ in range(1000):
        if result <= 0.0 or admitted(result):
            return result
        result = _step_down_3_digits(result)
    return 0.0


def _floor_3_digits(x: float) -> float:
    """x rounded DOWN to 3 significant digits (as the nearest float; callers re-check)."""
    if x <= 0 or not math.isfinite(x):
        return 0.0
    d = Decimal(repr(x))
    unit = Decimal(1).scaleb(d.adjusted() - 2)
    return float(d.quantize(unit, rounding=ROUND_FLOOR))


def _step_down_3_digits(x: float) -> float:
    """The 3-significant-digit number just below x (x already has 3 digits)."""
    d = Decimal(repr(x))
    unit = Decimal(1).scaleb(d.adjusted() - 2)
    return float(d - unit) if d - unit > 0 else 0.0
