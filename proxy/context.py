"""What every route needs, built once per app: the :class:`AppContext`.

:func:`proxy.app.create_app` builds one context and stores it on ``app.state.context``; routes
receive it through the :func:`get_context` dependency (never a module global), so two apps in
one process (tests, benchmarks) never share a store, an engine or a metrics registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fastapi import Request

from dp_decoding.engines.base import Engine
from proxy.jobs import JobRunner
from proxy.limits import DEFAULT_LIMITS, Limits
from proxy.metrics import Metrics
from proxy.serving import Backend
from proxy.store import Store

__all__ = ["AppContext", "BatchQueue", "get_context"]


class BatchQueue(Protocol):
    """What the Batch API's routes ask of :class:`proxy.batches.BatchRunner` (a protocol, so
    that this module does not import the runner, which imports it)."""

    def submit(self, batch_id: str) -> None: ...

    def cancel(self, batch_id: str) -> None: ...


@dataclass(frozen=True)
class AppContext:
    """The app's collaborators.

    ``store`` is the ledger (the only place that admits and charges), ``engine`` the single
    model shared by private jobs and serving, ``backend`` the chat/completions sampler on that
    engine, ``runner`` the background job runner (None when jobs are not run, e.g. tests),
    ``base_model`` the engine's model id (a name no demonstration set may take) and
    ``metrics_key`` the bearer token of ``/metrics`` (None: metrics disabled) and ``limits``
    what a client may send (:mod:`proxy.limits`).
    """

    store: Store
    engine: Engine
    metrics: Metrics
    backend: Backend
    runner: JobRunner | None
    base_model: str
    metrics_key: str | None = None
    limits: Limits = DEFAULT_LIMITS
    batches: BatchQueue | None = None


def get_context(request: Request) -> AppContext:
    """FastAPI dependency: the context of the app serving ``request``."""
    context: AppContext = request.app.state.context
    return context
