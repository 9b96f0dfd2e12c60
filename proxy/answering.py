"""One chat or completion request, from its body to its answer: the online routes and the
Batch API share this, so a batch line's response body is built exactly as the online route
builds it (the same validation, demonstrations, prompt, sampling and :class:`Reply`).

* :func:`parse` validates a body into :class:`ChatCompletionRequest` /
  :class:`CompletionRequest` (the online route's 400 messages).
* :func:`prepare` resolves the model (the base model, or one of the caller's tenant's released
  demonstration sets), builds the prompt and the sampling parameters, and returns the
  :class:`Prepared` request: its :class:`Reply`, prompt ids and :class:`SamplingParams`.
* :func:`answer_line` answers one line (endpoint and body dict) as a status and a JSON body;
  :func:`prepare_line` and :func:`reply_answer` are its two halves, for callers that generate
  many lines at once (:mod:`proxy.batches`); :func:`direct_answer` is the hook for models that
  are not answered by sampling the engine (see :data:`DIRECT_ANSWERERS`).

A serving key gets the same ``model_not_found`` for a set that is queued, running or failed as
for one that does not exist, because whether a job failed may depend on private data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from dp_decoding.engines import ChatTemplating, context_limit
from prompts import demonstrations_system_prompt, task_of_plan
from proxy.errors import APIError, internal_error, model_not_found, validation_error
from proxy.limits import Limits
from proxy.responses import CHAT, COMPLETION, Reply
from proxy.schemas import ChatCompletionRequest, CompletionRequest
from proxy.serving import Backend, SamplingParams, TokenEvent
from proxy.store import ApiKey, StorageError

if TYPE_CHECKING:  # proxy.context imports the runners, which import this module
    from proxy.context import AppContext

__all__ = [
    "CHAT_ENDPOINT",
    "COMPLETIONS_ENDPOINT",
    "DEFAULT_MAX_TOKENS",
    "DIRECT_ANSWERERS",
    "ENDPOINTS",
    "Answer",
    "DirectAnswerer",
    "Prepared",
    "answer_line",
    "check_limits",
    "direct_answer",
    "parse",
    "parse_line",
    "prepare",
    "prepare_line",
    "reply_answer",
]

DEFAULT_MAX_TOKENS = 256
CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
ENDPOINTS: tuple[str, ...] = (CHAT_ENDPOINT, COMPLETIONS_ENDPOINT)

Request = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class Answer:
    """A request's HTTP status and JSON body (an OpenAI error object when not 2xx)."""

    status: int
    body: dict[str, Any]

    @classmethod
    def error(cls, exc: APIError) -> Answer:
        return cls(exc.status, exc.body())


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for a backend: build the answer with
    ``reply.json(backend.generate(prompt_ids, params, tenant=...))``."""

    request: Request
    reply: Reply
    prompt_ids: list[int]
    params: SamplingParams


def parse(endpoint: str, body: Any) -> Request:
    """``body`` validated for ``endpoint``; APIError 400 with the online route's message."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    model = ChatCompletionRequest if endpoint == CHAT_ENDPOINT else CompletionRequest
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(RequestValidationError(exc.errors())) from None


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


def _params(body: Request, max_tokens: int, top_logprobs: int) -> SamplingParams:
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


def _prepare_chat(context: AppContext, key: ApiKey, body: ChatCompletionRequest) -> Prepared:
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
    return Prepared(body, reply, prompt_ids, params)


def _prepare_completion(context: AppContext, key: ApiKey, body: CompletionRequest) -> Prepared:
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
    return Prepared(body, reply, prompt_ids, params)


def check_limits(context: AppContext, request: Request) -> None:
    """The shape and character limits (:mod:`proxy.limits`), checked before any tokenization
    (413/400); the token limits follow in :func:`prepare`, once the prompt is tokenized."""
    if isinstance(request, ChatCompletionRequest):
        context.limits.check_chat(request)
    else:
        context.limits.check_completion(request)


def prepare(context: AppContext, key: ApiKey, request: Request) -> Prepared:
    """The request resolved against the caller's models and ready to generate (APIError
    for an unknown or unready model, bad messages, an empty prompt or a prompt and
    ``max_tokens`` over the context). Call :func:`check_limits` first (the routes do it on
    the event loop, :func:`prepare_line` here)."""
    if isinstance(request, ChatCompletionRequest):
        return _prepare_chat(context, key, request)
    return _prepare_completion(context, key, request)


# -- batch lines ----------------------------------------------------------------------------

DirectAnswerer = Callable[["AppContext", ApiKey, str, dict[str, Any], str | None], Answer | None]
"""``(context, key, endpoint, body, ref) -> Answer | None``: the answer of a line addressed to
a model this answerer owns, or None for a model it does not own. ``ref`` names the line stably
(``"{batch id}:{line number}"``; None for a line with no such name): the idempotency key of a
charge, so that a line answered again (a resumed batch) gets the stored answer."""

DIRECT_ANSWERERS: list[DirectAnswerer] = []
"""The hook for models that are not answered by sampling the engine. Each is asked in turn,
before a batch line is batched (and by :func:`answer_line`); the first that returns an answer
answers the line, alone and in input order within its chunk. Private predictors go here: a
predictor line is charged to the ledger as it is admitted, one line at a time, and answered
``privacy_budget_exceeded`` (429) once the budget is spent; a resumed batch skips a recorded
line (the batch's exactly-once row), so a charged line is never answered afresh. The online
routes do not consult this list: the routes that add such models decide there."""


def direct_answer(
    context: AppContext, key: ApiKey, endpoint: str, body: dict[str, Any], ref: str | None = None
) -> Answer | None:
    """The answer of the first :data:`DIRECT_ANSWERERS` entry that owns the line's model."""
    for answerer in DIRECT_ANSWERERS:
        answer = answerer(context, key, endpoint, body, ref)
        if answer is not None:
            return answer
    return None


def prepare_line(
    context: AppContext, key: ApiKey, endpoint: str, body: dict[str, Any], ref: str | None = None
) -> Answer | Prepared:
    """A batch line's immediate answer (a direct answerer's, or the online route's 4xx or 500)
    or its prepared request. StorageError propagates (the line is not answered)."""
    try:
        direct = direct_answer(context, key, endpoint, body, ref)
        if direct is not None:
            return direct
        request = parse_line(endpoint, body)
        check_limits(context, request)
        return prepare(context, key, request)
    except APIError as exc:
        return Answer.error(exc)
    except StorageError:
        raise
    except Exception:  # noqa: BLE001 - the online route answers 500; so does the line
        return Answer.error(internal_error())


def reply_answer(prepared: Prepared, events: Iterator[TokenEvent]) -> Answer:
    """The JSON answer built from ``events`` (a backend's refusal is the answer); any other
    exception propagates."""
    try:
        return Answer(200, prepared.reply.json(events))
    except APIError as exc:
        return Answer.error(exc)


def answer_line(
    context: AppContext,
    key: ApiKey,
    endpoint: str,
    body: dict[str, Any],
    backend: Backend | None = None,
    ref: str | None = None,
) -> Answer:
    """One line answered alone, exactly as the online route would answer ``body``
    (``backend`` defaults to the app's serving backend). Every failure of the request is its
    answer (a line cannot stream: 400); StorageError propagates."""
    first = prepare_line(context, key, endpoint, body, ref)
    if isinstance(first, Answer):
        return first
    try:
        events = (backend or context.backend).generate(
            first.prompt_ids, first.params, tenant=key.tenant_id
        )
        return reply_answer(first, events)
    except APIError as exc:
        return Answer.error(exc)
    except Exception:  # noqa: BLE001
        return Answer.error(internal_error())


def parse_line(endpoint: str, body: Any) -> Request:
    """:func:`parse`, refusing ``stream`` (a batch line's answer is one JSON body)."""
    request = parse(endpoint, body)
    if request.stream:
        raise APIError(400, "stream is not supported in a batch.", param="stream")
    return request
