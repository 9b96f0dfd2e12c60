"""Input checks shared by the accountant's public functions.

Every check raises ``ValueError`` with one line naming the parameter and the value it got, so
that an HTTP layer can pass the message through unchanged (none of these values is private).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Literal

Mechanism = Literal["gaussian", "exponential"]
Regime = Literal["fixed", "resampled"]

MECHANISMS: tuple[str, ...] = ("gaussian", "exponential")
REGIMES: tuple[str, ...] = ("fixed", "resampled")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_regime(value: Any) -> Regime:
    """Return ``value`` as a :data:`Regime` if it is one (``check_choice`` for the regime)."""
    check_choice("regime", value, REGIMES)
    return "fixed" if value == "fixed" else "resampled"


def check_steps(steps: Any) -> int:
    """Return ``steps`` as an ``int`` >= 1 (bools and non-integral numbers are refused)."""
    if isinstance(steps, bool):
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    try:
        value = operator.index(steps)
    except TypeError:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}") from None
    if value < 1:
        raise ValueError(f"steps must be an integer >= 1; got {value}")
    return value


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` as a finite float > 0."""
    number = _as_float(name, value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return number


def check_delta(delta: Any) -> float:
    """Return ``delta`` as a float in the open interval (0, 1)."""
    number = _as_float("delta", delta)
    if not 0.0 < number < 1.0:
        raise ValueError(f"delta must be in (0, 1); got {delta!r}")
    return number


def check_sampling_probability(regime: str, q: Any) -> float | None:
    """Return ``q`` as a float in (0, 1] for the resampled regime; demand ``None`` for fixed."""
    if regime == "fixed":
        if q is not None:
            raise ValueError(f"q must be None in the fixed regime; got {q!r}")
        return None
    if q is None:
        raise ValueError("q (Poisson sampling probability) is required in the resampled regime")
    number = _as_float("q", q)
    if not 0.0 < number <= 1.0:
        raise ValueError(f"q must be in (0, 1] in the resampled regime; got {q!r}")
    return number


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a number; got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {value!r}") from None
    if math.isnan(number):
        raise ValueError(f"{name} must be a number; got NaN")
    return number
