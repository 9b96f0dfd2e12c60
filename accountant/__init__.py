"""Privacy accounting for dpicl: job events, (ε, δ) figures, RDP curves, calibration and
admission.

A generation job declares one :class:`JobEvent` (its dominating privacy event); this package
turns it into ε at δ (PLD for the reported figure, RDP curves for the ledger's Rényi filter),
calibrates noise to a target, decides admission against one or more Rényi filters
(:mod:`accountant.admission`) and composes many events for the budget report
(:mod:`accountant.composition`), incrementally from a running :class:`SpendSummary`
(:mod:`accountant.summary`). Depends on dp_accounting and numpy only, nothing of ours:
the reference job shape that admission reports against is passed in by the caller.
"""

from .accounting import (
    DEFAULT_ORDERS,
    epsilon,
    epsilon_from_rdp,
    epsilon_pld,
    epsilon_rdp,
    gaussian_epsilon_exact,
    rdp_curve,
)
from .admission import (
    Filter,
    ReferenceShape,
    cap_budget,
    charge_at,
    charge_curve,
    largest_admissible,
    refusing_filter,
    tenant_budget,
)
from .calibration import calibrate
from .composition import compose_pld_epsilon, rdp_composed_epsilon
from .events import JobEvent
from .filter import RenyiBudget, add_spent
from .summary import SpendSummary, summarize

__all__ = [
    "DEFAULT_ORDERS",
    "Filter",
    "JobEvent",
    "ReferenceShape",
    "RenyiBudget",
    "SpendSummary",
    "add_spent",
    "calibrate",
    "cap_budget",
    "charge_at",
    "charge_curve",
    "compose_pld_epsilon",
    "epsilon",
    "epsilon_from_rdp",
    "epsilon_pld",
    "epsilon_rdp",
    "gaussian_epsilon_exact",
    "largest_admissible",
    "rdp_composed_epsilon",
    "rdp_curve",
    "refusing_filter",
    "summarize",
    "tenant_budget",
]
