"""Private predictors: ``/v1/private/predictors`` (admin keys) and the answer to a chat or
completion addressed to a predictor's name (any key of the tenant).

Invariants (docs/ARCHITECTURE.md §11):

* A predictor is declared parameters over a stored dataset; creating one reads no record and
  charges nothing. Its plan (σ calibrated to the per-query ε) is fixed at creation.
* :func:`answer_query` charges ONE query event to the tenant's Rényi filter (and the key's
  cap) in one transaction BEFORE the records are read; with budget for k queries exactly k
  are answered, the rest get 429 ``privacy_budget_exceeded``. Nothing is refunded.
* The response is the released label as the message content and nothing else derived from
  the private data: no log-probabilities, no votes; usage is reported as zeros (the private
  prompts' token counts are not released). Bodies that cannot be answered as one label
  (``n`` > 1, ``logprobs``, ``stream``, no user text) are refused with 400 before any charge.
* With an ``Idempotency-Key`` the query is keyed by (tenant, key, idempotency key): a retry
  returns the stored answer of the charged query, never a fresh noisy one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from dp_decoding.engines.base import context_limit
from dp_decoding.noise import NoiseSource, new_job_key, os_entropy_rng
from dp_decoding.prediction import PredictorPlan, make_predictor_plan, predict
from dp_decoding.prediction import rows_for as prediction_rows
from proxy.answering import DIRECT_ANSWERERS, Answer, check_limits, parse_line
from proxy.auth import require_admin
from proxy.context import AppContext, get_context
from proxy.errors import APIError, budget_exceeded, not_found
from proxy.jobs import records_from_rows
from proxy.schemas import ChatCompletionRequest, CompletionRequest
from proxy.storage.admission import JobRequest
from proxy.storage.codec import canonical
from proxy.storage.predictors import IdempotencyConflict, Predictor
from proxy.store import ApiKey, BudgetExceeded, NotFound

__all__ = [
    "answer_query",
    "find_predictor",
    "model_cards",
    "predicted",
    "predicted_chat",
    "predicted_completion",
    "router",
]

router = APIRouter()

noise_source: Callable[[], NoiseSource] = os_entropy_rng
"""Where a query's noise comes from (the OS CSPRNG). A test-only seam: tests replace it with a
seeded generator to compare neighbouring datasets; nothing in service reassigns it."""

slot_key: Callable[[], bytes] = new_job_key
"""The fresh per-query slot key of Poisson sampling (a test-only seam, like noise_source)."""


class PredictorRequest(BaseModel):
    """Creates a private predictor. Only declared parameters."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    labels: list[str] = Field(min_length=2, max_length=256)
    epsilon: float = Field(gt=0, le=100, description="per query")
    delta: float | None = Field(default=None, gt=0, lt=1)
    task: str = "generic"
    prompts: int = Field(default=16, ge=1, le=1024)
    examples_per_prompt: int = Field(default=4, ge=1, le=64)
    example_token_limit: int = Field(default=64, ge=1, le=4096)
    query_token_limit: int = Field(default=128, ge=1, le=8192)
    sampling: Literal["poisson", "partition"] = "poisson"
    sampling_rate: float | None = Field(default=None, gt=0, le=1)
    vote: Literal["distribution", "argmax"] = "distribution"
    mechanism: Literal["gaussian"] = "gaussian"
    calibrate: bool = False


def predictor_json(p: Predictor) -> dict[str, Any]:
    """The API object (the partition secret is never part of it)."""
    plan = PredictorPlan.from_dict(p.plan)
    return {
        "id": p.id,
        "object": "private_predictor",
        "name": p.name,
        "dataset": p.dataset_id,
        "labels": list(plan.labels),
        "epsilon": p.epsilon,
        "delta": p.delta,
        "plan": p.plan,
        "event": plan.event().to_dict(),
        "created_at": int(p.created),
    }


def _plan(body: PredictorRequest, delta: float, context: AppContext) -> PredictorPlan:
    """The calibrated plan, refused (400) if it cannot be answered on this engine."""
    try:
        plan = make_predictor_plan(
            labels=body.labels,
            epsilon=body.epsilon,
            delta=delta,
            task=body.task,
            prompts=body.prompts,
            examples_per_prompt=body.examples_per_prompt,
            example_token_limit=body.example_token_limit,
            query_token_limit=body.query_token_limit,
            sampling=body.sampling,
            q=body.sampling_rate,
            vote=body.vote,
            mechanism=body.mechanism,
            calibrate=body.calibrate,
        )
        need = prediction_rows(context.engine, plan).worst_case(plan.examples_per_prompt)
    except ValueError as exc:  # PredictorError, an unknown task or label, a label collision
        raise APIError(400, str(exc), param=None) from None
    limit = context_limit(context.engine)
    if limit is not None and need > limit:
        raise APIError(
            400,
            f"the declared worst-case prompt is {need} tokens, over the engine's context of "
            f"{limit}; lower examples_per_prompt, example_token_limit or query_token_limit",
            param="examples_per_prompt",
        )
    return plan


@router.post("/v1/private/predictors")
def create_predictor(
    body: PredictorRequest,
    key: ApiKey = Depends(require_admin),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    store = context.store
    tenant = store.get_tenant(key.tenant_id)
    assert tenant is not None  # the key's tenant exists
    delta = tenant.delta if body.delta is None else body.delta
    if delta > tenant.delta:
        raise APIError(400, "delta must not exceed the tenant's delta.", param="delta")
    dataset = store.get_dataset(key.tenant_id, body.dataset)
    if dataset is None:
        raise not_found("dataset", body.dataset, "dataset")
    if body.name == context.base_model or store.get_job_by_name(key.tenant_id, body.name):
        raise APIError(409, "name is taken by another model id.", param="name", code="conflict")
    plan = _plan(body, delta, context)
    try:
        p = store.predictors.create(
            key.tenant_id,
            name=body.name,
            dataset_id=dataset.id,
            plan=plan.to_dict(),
            epsilon=plan.epsilon,
            delta=plan.delta,
        )
    except NotFound:
        raise not_found("dataset", body.dataset, "dataset") from None
    except ValueError as exc:
        raise APIError(409, str(exc), param="name", code="conflict") from None
    return predictor_json(p)


@router.get("/v1/private/predictors")
def list_predictors(
    key: ApiKey = Depends(require_admin), context: AppContext = Depends(get_context)
) -> dict[str, Any]:
    found = context.store.predictors.for_tenant(key.tenant_id)
    return {"object": "list", "data": [predictor_json(p) for p in found]}


@router.get("/v1/private/predictors/{predictor_id}")
def get_predictor(
    predictor_id: str,
    key: ApiKey = Depends(require_admin),
    context: AppContext = Depends(get_context),
) -> dict[str, Any]:
    p = context.store.predictors.get(key.tenant_id, predictor_id)
    if p is None:
        raise not_found("private predictor", predictor_id)
    return predictor_json(p)


# -- answering ---------------------------------------------------------------------------------
def find_predictor(context: AppContext, key: ApiKey, model: str) -> Predictor | None:
    """The caller's tenant's predictor called ``model`` (None: not a predictor)."""
    if model == context.base_model:
        return None
    return context.store.predictors.get_by_name(key.tenant_id, model)


def model_cards(context: AppContext, key: ApiKey) -> list[dict[str, Any]]:
    """``/v1/models`` entries of the tenant's predictors."""
    return [
        {
            "id": p.name,
            "object": "model",
            "created": int(p.created),
            "owned_by": "tenant",
            "root": context.base_model,
        }
        for p in context.store.predictors.for_tenant(key.tenant_id)
    ]


def answer_query(
    context: AppContext,
    key: ApiKey,
    predictor: Predictor,
    query: str,
    idempotency_key: str | None = None,
) -> tuple[str, str, float]:
    """Charge one query of ``predictor`` to ``key``'s tenant (and cap), then answer it:
    ``(label, query id, created)``. Idempotent: a known ``idempotency_key`` (of this tenant
    and key) returns the stored answer of the charged query, computing it only if it was
    charged but never answered (a crash or a racing retry: only the first stored answer is
    ever released). For the Batch API, pass a key unique to the line (e.g.
    ``f"batch:{batch_id}:{custom_id}"``): a resumed line then costs nothing more.

    APIError: 429 ``privacy_budget_exceeded`` (nothing charged), 409 for an idempotency key
    reused for another query, 404 if the predictor's dataset was deleted (charged)."""
    store = context.store
    plan = PredictorPlan.from_dict(predictor.plan)
    request_hash = hashlib.sha256(
        canonical({"predictor": predictor.id, "query": query}).encode("utf-8")
    ).hexdigest()
    try:
        req = JobRequest.validate(
            key.tenant_id,
            name=None,
            dataset_id=predictor.dataset_id,
            plan={"predictor": predictor.id, **plan.to_dict()},
            event=plan.event(),
            epsilon=plan.epsilon,
            delta=plan.delta,
            idempotency_key=idempotency_key,
            key_id=key.id,
        )
    except ValueError as exc:  # only the idempotency key can be malformed here
        raise APIError(400, str(exc), param="Idempotency-Key") from None
    try:
        row, _ = store.predictors.admit_query(req, predictor, request_hash)
    except BudgetExceeded as exc:
        raise budget_exceeded(exc.requested_epsilon, exc.remaining_epsilon, exc.budget) from None
    except IdempotencyConflict as exc:
        raise APIError(409, str(exc), param=None, code="idempotency_key_reused") from None
    if row.answer is not None:
        return row.answer, row.id, row.created
    # THE PRIVATE READ, after the charge.
    stored = store.dataset_records(key.tenant_id, predictor.dataset_id)
    if stored is None:
        raise not_found("dataset", predictor.dataset_id)
    records = records_from_rows(stored, "record")
    key_bytes = predictor.secret if plan.sampling == "partition" else slot_key()
    label = predict(context.engine, plan, records, query, noise_source(), key=key_bytes)
    return store.predictors.store_answer(row.id, label), row.id, row.created


def _refuse_unanswerable(body: ChatCompletionRequest | CompletionRequest, logprobs: bool) -> None:
    """400 before any charge for what one released label cannot answer."""
    if body.n != 1:
        raise APIError(400, "a private predictor answers one choice (n = 1).", param="n")
    if body.stream:
        raise APIError(400, "a private predictor does not stream.", param="stream")
    if logprobs:
        raise APIError(400, "a private predictor returns no logprobs.", param="logprobs")


_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
"""Fixed: the private prompts' token counts are not released."""


def predicted_chat(
    context: AppContext,
    key: ApiKey,
    predictor: Predictor,
    body: ChatCompletionRequest,
    idempotency_key: str | None,
) -> dict[str, Any]:
    """A chat completion whose content is the released label; the query is the text of the
    last user message."""
    _refuse_unanswerable(body, body.logprobs)
    users = [m for m in body.messages if m.role == "user"]
    try:
        query = users[-1].text() if users else ""
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    if not query.strip():
        raise APIError(400, "the query (the last user message) is empty.", param="messages")
    label, qid, created = answer_query(context, key, predictor, query, idempotency_key)
    return {
        "id": "chatcmpl-" + qid,
        "object": "chat.completion",
        "created": int(created),
        "model": predictor.name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": label},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": dict(_USAGE),
    }


def predicted_completion(
    context: AppContext,
    key: ApiKey,
    predictor: Predictor,
    body: CompletionRequest,
    idempotency_key: str | None,
) -> dict[str, Any]:
    """A text completion whose text is the released label; the query is the prompt."""
    _refuse_unanswerable(body, body.logprobs is not None)
    query = body.prompt_text()
    if not query.strip():
        raise APIError(400, "The prompt is empty.", param="prompt")
    label, qid, created = answer_query(context, key, predictor, query, idempotency_key)
    return {
        "id": "cmpl-" + qid,
        "object": "text_completion",
        "created": int(created),
        "model": predictor.name,
        "choices": [{"index": 0, "text": label, "logprobs": None, "finish_reason": "stop"}],
        "usage": dict(_USAGE),
    }


def predicted(
    context: AppContext,
    key: ApiKey,
    predictor: Predictor,
    request: ChatCompletionRequest | CompletionRequest,
    idempotency_key: str | None,
) -> dict[str, Any]:
    """The answer to a chat or completion request addressed to ``predictor`` (one charged
    query): the online routes and the Batch API's hook both answer through this."""
    if isinstance(request, ChatCompletionRequest):
        return predicted_chat(context, key, predictor, request, idempotency_key)
    return predicted_completion(context, key, predictor, request, idempotency_key)


def batch_line_answer(
    context: AppContext, key: ApiKey, endpoint: str, body: dict[str, Any], ref: str | None
) -> Answer | None:
    """The Batch API's hook (:data:`proxy.answering.DIRECT_ANSWERERS`): a line addressed to one
    of the tenant's predictors is one charged query, with ``batch:<ref>`` as its idempotency
    key, so a resumed line returns the stored answer and is never charged twice; a line after
    the budget is spent answers 429 ``privacy_budget_exceeded``. None for any other model."""
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str):
        return None
    predictor = find_predictor(context, key, model)
    if predictor is None:
        return None
    idempotency_key = None if ref is None else "batch:" + ref
    try:
        request = parse_line(endpoint, body)
        check_limits(context, request)
        answer = predicted(context, key, predictor, request, idempotency_key)
    except APIError as exc:
        return Answer.error(exc)
    return Answer(200, answer)


DIRECT_ANSWERERS.append(batch_line_answer)
