"""Calibrate a mechanism's noise to a target (ε, δ), never landing above the target.

A mechanism hands :func:`calibrate_event` an *event factory* (its noise parameter → the job's
:class:`JobEvent`) and the direction in which its parameter adds privacy; :func:`calibrate`
is the same search for the two built-in event kinds named by string.

The search runs on the reported figure :func:`accountant.accounting.epsilon` itself, so the
plan's promise and the ledger's number are the same function. ε is monotone in the parameter
(decreasing in the Gaussian noise multiplier σ, increasing in the exponential mechanism's ε0),
so a geometric bracket [infeasible, feasible] is shrunk by bisection on the log scale until
its ends are less than 1% apart, and the feasible end is returned. The postcondition is then
checked explicitly, not assumed:

* gaussian: ε(σ) ≤ target and ε(σ/1.01) > target (so σ ≤ 1.01·σ*);
* exponential: ε(ε0) ≤ target and ε(1.01·ε0) > target (so ε0 ≥ ε0*/1.01).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .accounting import epsilon
from .events import JobEvent
from .gaussian_exact import gdp_mu
from .validation import (
    MECHANISMS,
    check_choice,
    check_delta,
    check_regime,
    check_sampling_probability,
    check_steps,
)

RELATIVE_PRECISION = 1.01
_SHRINK = 1.0099  # stop a little inside 1.01 so that x·1.01 is past the bracket despite rounding
_PARAMETER_RANGE = (1e-8, 1e8)


EventFactory = Callable[[float], JobEvent]
"""A noise parameter (σ's noise multiplier, ε0, ...) → the job's :class:`JobEvent` at it."""


def calibrate_event(
    event_for: EventFactory,
    target_epsilon: float,
    delta: float,
    *,
    guess: Callable[[], float],
    noise_grows: bool,
) -> float:
    """The noise parameter ``x`` of ``event_for`` closest to the target with
    ``epsilon(event_for(x), delta) <= target_epsilon``: never above the target, within 1% of
    the optimum. The mechanism supplies the event factory; nothing here knows its name.

    ``noise_grows``: True when a larger parameter is more private (a noise multiplier: the
    smallest feasible x is returned, and ε(x/1.01) > target); False when a smaller one is (a
    per-step ε0: the largest feasible x, and ε(1.01·x) > target). ``guess()`` is the search's
    starting point, called only for a finite target. ``target_epsilon = inf`` is the
    non-private case: 0.0 (no noise) when ``noise_grows``, else ``math.inf``; neither is a
    valid event parameter, so the caller treats it as "no privacy event".

    Raises ValueError for a target ≤ 0 or NaN, δ outside (0, 1), an event the factory refuses,
    or a target that would put the parameter outside [1e-8, 1e8].
    """
    target = _check_target(target_epsilon)
    delta = check_delta(delta)
    if math.isinf(target):
        return 0.0 if noise_grows else math.inf

    def feasible(x: float) -> bool:
        return epsilon(event_for(x), delta) <= target

    if noise_grows:
        # Feasibility grows with the noise; search on 1/x, for which it shrinks like ε0's.
        return 1.0 / _largest_feasible(lambda x: feasible(1.0 / x), 1.0 / guess())
    return _largest_feasible(feasible, guess())


def calibrate(
    mechanism: str,
    regime: str,
    steps: int,
    target_epsilon: float,
    delta: float,
    q: float | None = None,
    *,
    gated: bool = False,
) -> float:
    """Smallest noise_multiplier (gaussian) or largest epsilon0 (exponential) such that
    ``epsilon(JobEvent(...), delta) <= target_epsilon``: :func:`calibrate_event` with the
    event factory of the named :class:`JobEvent` kind (kept for callers that name the event;
    the generation core's mechanisms pass their own factories). ``gated``: the exponential job
    with the public-token gate (``steps`` rounds of AboveThreshold + selection, both at ε0).

    GUARANTEED ≤ target (never "within tolerance above"), and within 1% of the optimum:

    * gaussian: the returned σ satisfies ε(σ) ≤ target and ε(σ/1.01) > target;
    * exponential: the returned ε0 satisfies ε(ε0) ≤ target and ε(1.01·ε0) > target.

    ``target_epsilon = inf`` is the non-private case: gaussian returns 0.0 (no noise) and
    exponential returns ``math.inf`` (argmax); neither is a valid ``JobEvent`` parameter, so a
    caller must treat it as "no privacy event" explicitly.

    Speed: each step of the search is one call of ``epsilon``; for the resampled Gaussian that
    is a PLD on a 1e-3 grid (``accounting.PLD_VALUE_DISCRETIZATION``), ~0.1 s for q = 0.01 and
    400 steps, and 8-10 calls suffice. The coarse grid keeps the figure a valid upper bound:
    dp_accounting's pessimistic PLD rounds every privacy loss up, so a coarser grid only makes
    the calibrated noise slightly (≈0.05%) larger, never the guarantee weaker.

    Raises ValueError for target ≤ 0 or NaN, δ outside (0, 1), steps < 1, q outside (0, 1] in
    the resampled regime or q given in the fixed regime, or a target so small (or large) that
    the parameter would leave [1e-8, 1e8].
    """
    check_choice("mechanism", mechanism, MECHANISMS)
    checked_regime = check_regime(regime)
    count = check_steps(steps)
    target = _check_target(target_epsilon)
    delta = check_delta(delta)
    q = check_sampling_probability(checked_regime, q)
    if mechanism == "gaussian":
        return calibrate_event(
            lambda sigma: JobEvent("gaussian", checked_regime, count, noise_multiplier=sigma, q=q),
            target,
            delta,
            guess=lambda: gaussian_guess(count, target, delta, q),
            noise_grows=True,
        )
    return calibrate_event(
        lambda eps0: JobEvent(
            "exponential", checked_regime, count, epsilon0=eps0, q=q, gated=gated
        ),
        target,
        delta,
        guess=lambda: exponential_guess(count * (5 if gated else 1), target, delta, q),
        noise_grows=False,
    )


def _largest_feasible(feasible: Callable[[float], bool], guess: float) -> float:
    """Largest x (to a factor 1.01) with ``feasible(x)``, for a monotone predicate that holds
    for small x and fails for large x.

    Invariant of the loop: feasible(lo) and not feasible(hi). Returns x with feasible(x) and
    not feasible(1.01·x), both evaluated.
    """
    low_limit, high_limit = _PARAMETER_RANGE
    x = min(max(guess, low_limit), high_limit)
    step = 1.2
    if feasible(x):
        lo = x
        hi = x * step
        while feasible(hi):
            lo = hi
            step *= step
            hi = lo * step
            if lo > high_limit:
                raise ValueError("target_epsilon is too large to calibrate; use math.inf")
    else:
        hi = x
        lo = x / step
        while not feasible(lo):
            hi = lo
            step *= step
            lo = hi / step
            if hi < low_limit:
                raise ValueError("target_epsilon is too small to be reached by this job")
    while hi / lo > _SHRINK:
        mid = math.sqrt(lo * hi)
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    # Check the postcondition rather than trust monotonicity of a discretised accountant.
    while feasible(lo * RELATIVE_PRECISION):
        lo *= RELATIVE_PRECISION
    return lo


def gaussian_guess(steps: int, target: float, delta: float, q: float | None) -> float:
    """σ from Gaussian DP: exact for the fixed regime; for Poisson sampling the CLT
    approximation μ ≈ q·√(steps·(e^(1/σ²) − 1)) (Dong, Roth & Su 2022, Thm. 6), a starting
    point only."""
    mu = gdp_mu(target, delta)
    if q is None or q == 1.0:
        return math.sqrt(steps) / mu
    ratio = mu / (q * math.sqrt(steps))
    return 1.0 / math.sqrt(math.log1p(ratio * ratio))


def exponential_guess(steps: int, target: float, delta: float, q: float | None) -> float:
    """ε0 from zCDP: total ρ with ρ + 2√(ρ·log(1/δ)) = target, split over steps (ε0²/8 per
    step when fixed; when resampled, ε'²/2 per amplified step, mapped back through the
    amplification formula). A starting point only."""
    log_inv_delta = math.log(1.0 / delta)
    rho = (math.sqrt(log_inv_delta + target) - math.sqrt(log_inv_delta)) ** 2
    if q is None:
        return math.sqrt(8.0 * rho / steps)
    step_epsilon = math.sqrt(2.0 * rho / steps)
    return math.log1p(math.expm1(min(step_epsilon, 700.0)) / q)


def _check_target(target_epsilon: float) -> float:
    if isinstance(target_epsilon, bool):
        raise ValueError(f"target_epsilon must be a number > 0; got {target_epsilon!r}")
    try:
        target = float(target_epsilon)
    except (TypeError, ValueError):
        raise ValueError(f"target_epsilon must be a number > 0; got {target_epsilon!r}") from None
    if math.isnan(target) or target <= 0:
        raise ValueError(f"target_epsilon must be a number > 0; got {target_epsilon!r}")
    return target
