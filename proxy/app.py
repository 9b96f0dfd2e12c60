"""The OpenAI-compatible HTTP surface of dpicl (FastAPI): :func:`create_app` wires it.

Request path: key -> tenant and scope (:mod:`proxy.auth`) -> validate (:mod:`proxy.schemas`)
-> (jobs) plan from declared parameters (:mod:`proxy.planning`) -> atomic admission in the
ledger (charged before any private record is read) -> background generation
(:mod:`proxy.jobs`) -> demonstrations become a model id that chat and completions can name
(:mod:`proxy.routes.openai`, answered by :mod:`proxy.responses`). The routes live in
:mod:`proxy.routes`, one router per API; this module only builds the shared
:class:`~proxy.context.AppContext` and includes them.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from dp_decoding.engines.base import Engine
from proxy.backends import Backend, backend_for
from proxy.batches import CHUNK_LINES, BatchRunner
from proxy.context import AppContext
from proxy.errors import install_error_handlers, storage_unavailable
from proxy.jobs import JobRunner
from proxy.limits import DEFAULT_LIMITS, BodyLimit, Limits
from proxy.metrics import Metrics, install_request_metrics, track_serving
from proxy.routes import ROUTERS
from proxy.store import StorageError, Store

__all__ = ["create_app"]

log = logging.getLogger("dpicl.proxy")


def create_app(
    store: Store,
    engine: Engine,
    *,
    metrics_key: str | None = None,
    run_jobs: bool = True,
    serving_backend: Backend | None = None,
    limits: Limits = DEFAULT_LIMITS,
    batch_chunk_lines: int = CHUNK_LINES,
) -> FastAPI:
    """The app over ``store`` (the ledger) and ``engine`` (one model for jobs and serving).

    ``metrics_key`` enables ``/metrics``; ``run_jobs=False`` admits and charges jobs, and
    accepts batches, without running them (tests); ``serving_backend`` replaces the
    chat/completions backend that :func:`proxy.backends.backend_for` would pick; ``limits``
    bound what a client may send (:mod:`proxy.limits`: bodies are counted while read, before
    any parsing); ``batch_chunk_lines`` is how many batch lines share one engine batch.
    ``app.state`` keeps ``store``, ``engine``, ``runner``, ``batches`` (the caller resumes
    unfinished batches with ``batches.resume()``), ``serving`` (closed by the CLI at shutdown)
    and ``context``.
    """
    app = FastAPI(title="dpicl", version="0.1.0", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    metrics = Metrics()
    # Chat/completions backend (vLLM's scheduler for a vLLM engine); built before the job
    # runner, so it can take over the engine's lock before any job step runs.
    backend = serving_backend or backend_for(engine)
    track_serving(metrics, backend)
    runner = JobRunner(store, engine) if run_jobs else None
    batches = BatchRunner(store, chunk_lines=batch_chunk_lines) if run_jobs else None
    app.state.store, app.state.engine, app.state.runner = store, engine, runner
    app.state.batches = batches
    app.state.serving = backend
    app.state.context = AppContext(
        store=store,
        engine=engine,
        metrics=metrics,
        backend=backend,
        runner=runner,
        base_model=engine.name,
        metrics_key=metrics_key,
        limits=limits,
        batches=batches,
    )
    if batches is not None:
        batches.start(app.state.context)

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        log.error("storage failure on %s %s", request.method, request.url.path)
        return storage_unavailable().response()

    # Added before the metrics middleware, which therefore wraps it and counts its 413s.
    app.add_middleware(BodyLimit, limits=limits)
    install_request_metrics(app, metrics)
    for router in ROUTERS:
        app.include_router(router)
    return app
