"""Argument checks of the store's public methods. Every failure is a ValueError whose message
names the argument, never its value (so no stored text is echoed back)."""

from __future__ import annotations

import math
from typing import Any, Literal, overload

__all__ = ["check_delta", "check_epsilon", "check_name"]


def check_epsilon(name: str, value: Any) -> float:
    """A finite number > 0 (not a bool), as float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0")
    return number


def check_delta(value: Any) -> float:
    """A number in (0, 1) (not a bool), as float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("delta must be a number")
    number = float(value)
    if not 0.0 < number < 1.0:
        raise ValueError("delta must be in (0, 1)")
    return number


@overload
def check_name(what: str, value: Any, optional: Literal[False] = False) -> str: ...
@overload
def check_name(what: str, value: Any, optional: bool) -> str | None: ...
def check_name(what: str, value: Any, optional: bool = False) -> str | None:
    """A non-empty string of at most 256 characters (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 256:
        raise ValueError(f"{what} must be a non-empty string of at most 256 characters")
    return value
