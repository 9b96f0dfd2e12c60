"""What a mechanism is to the rest of the core: a sampler and a spec.

A *sampler* (:class:`Mechanism`) is a small immutable object holding its calibrated noise; it
makes exactly one noisy draw on the aggregated scores and returns only an index, and it
declares the :class:`accountant.JobEvent` of ``steps`` compositions of itself.

A *spec* (:class:`MechanismSpec`) is what the plan needs before any record is read: the
sensitivity, the calibration hook (target ε → the plan's noise fields, through an event
factory handed to :func:`accountant.calibration.calibrate_event`), how to build the sampler
from a plan, the accounting sentence shown with the plan, and which options it admits (the
public prior, the public-token gate). Specs are found by name in
:mod:`dp_decoding.mechanisms.registry`; the plan's ``mechanism`` string is looked up there
and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from accountant import JobEvent
from dp_decoding.noise import NoiseSource


@runtime_checkable
class Mechanism(Protocol):
    """A calibrated sampler: one noisy draw per call, only the index leaves."""

    @property
    def name(self) -> str: ...

    @property
    def sensitivity(self) -> float: ...

    def select(self, scores: np.ndarray, rng: NoiseSource, prior: np.ndarray | None = None) -> int:
        """Index of the chosen candidate; ``prior`` is the public prompt's log-probabilities
        of the candidates (data-free) or None."""
        ...

    def event(self, steps: int, q: float | None) -> JobEvent:
        """The event of ``steps`` compositions (Poisson-subsampled at ``q`` when given)."""
        ...


@runtime_checkable
class RowMechanism(Mechanism, Protocol):
    """A mechanism that reads the rows themselves: the M private rows' log-probabilities and
    the public row's (the data-free public prompt's, from its own engine call), and chooses
    its candidate set from the public row alone. The generation loop starts the public prompt
    for it whatever the plan's candidates, and calls :meth:`select_rows` instead of
    ``select`` (which such a mechanism refuses)."""

    def candidates(self, public_logprobs: np.ndarray) -> np.ndarray:
        """Candidate ids from the public row's full-vocabulary log-probabilities (the plan's
        public top-k, widened as the mechanism needs)."""
        ...

    def select_rows(self, logprobs: np.ndarray, public: np.ndarray, rng: NoiseSource) -> int:
        """Index of the chosen column; ``logprobs`` ``[M, K]`` private rows, ``public`` ``[K]``
        the public row over the same columns. Exactly one noisy draw."""
        ...


class PlanNoise(Protocol):
    """The plan fields a spec builds its sampler from (:class:`dp_decoding.plan.Plan` has
    them; typed structurally so that mechanisms never import the plan)."""

    @property
    def sigma(self) -> float | None: ...

    @property
    def epsilon0(self) -> float | None: ...

    @property
    def public_prior(self) -> float: ...

    @property
    def M(self) -> int: ...

    @property
    def top_k(self) -> int | None: ...


Calibrator = Callable[[str, int, float, float, float | None, bool], dict[str, Any]]
"""``(regime, steps, target ε, δ, q, gated) → the plan's noise fields`` (``sigma`` or
``epsilon0``): calibrated so that the event charged is at most the target."""


@dataclass(frozen=True)
class MechanismSpec:
    """One mechanism as the plan sees it. Invariant: ``sampler(plan).event(steps, q)`` is the
    event ``calibrate`` searched over, at the parameter it returned, so the plan's ε is the
    calibrated one."""

    name: str
    sensitivity: float
    calibrate: Calibrator
    sampler: Callable[[PlanNoise], Mechanism]
    accounting: Callable[[str, bool], str]
    """``(regime, gated) → the plan's "accounting" sentence``."""
    public_prior: bool = False
    """Admits the public prior λ (its utility may take a data-free term)."""
    gate: bool = False
    """Admits the public-token gate: its selection must be ε0-bounded-range at the gate's ε0
    (the gated event charges each round's selection as ε0²/8 zCDP, which ε0-DP alone does not
    give)."""
