"""Privacy amplification of a pure-DP step by Poisson subsampling.

If a mechanism is ε0-DP under add/remove-one adjacency and runs on a Poisson subsample that
keeps each record independently with probability q, the composite is ε'-DP with

    ε' = ln(1 + q·(e^ε0 − 1))

(Balle, Barthe & Gaboardi 2018, Thm. 8 for Poisson sampling and add/remove). The resampled
regime of the exponential mechanism amplifies each step with this formula *before* composing;
going through zCDP first would discard the amplification.
"""

from __future__ import annotations

import math


def amplified_epsilon(epsilon0: float, q: float) -> float:
    """Return ε' = ln(1 + q(e^ε0 − 1)), the pure-DP level of one Poisson-subsampled ε0-DP step.

    Invariant: 0 < ε' ≤ ε0 for ε0 > 0 and q in (0, 1], with equality at q = 1. Computed without
    overflow for large ε0 and without cancellation for small ε0.
    """
    if not (epsilon0 > 0 and math.isfinite(epsilon0)):
        raise ValueError(f"epsilon0 must be a finite number > 0; got {epsilon0!r}")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1]; got {q!r}")
    if q == 1.0:
        return float(epsilon0)
    if epsilon0 < 1.0:
        value = math.log1p(q * math.expm1(epsilon0))
    else:
        # ln((1 − q) + q·e^ε0) = ε0 + ln(q + (1 − q)·e^−ε0): no overflow for large ε0.
        value = epsilon0 + math.log(q + (1.0 - q) * math.exp(-epsilon0))
    return min(value, float(epsilon0))
