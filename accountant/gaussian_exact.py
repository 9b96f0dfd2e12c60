"""Exact (ε, δ) of composed, unsampled Gaussian mechanisms (Gaussian DP).

T Gaussian steps with noise multiplier σ (noise std / L2 sensitivity) compose to μ-GDP with
μ = √T / σ (Dong, Roth & Su 2022), whose exact privacy profile is (Balle & Wang 2018)

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε · Φ(−ε/μ − μ/2),

strictly decreasing in ε and increasing in μ. This is the same curve the PLD accountant
approximates from above, in O(1) per evaluation; the tests check it against dp_accounting's
pessimistic and optimistic PLDs.
"""

from __future__ import annotations

import math

from .validation import check_delta, check_positive, check_steps

_SQRT2 = math.sqrt(2.0)
_REL_TOL = 1e-12


def _normal_cdf(x: float) -> float:
    """Φ(x), accurate in both tails (erfc has no cancellation for x ≪ 0)."""
    return 0.5 * math.erfc(-x / _SQRT2)


def gdp_delta(mu: float, epsilon: float) -> float:
    """δ(ε) of μ-GDP.

    Rounding only errs upwards: if Φ(−ε/μ − μ/2) underflows, the subtracted term is taken as 0,
    which over-states δ (pessimistic), and e^ε is never formed on its own (no overflow).
    """
    upper = _normal_cdf(-epsilon / mu + mu / 2.0)
    tail = _normal_cdf(-epsilon / mu - mu / 2.0)
    subtracted = math.exp(epsilon + math.log(tail)) if tail > 0.0 else 0.0
    return max(upper - subtracted, 0.0)


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest ε ≥ 0 with δ_μ(ε) ≤ δ, returned from the feasible side of a bisection.

    Invariant: gdp_delta(mu, result) ≤ delta, and the result exceeds the root by at most a
    relative 1e-12.
    """
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > _REL_TOL * hi:
        mid = 0.5 * (lo + hi)
        if gdp_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def gdp_mu(epsilon: float, delta: float) -> float:
    """Largest μ (to a relative 1e-12, from below) such that μ-GDP is (ε, δ)-DP."""
    lo, hi = 0.0, 1.0
    while gdp_delta(hi, epsilon) <= delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > _REL_TOL * hi:
        mid = 0.5 * (lo + hi)
        if gdp_delta(mid, epsilon) <= delta:
            lo = mid
        else:
            hi = mid
    return lo


def gaussian_epsilon_exact(noise_multiplier: float, steps: int, delta: float) -> float:
    """ε at δ of ``steps`` composed, unsampled Gaussian mechanisms, exactly.

    μ = √steps / noise_multiplier; ε solves δ = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2), found by
    bisection (δ(ε) is monotone) and returned from the side where δ(ε) ≤ δ, so the result is an
    upper bound on the exact value up to floating-point rounding of Φ.
    """
    sigma = check_positive("noise_multiplier", noise_multiplier)
    count = check_steps(steps)
    target = check_delta(delta)
    return gdp_epsilon(math.sqrt(count) / sigma, target)
