"""The OpenAI-compatible routes: models, chat completions and completions (any key).

A model id is the engine's base model or the name of one of the caller's tenant's
*succeeded* demonstration sets; naming a set prepends its released demonstrations as a system
text (post-processing of a released output: no budget is spent). A serving key gets the same
``model_not_found`` for a set that is queued, running or failed as for one that does not
exist, because whether a job failed may depend on private data.
"""

from __future__ import annotations

from typing import Any, cast

from fastapi import APIRouter, Depends, Header
from fastapi.responses import StreamingResponse

from dp_decoding.engines import ChatTemplating
from prompts import demonstrations_system_prompt, generic_task, get_task
from proxy.auth import require_key
from proxy.context import AppContext, get_context
from proxy.errors import APIError, model_not_found
from proxy.responses import CHAT, COMPLETION, Reply
from proxy.routes.predictors import (
    find_predictor,
    model_cards,
    predicted_chat,
    predicted_completion,
)
from proxy.schemas import ChatCompletionRequest, CompletionRequest
from proxy.serving import SamplingParams
from proxy.store import ApiKey

__all__ = ["DEFAULT_MAX_TOKENS", "router"]

DEFAULT_MAX_TOKENS = 256

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


def _demo_prefix(context: AppContext, key: ApiKey, model: str) -> str | None:
    """The released demonstrations for ``model`` as a system text (None for the base).

    A serving key gets the same ``model_not_found`` for a set that is queued, running or
    failed as for one that does not exist: whether a job failed may depend on private
    data, and only admin keys (the curator's side) see job status."""
    if model == context.base_model:
        return None
    job = context.store.get_job_by_name(key.tenant_id, model)
    if job is None or (job.status != "succeeded" and key.scope != "admin"):
        raise model_not_found(model)
    if job.status != "succeeded":
        raise APIError(
            400,
            f"The demonstration set `{model}` is not ready (status: {job.status}).",
            "invalid_request_error",
            "model",
            "model_not_ready",
        )
    labels = job.plan.get("labels") or []
    t = job.plan.get("task", "generic")
    task = generic_task(labels) if t == "generic" else get_task(t)
    demos = [(d["text"], d["label"]) for d in job.demonstrations or [] if d.get("text")]
    if not demos:
        return None
    return demonstrations_system_prompt(demos, task)


def _params(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, top_logprobs: int
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=body.temperature,
        top_p=body.top_p,
        n=body.n,
        stop=body.stop_list(),
        seed=body.seed,
        top_logprobs=top_logprobs,
    )


def _chat_messages(body: ChatCompletionRequest, prefix: str | None) -> list[dict[str, str]]:
    """The request's messages (``developer`` read as ``system``), the demonstrations first."""
    try:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    if prefix:
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": prefix + "\n\n" + messages[0]["content"]}
        else:
            messages.insert(0, {"role": "system", "content": prefix})
    return messages


def _respond(
    context: AppContext,
    key: ApiKey,
    body: ChatCompletionRequest | CompletionRequest,
    reply: Reply,
    prompt_ids: list[int],
    params: SamplingParams,
) -> dict[str, Any] | StreamingResponse:
    """Submit to the serving backend (which may refuse with a 400 before any byte is sent),
    then answer as one JSON body or as a stream."""
    events = context.backend.generate(prompt_ids, params, tenant=key.tenant_id)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return reply.stream(events, include_usage=include_usage)
    return reply.json(events)


@router.post("/v1/chat/completions", response_model=None)
def chat(
    body: ChatCompletionRequest,
    key: ApiKey = Depends(require_key),
    context: AppContext = Depends(get_context),
    idempotency_key: str | None = Header(default=None),
) -> dict[str, Any] | StreamingResponse:
    if (predictor := find_predictor(context, key, body.model)) is not None:
        return predicted_chat(context, key, predictor, body, idempotency_key)
    messages = _chat_messages(body, _demo_prefix(context, key, body.model))
    engine = context.engine
    # The serving engine templates chats (every built-in engine does: ChatTemplating).
    prompt_ids = cast(ChatTemplating, engine).apply_chat_template(messages)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else 0
    params = _params(body, body.max_completion_tokens or body.max_tokens, top_logprobs)
    reply = Reply(
        CHAT,
        "chatcmpl-",
        body.model,
        len(prompt_ids),
        params.n,
        context.metrics,
        engine.decode,
        want_logprobs=body.logprobs,
    )
    return _respond(context, key, body, reply, prompt_ids, params)


@router.post("/v1/completions", response_model=None)
def completions(
    body: CompletionRequest,
    key: ApiKey = Depends(require_key),
    context: AppContext = Depends(get_context),
    idempotency_key: str | None = Header(default=None),
) -> dict[str, Any] | StreamingResponse:
    if (predictor := find_predictor(context, key, body.model)) is not None:
        return predicted_completion(context, key, predictor, body, idempotency_key)
    prefix = _demo_prefix(context, key, body.model)
    prompt = body.prompt_text()
    if prefix:
        prompt = prefix + "\n\n" + prompt
    engine = context.engine
    prompt_ids = engine.tokenize(prompt)
    if not prompt_ids:
        raise APIError(400, "The prompt is empty.", param="prompt")
    params = _params(body, body.max_tokens or 16, body.logprobs or 0)
    reply = Reply(
        COMPLETION,
        "cmpl-",
        body.model,
        len(prompt_ids),
        params.n,
        context.metrics,
        engine.decode,
        want_logprobs=body.logprobs is not None,
        prefix=body.prompt_text() if body.echo else "",
    )
    return _respond(context, key, body, reply, prompt_ids, params)
