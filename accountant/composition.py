"""Composition of many heterogeneous job events, for the budget REPORT (never for admission).

Two figures for the same sequence of charged events:

* :func:`rdp_composed_epsilon`: the RDP curves summed over :data:`DEFAULT_ORDERS` and converted
  to ε at δ (valid under adaptive composition: what the ledger's charges add up to).
* :func:`compose_pld_epsilon`: privacy-loss distributions composed (tighter, but it assumes a
  non-adaptive sequence: information only).

Both are valid upper bounds for what they claim; neither takes part in admission, which is the
Rényi filter of :mod:`accountant.admission`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from dp_accounting import pld

from .accounting import (
    DEFAULT_ORDERS,
    PLD_VALUE_DISCRETIZATION,
    epsilon_from_rdp,
    epsilon_pld,
    rdp_curve,
)
from .events import JobEvent
from .validation import Mechanism, Regime

__all__ = [
    "GroupKey",
    "compose_pld_epsilon",
    "event_group",
    "pld_epsilon_of_groups",
    "rdp_composed_epsilon",
]

GroupKey = tuple[Mechanism, Regime, float | None, float | None, float | None]
"""(mechanism, regime, noise multiplier, ε0, q): events with one key compose by adding steps."""


def rdp_composed_epsilon(events: Sequence[JobEvent], delta: float) -> float:
    """ε at ``delta`` of the summed RDP curves of ``events`` over :data:`DEFAULT_ORDERS`
    (adaptive composition); 0.0 for no events."""
    if not events:
        return 0.0
    total = np.zeros(len(DEFAULT_ORDERS))
    for e in events:  # in order, as accountant.summary.SpendSummary adds them
        total = total + rdp_curve(e, DEFAULT_ORDERS)
    return float(epsilon_from_rdp(total, DEFAULT_ORDERS, delta))


def _number(x: float | None) -> float | None:
    return None if x is None else float(x)


def event_group(event: JobEvent) -> GroupKey:
    """The PLD group of ``event``: its mechanism's shape (its steps are what add up)."""
    return (
        event.mechanism,
        event.regime,
        _number(event.noise_multiplier),
        _number(event.epsilon0),
        _number(event.q),
    )


def pld_epsilon_of_groups(groups: Sequence[tuple[GroupKey, int]], delta: float) -> float:
    """:func:`compose_pld_epsilon` of events given as their groups' total PLD steps (what
    :class:`accountant.summary.SpendSummary` keeps); 0.0 for none. Cached by the groups."""
    if not groups:
        return 0.0
    return _compose_groups(tuple(sorted(groups, key=repr)), float(delta))


def compose_pld_epsilon(events: Sequence[JobEvent], delta: float) -> float:
    """ε at δ of the sequential composition of ``events`` via privacy-loss distributions.

    Identical mechanisms are grouped (their steps add up). All fixed-regime Gaussian groups
    fold exactly into one Gaussian (μ² = Σ steps/σ², Gaussian-DP composition); a single
    remaining group is handed to :func:`accountant.epsilon_pld` (exact for the fixed Gaussian,
    exact randomized-response PLD for exponential events). Several groups are composed as
    dp_accounting PLD objects on one pessimistic grid (``PLD_VALUE_DISCRETIZATION``, refined
    when the result is below 1): the Gaussian as ``from_gaussian_mechanism`` (with
    ``sampling_prob`` when resampled), an exponential step as ε-randomized response
    (``from_privacy_parameters(step ε, 0)``). Every figure is a valid upper bound. 0.0 for no
    events. This is NOT an admission rule (non-adaptive composition).
    """
    steps: dict[GroupKey, int] = {}
    for event in events:
        # a gated job's PLD is that of 2·steps pure ε0-DP steps (JobEvent.pure_steps)
        steps[event_group(event)] = steps.get(event_group(event), 0) + event.pure_steps
    return pld_epsilon_of_groups(list(steps.items()), delta)


@functools.lru_cache(maxsize=256)
def _compose_groups(groups: tuple[tuple[GroupKey, int], ...], delta: float) -> float:
    parts: list[JobEvent] = []
    gaussian_mu2 = 0.0
    for (mechanism, regime, sigma, eps0, q), count in groups:
        if mechanism == "gaussian" and regime == "fixed":
            assert sigma is not None  # a Gaussian event always has a noise multiplier
            gaussian_mu2 += count / (sigma * sigma)
        else:
            parts.append(JobEvent(mechanism, regime, count, sigma, eps0, q))
    if gaussian_mu2 > 0:
        parts.append(JobEvent("gaussian", "fixed", 1, noise_multiplier=1 / math.sqrt(gaussian_mu2)))
    if len(parts) == 1:
        return float(epsilon_pld(parts[0], delta))
    coarse = _compose_parts(parts, delta, PLD_VALUE_DISCRETIZATION)
    if coarse >= 1.0 or not math.isfinite(coarse):
        return coarse
    fine = _compose_parts(parts, delta, PLD_VALUE_DISCRETIZATION * max(coarse, 1e-3))
    return min(coarse, fine)


def _compose_parts(parts: list[JobEvent], delta: float, interval: float) -> float:
    relation = pld.privacy_loss_distribution.NeighborRel.ADD_OR_REMOVE_ONE
    total = None
    for event in parts:
        if event.mechanism == "gaussian":
            one = pld.privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=event.noise_multiplier,
                sensitivity=1.0,
                pessimistic_estimate=True,
                value_discretization_interval=interval,
                sampling_prob=1.0 if event.q is None else event.q,
                neighboring_relation=relation,
            )
        else:
            step = event.step_epsilon
            if step > 700.0:
                return math.inf
            one = pld.privacy_loss_distribution.from_privacy_parameters(
                pld.common.DifferentialPrivacyParameters(step, 0.0),
                value_discretization_interval=interval,
            )
        one = one.self_compose(event.steps) if event.steps > 1 else one
        total = one if total is None else total.compose(one)
    assert total is not None
    return float(total.get_epsilon_for_delta(delta))
