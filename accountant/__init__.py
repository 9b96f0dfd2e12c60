"""Privacy accounting for dpicl: job events, (ε, δ) figures, RDP curves and calibration.

A generation job declares one :class:`JobEvent` (its dominating privacy event); this package
turns it into ε at δ (PLD for the reported figure, RDP curves for the ledger's Rényi filter)
and calibrates noise to a target. Depends on dp_accounting and numpy only, nothing of ours.
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
from .calibration import calibrate
from .events import JobEvent

__all__ = [
    "DEFAULT_ORDERS",
    "JobEvent",
    "calibrate",
    "epsilon",
    "epsilon_from_rdp",
    "epsilon_pld",
    "epsilon_rdp",
    "gaussian_epsilon_exact",
    "rdp_curve",
]
