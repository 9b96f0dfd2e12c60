"""Which serving backend answers chat and completions on an engine.

:func:`backend_for` is the one place that knows both backends: :mod:`proxy.serving` (the
step loop, and the types every backend shares) and :mod:`proxy.vllm_serving` (vLLM's
scheduler). Keeping the choice here, rather than in ``serving``, keeps the import graph
acyclic: ``vllm_serving → serving``, ``backends → serving, vllm_serving``.
"""

from __future__ import annotations

import sys

from dp_decoding.engines.base import Engine
from proxy.serving import Backend, StepLoopBackend

__all__ = ["Backend", "backend_for"]


def backend_for(engine: Engine) -> Backend:
    """vLLM serving for a :class:`~dp_decoding.engines.vllm_engine.VLLMEngine` (its module is
    only looked up, never imported here, so the embedded path never imports vLLM), the step
    loop for every other engine."""
    mod = sys.modules.get("dp_decoding.engines.vllm_engine")
    if mod is not None and isinstance(engine, mod.VLLMEngine):
        from proxy.vllm_serving import VLLMServing

        return VLLMServing(engine)
    return StepLoopBackend(engine)
