"""Which serving backend answers chat and completions on an engine.

:func:`backend_for` is the one place that knows every backend: :mod:`proxy.serving` (the step
loop, and the types every backend shares), :mod:`proxy.batching` (continuous batching on an
engine with resizable serving batches: the embedded engine) and :mod:`proxy.vllm_serving`
(vLLM's scheduler). Keeping the choice here, rather than in ``serving``, keeps the import graph
acyclic: ``batching, vllm_serving → serving``, ``backends → all three``.
"""

from __future__ import annotations

import sys

from dp_decoding.engines.base import Engine
from proxy.batching import BatchingBackend, supports_batching
from proxy.serving import Backend, StepLoopBackend

__all__ = ["BACKENDS", "Backend", "backend_for"]

BACKENDS = ("auto", "batching", "step-loop")
"""``dpicl serve --serving`` choices: ``auto`` is :func:`backend_for`'s pick; ``step-loop``
serves one request at a time per engine call (the baseline of bench/serving_batching.py)."""


def backend_for(engine: Engine, kind: str = "auto") -> Backend:
    """vLLM serving for a :class:`~dp_decoding.engines.vllm_engine.VLLMEngine` (its module is
    only looked up, never imported here, so the embedded path never imports vLLM), continuous
    batching for an engine that supports it (``kind="batching"`` insists on it), the step loop
    for every other engine (or with ``kind="step-loop"``)."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown serving backend {kind!r} (one of {', '.join(BACKENDS)})")
    if kind == "step-loop":
        return StepLoopBackend(engine)
    mod = sys.modules.get("dp_decoding.engines.vllm_engine")
    if kind == "auto" and mod is not None and isinstance(engine, mod.VLLMEngine):
        from proxy.vllm_serving import VLLMServing

        return VLLMServing(engine)
    if kind == "batching" or supports_batching(engine):
        return BatchingBackend(engine)
    return StepLoopBackend(engine)
