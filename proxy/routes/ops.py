"""Operator routes: ``/health`` (open) and ``/metrics`` (its own bearer key, public counters
only; 404 when the server was started without ``--metrics-key``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.context import AppContext, get_context
from proxy.errors import APIError

__all__ = ["router"]

router = APIRouter()


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
def metrics_route(
    authorization: str | None = Header(default=None),
    context: AppContext = Depends(get_context),
) -> Response:
    if context.metrics_key is None:
        raise APIError(
            404, "Metrics are disabled (start the server with --metrics-key).", code="not_found"
        )
    if authorization != f"Bearer {context.metrics_key}":
        raise APIError(
            401, "Incorrect metrics key.", "invalid_request_error", None, "invalid_api_key"
        )
    return Response(generate_latest(context.metrics.registry), media_type=CONTENT_TYPE_LATEST)
