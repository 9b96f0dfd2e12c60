"""A running summary of a ledger's charges, from which the budget report's figures follow in
time that does not grow with the number of charges.

:class:`SpendSummary` holds what composes additively:

* the RDP curves summed over :data:`DEFAULT_ORDERS` (plain float addition, in charge order:
  the same sum :func:`accountant.composition.rdp_composed_epsilon` computes), so the RDP
  figure (:meth:`SpendSummary.epsilon_rdp`) is exact;
* the PLD steps grouped by mechanism shape (integers: exact), which is all that
  :func:`accountant.composition.compose_pld_epsilon` reads of the events, so the PLD figure
  (:meth:`SpendSummary.epsilon_pld`) equals the full recomposition; its cost grows with the
  number of *distinct* shapes, not of charges, and it is cached by the groups;
* the naive ε and δ sums and the number of charges.

:meth:`SpendSummary.add` folds in one charge; :func:`summarize` folds a whole sequence (what
``dpicl ledger verify`` recomputes from the rows to check a stored summary). The encoding
(:meth:`SpendSummary.to_json`) is exact: floats as ``float.hex``, infinities included.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from .accounting import DEFAULT_ORDERS, epsilon_from_rdp
from .admission import charge_curve
from .composition import GroupKey, event_group, pld_epsilon_of_groups
from .events import JobEvent
from .validation import MECHANISMS, REGIMES, Mechanism, Regime, check_choice

__all__ = ["SpendSummary", "summarize"]


@dataclass(frozen=True)
class SpendSummary:
    """The additive part of a sequence of charges (see the module docstring)."""

    rdp: tuple[float, ...]
    groups: tuple[tuple[GroupKey, int], ...]  # sorted by repr of the key, steps > 0
    epsilon_naive: float
    delta_naive: float
    count: int

    @classmethod
    def empty(cls) -> SpendSummary:
        return cls((0.0,) * len(DEFAULT_ORDERS), (), 0.0, 0.0, 0)

    def add(
        self,
        event: JobEvent,
        epsilon: float,
        delta: float,
        curve: np.ndarray | Sequence[float] | None = None,
    ) -> SpendSummary:
        """This summary with one more charge (``curve``: the event's RDP curve over
        :data:`DEFAULT_ORDERS`, if the caller has it already)."""
        values = charge_curve(event) if curve is None else np.asarray(curve, dtype=np.float64)
        if values.shape != (len(DEFAULT_ORDERS),):
            raise ValueError("curve must have one value per order of DEFAULT_ORDERS")
        rdp = tuple(float(v) for v in np.asarray(self.rdp, dtype=np.float64) + values)
        steps = dict(self.groups)
        key = event_group(event)
        steps[key] = steps.get(key, 0) + event.pure_steps
        return SpendSummary(
            rdp,
            tuple(sorted(steps.items(), key=repr)),
            self.epsilon_naive + float(epsilon),
            self.delta_naive + float(delta),
            self.count + 1,
        )

    def epsilon_rdp(self, delta: float) -> float:
        """ε at ``delta`` of the summed RDP curves (0.0 for no charges)."""
        if self.count == 0:
            return 0.0
        return float(epsilon_from_rdp(np.asarray(self.rdp), DEFAULT_ORDERS, delta))

    def epsilon_pld(self, delta: float) -> float:
        """ε at ``delta`` of the charges composed as privacy-loss distributions."""
        return pld_epsilon_of_groups(self.groups, delta)

    def to_json(self) -> dict[str, str]:
        """Column values: ``rdp`` and ``groups`` as exact JSON text."""
        return {
            "rdp": json.dumps([v.hex() for v in self.rdp]),
            "groups": json.dumps([[_key_json(k), n] for k, n in self.groups]),
        }

    @classmethod
    def from_json(
        cls, rdp: str, groups: str, epsilon_naive: float, delta_naive: float, count: int
    ) -> SpendSummary:
        """The inverse of :meth:`to_json` (ValueError if malformed)."""
        try:
            values = tuple(float.fromhex(v) for v in json.loads(rdp))
            pairs = tuple((_key_from_json(k), int(n)) for k, n in json.loads(groups))
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError("malformed spend summary") from exc
        if len(values) != len(DEFAULT_ORDERS):
            raise ValueError("malformed spend summary")
        return cls(values, pairs, float(epsilon_naive), float(delta_naive), int(count))


def _key_json(key: GroupKey) -> list[Any]:
    mechanism, regime, sigma, eps0, q = key
    return [
        mechanism,
        regime,
        None if sigma is None else float(sigma).hex(),
        None if eps0 is None else float(eps0).hex(),
        None if q is None else float(q).hex(),
    ]


def _key_from_json(raw: list[Any]) -> GroupKey:
    mechanism, regime, sigma, eps0, q = raw

    def num(x: Any) -> float | None:
        return None if x is None else float.fromhex(x)

    check_choice("mechanism", mechanism, MECHANISMS)
    check_choice("regime", regime, REGIMES)
    return (
        cast(Mechanism, mechanism),
        cast(Regime, regime),
        num(sigma),
        num(eps0),
        num(q),
    )


def summarize(charges: Iterable[tuple[JobEvent, float, float]]) -> SpendSummary:
    """The summary of ``(event, epsilon, delta)`` charges, folded in order."""
    total = SpendSummary.empty()
    for event, epsilon, delta in charges:
        total = total.add(event, epsilon, delta)
    return total
