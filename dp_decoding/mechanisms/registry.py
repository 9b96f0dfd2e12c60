"""Mechanisms by name: the one place where the plan's ``mechanism`` string is interpreted.

Adding a mechanism is one module that defines its sampler, sensitivity, event factory and
calibration hook as a :class:`~dp_decoding.mechanisms.base.MechanismSpec`, plus one line: a
:data:`_BUILTIN` entry here, or :func:`register` from outside (tests, plug-ins). The order of
registration is the order names are listed in (CLI choices, error messages).
"""

from __future__ import annotations

from dp_decoding.mechanisms import clipped, exponential, gaussian
from dp_decoding.mechanisms.base import MechanismSpec

_BUILTIN: tuple[MechanismSpec, ...] = (gaussian.SPEC, exponential.SPEC, clipped.SPEC)

_REGISTRY: dict[str, MechanismSpec] = {spec.name: spec for spec in _BUILTIN}


def register(spec: MechanismSpec, *, replace: bool = False) -> MechanismSpec:
    """Make ``spec`` available under ``spec.name``; refuses to shadow a registered name
    unless ``replace``. Returns the spec (usable as a one-line registration)."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"mechanism {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove ``name`` (tests clean up after themselves); built-ins cannot be removed."""
    if any(spec.name == name for spec in _BUILTIN):
        raise ValueError(f"mechanism {name!r} is built in")
    _REGISTRY.pop(name, None)


def get(name: str) -> MechanismSpec:
    """The spec registered under ``name``; KeyError naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown mechanism {name!r}; available: {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    """Registered mechanism names, in registration order."""
    return tuple(_REGISTRY)


def choices_text() -> str:
    """``"gaussian or exponential"`` (``"a, b or c"`` with more): for one-line messages."""
    listed = names()
    if len(listed) == 1:
        return listed[0]
    return ", ".join(listed[:-1]) + " or " + listed[-1]
