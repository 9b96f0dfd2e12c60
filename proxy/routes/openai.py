"""The OpenAI-compatible routes: models, chat completions and completions (any key).

A model id is the engine's base model or the name of one of the caller's tenant's
*succeeded* demonstration sets; naming a set prepends its released demonstrations as a system
text (post-processing of a released output: no budget is spent). A serving key gets the same
``model_not_found`` for a set that is queued, running or failed as for one that does not
exist, because whether a job failed may depend on private data. The request is prepared by
:mod:`proxy.answering`, which the Batch API shares, so a batch line's body is built the same
way.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from proxy.answering import DEFAULT_MAX_TOKENS, Prepared, check_limits, prepare
from proxy.auth import require_key
from proxy.context import AppContext, get_context
from proxy.errors import model_not_found
from proxy.responses import json_until_disconnect, until_disconnect
from proxy.routes.predictors import (
    find_predictor,
    model_cards,
    predicted,
)
from proxy.schemas import ChatCompletionRequest, CompletionRequest
from proxy.serving import AsyncBackend
from proxy.store import ApiKey

__all__ = ["DEFAULT_MAX_TOKENS", "router"]

router = APIRouter()


def _base_model_card(base_model: str) -> dict[str, Any]:
    return {"id": base_model, "object": "model", "created": 0, "owned_by": "dpicl"}


@router.get("/v1/models")
def list_models(
    key: ApiKey = Depends(require_key), context: AppContext = Depends(get_context)
) -> dict[str, Any]:
    data = [_base_model_card(context.base_model)]
    for job in context.store.list_jobs(key.tenant_id):
        if job.status == "succeeded":
            data.append(
                {
                    "id": job.name,
                    "object": "model",
                    "created": int(job.created),
                    "owned_by": "tenant",
                    "root": context.base_model,
                }
            )
    data.extend(model_cards(context, key))
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}")
def get_model(
    model_id: str, key: ApiKey = Depends(require_key), context: AppContext = Depends(get_context)
) -> dict[str, Any]:
    if model_id == context.base_model:
        return _base_model_card(context.base_model)
    job = context.store.get_job_by_name(key.tenant_id, model_id)
    if job is None or job.status != "succeeded":
        cards = [c for c in model_cards(context, key) if c["id"] == model_id]
        if cards:
            return cards[0]
        raise model_not_found(model_id)
    return {
        "id": job.name,
        "object": "model",
        "created": int(job.created),
        "owned_by": "tenant",
    }


async def _respond(
    request: Request, context: AppContext, key: ApiKey, prepared: Prepared
) -> dict[str, Any] | Response:
    """Submit to the serving backend (which may refuse with a 400 before any byte is sent),
    then answer as one JSON body or as a stream.

    A backend that feeds the event loop (:class:`AsyncBackend`: continuous batching) holds no
    thread per request. Other backends are iterated in the thread pool. Either way a client
    that disconnects aborts its request, streamed or not (non-streamed on a thread-pool
    backend: :func:`proxy.responses.json_until_disconnect`, before the next engine step)."""
    body, reply, prompt_ids, params = (
        prepared.request,
        prepared.reply,
        prepared.prompt_ids,
        prepared.params,
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    backend = context.backend
    if isinstance(backend, AsyncBackend):
        events = backend.agenerate(prompt_ids, params, tenant=key.tenant_id)
        if body.stream:
            return reply.stream(events, include_usage=include_usage)
        return await until_disconnect(request, reply.ajson(events))
    sync_events = await run_in_threadpool(
        backend.generate, prompt_ids, params, tenant=key.tenant_id
    )
    if body.stream:
        return reply.stream(sync_events, include_usage=include_usage)
    return await json_until_disconnect(request, reply, sync_events)


async def _answer(
    request: Request,
    context: AppContext,
    key: ApiKey,
    body: ChatCompletionRequest | CompletionRequest,
    idempotency_key: str | None,
) -> dict[str, Any] | Response:
    """Limits first (bounded before any tokenization, :mod:`proxy.limits`), then the store
    look-up and the tokenizer in the thread pool (blocking), then the backend. A model that
    names one of the tenant's private predictors is one charged query instead
    (:mod:`proxy.routes.predictors`; blocking, in the thread pool)."""
    check_limits(context, body)
    predictor = await run_in_threadpool(find_predictor, context, key, body.model)
    if predictor is not None:
        return await run_in_threadpool(predicted, context, key, predictor, body, idempotency_key)
    prepared = await run_in_threadpool(prepare, context, key, body)
    return await _respond(request, context, key, prepared)


@router.post("/v1/chat/completions", response_model=None)
async def chat(
    request: Request,
    body: ChatCompletionRequest,
    key: ApiKey = Depends(require_key),
    context: AppContext = Depends(get_context),
    idempotency_key: str | None = Header(default=None),
) -> dict[str, Any] | Response:
    return await _answer(request, context, key, body, idempotency_key)


@router.post("/v1/completions", response_model=None)
async def completions(
    request: Request,
    body: CompletionRequest,
    key: ApiKey = Depends(require_key),
    context: AppContext = Depends(get_context),
    idempotency_key: str | None = Header(default=None),
) -> dict[str, Any] | Response:
    return await _answer(request, context, key, body, idempotency_key)
