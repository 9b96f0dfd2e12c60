"""The OpenAI-compatible routes: models, chat completions and completions (any key).

A model id is the engine's base model or the name of one of the caller's tenant's
*succeeded* demonstration sets; naming a set prepends its released demonstrations as a system
text (post-processing of a released output: no budget is spent). A serving key gets the same
``model_not_found`` for a set that is queued, running or failed as for one that does not
exist, because whether a job failed may depend on private data.
"""

from __future__ import annotations

from typing import Any, cast

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from dp_decoding.engines import ChatTemplating, context_limit
from prompts import demonstrations_system_prompt, task_of_plan
from proxy.auth import require_key
from proxy.context import AppContext, get_context
from proxy.errors import APIError, model_not_found
from proxy.limits import Limits
from proxy.responses import CHAT, COMPLETION, Reply, until_disconnect
from proxy.schemas import ChatCompletionRequest, CompletionRequest
from proxy.serving import AsyncBackend, SamplingParams
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
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}")
def get_model(
    model_id: str, key: ApiKey = Depends(require_key), context: AppContext = Depends(get_context)
) -> dict[str, Any]:
    if model_id == context.base_model:
        return _base_model_card(context.base_model)
    job = context.store.get_job_by_name(key.tenant_id, model_id)
    if job is None or job.status != "succeeded":
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
    task = task_of_plan(job.plan)  # the declared description and label words included
    demos = [(d["text"], d["label"]) for d in job.demonstrations or [] if d.get("text")]
    if not demos:
        return None
    return demonstrations_system_prompt(demos, task)


def _params(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int, top_logprobs: int
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
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


async def _respond(
    request: Request,
    context: AppContext,
    key: ApiKey,
    body: ChatCompletionRequest | CompletionRequest,
    reply: Reply,
    prompt_ids: list[int],
    params: SamplingParams,
) -> dict[str, Any] | Response:
    """Submit to the serving backend (which may refuse with a 400 before any byte is sent),
    then answer as one JSON body or as a stream.

    A backend that feeds the event loop (:class:`AsyncBackend`: continuous batching) holds no
    thread per request, and a client that disconnects aborts its request, streamed or not.
    Other backends are iterated in the thread pool, as before."""
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
    return await run_in_threadpool(reply.json, sync_events)


@router.post("/v1/chat/completions", response_model=None)
async def chat(
    request: Request,
    body: ChatCompletionRequest,
    key: ApiKey = Depends(require_key),
    context: AppContext = Depends(get_context),
) -> dict[str, Any] | Response:
    context.limits.check_chat(body)  # bounded before any tokenization (proxy.limits)
    reply, prompt_ids, params = await run_in_threadpool(_chat_request, body, key, context)
    return await _respond(request, context, key, body, reply, prompt_ids, params)


def _chat_request(
    body: ChatCompletionRequest, key: ApiKey, context: AppContext
) -> tuple[Reply, list[int], SamplingParams]:
    """The store look-up and the chat template (blocking: run in the thread pool)."""
    messages = _chat_messages(body, _demo_prefix(context, key, body.model))
    engine = context.engine
    # The serving engine templates chats (every built-in engine does: ChatTemplating).
    prompt_ids = cast(ChatTemplating, engine).apply_chat_template(messages)
    max_tokens = Limits.check_tokens(
        len(prompt_ids),
        body.max_completion_tokens or body.max_tokens,
        DEFAULT_MAX_TOKENS,
        context_limit(engine),
        "messages",
    )
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else 0
    params = _params(body, max_tokens, top_logprobs)
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
    return reply, prompt_ids, params


@router.post("/v1/completions", response_model=None)
async def completions(
    request: Request,
    body: CompletionRequest,
    key: ApiKey = Depends(require_key),
    context: AppContext = Depends(get_context),
) -> dict[str, Any] | Response:
    context.limits.check_completion(body)  # bounded before any tokenization (proxy.limits)
    reply, prompt_ids, params = await run_in_threadpool(_completion_request, body, key, context)
    return await _respond(request, context, key, body, reply, prompt_ids, params)


def _completion_request(
    body: CompletionRequest, key: ApiKey, context: AppContext
) -> tuple[Reply, list[int], SamplingParams]:
    """The store look-up and the tokenizer (blocking: run in the thread pool)."""
    prefix = _demo_prefix(context, key, body.model)
    prompt = body.prompt_text()
    if prefix:
        prompt = prefix + "\n\n" + prompt
    engine = context.engine
    prompt_ids = engine.tokenize(prompt)
    if not prompt_ids:
        raise APIError(400, "The prompt is empty.", param="prompt")
    max_tokens = Limits.check_tokens(
        len(prompt_ids), body.max_tokens, 16, context_limit(engine), "prompt"
    )
    params = _params(body, max_tokens, body.logprobs or 0)
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
    return reply, prompt_ids, params
