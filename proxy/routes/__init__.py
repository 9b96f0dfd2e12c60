"""The HTTP routes, one FastAPI ``APIRouter`` per API, wired by :func:`proxy.app.create_app`.

=================  ===================================================================
module             routes
=================  ===================================================================
``ops``            ``/health``, ``/metrics`` (operator; no tenant key)
``openai``         ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (any key)
``datasets``       ``/v1/private/datasets`` (admin keys)
``demonstrations`` ``/v1/private/demonstrations`` (admin keys: plan, admit, status)
``account``        ``/v1/private/budget``, ``/v1/private/keys`` (admin keys)
``predictors``     ``/v1/private/predictors`` (admin keys); answers to predictor models
``batch``          ``/v1/files``, ``/v1/batches`` (any key: OpenAI's Batch API)
=================  ===================================================================

Every route reaches the store, engine and metrics only through
:func:`proxy.context.get_context`, and its caller only through :mod:`proxy.auth`.
"""

from __future__ import annotations

from proxy.routes import account, batch, datasets, demonstrations, openai, ops, predictors

ROUTERS = (
    ops.router,
    openai.router,
    datasets.router,
    demonstrations.router,
    account.router,
    predictors.router,
    batch.router,
)
"""In registration order (which is also the order of ``/openapi.json``)."""

__all__ = ["ROUTERS"]
