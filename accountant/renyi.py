"""Closed-form Rényi-DP curves that dp_accounting does not offer under add/remove adjacency.

Randomized response with parameter ε (output the true bit with probability p = e^ε/(1+e^ε))
is the dominating pair of every ε-DP mechanism (Kairouz, Oh & Viswanath 2015): any ε-DP
mechanism's output distributions on neighbouring inputs are a post-processing of the pair
P = (p, 1−p), Q = (1−p, p), under either adjacency. By the data-processing inequality its
Rényi divergence is therefore a valid RDP curve of every ε-DP mechanism, and the tightest one
that depends on ε alone:

    D_α(P‖Q) = 1/(α−1) · log(p^α (1−p)^(1−α) + (1−p)^α p^(1−α)).

dp_accounting computes the same quantity for ``RandomizedResponseDpEvent(2/(1+e^ε), 2)`` but
only under REPLACE_ONE adjacency; the tests compare the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def randomized_response_rdp(epsilon: float, orders: Sequence[float]) -> np.ndarray:
    """Return D_α of ε-randomized response at each order α > 1.

    Invariant: every entry is ≤ min(ε, α·ε²/2) (the ε-DP and ε²/2-zCDP bounds, both valid for
    ε-DP mechanisms); the result is clipped to them to absorb floating-point rounding, so it is
    a valid RDP curve of any ε-DP mechanism.
    """
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number >= 0; got {epsilon!r}")
    alphas = np.asarray(orders, dtype=np.float64)
    if alphas.ndim != 1 or not np.all(alphas > 1.0):
        raise ValueError("orders must be a 1-d sequence of Rényi orders > 1")
    if epsilon == 0.0:
        return np.zeros_like(alphas)
    values = np.array([_rr_divergence(epsilon, float(a)) for a in alphas], dtype=np.float64)
    bound = np.minimum(epsilon, alphas * epsilon**2 / 2.0)
    return np.clip(values, 0.0, bound)


def _rr_divergence(epsilon: float, alpha: float) -> float:
    """D_α(P‖Q) for ε-randomized response, for one order α > 1.

    With p = e^ε/(1+e^ε) the sum inside the log equals
    (e^((α−1)ε) + e^(−αε)) / (1 + e^(−ε)) = 1 + N / (1 + e^(−ε)),
    N = expm1(a) + e^(−ε)·expm1(−a), a = (α−1)ε. For moderate a the log1p/expm1 form keeps
    full relative precision as α → 1 or ε → 0; for large a the logaddexp form avoids overflow.
    """
    a = (alpha - 1.0) * epsilon
    if a <= 1.0:
        n = math.expm1(a) + math.exp(-epsilon) * math.expm1(-a)
        log_sum = math.log1p(n / (1.0 + math.exp(-epsilon)))
    else:
        log_sum = float(np.logaddexp(a, -alpha * epsilon)) - math.log1p(math.exp(-epsilon))
    return log_sum / (alpha - 1.0)
