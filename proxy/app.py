"""The OpenAI-compatible HTTP surface of dpicl (FastAPI).

Request path: key -> tenant and scope -> validate -> (jobs) plan from declared parameters ->
atomic admission in the ledger (charged before any private record is read) -> background
generation -> demonstrations become a model id that chat and completions can name.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dp_decoding.engines.base import Engine
from dp_decoding.plan import DEFAULTS, PlanError, make_plan
from dp_decoding.records import DataError, parse_jsonl_lines
from dp_decoding.rows import check_context
from prompts import demonstrations_system_prompt, generic_task, get_task
from proxy import serving
from proxy.backends import backend_for
from proxy.errors import (
    APIError,
    install_error_handlers,
    model_not_found,
    not_found,
    storage_unavailable,
)
from proxy.jobs import JobRunner
from proxy.metrics import Metrics
from proxy.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DemonstrationJobRequest,
    KeyRequest,
    PlanRequest,
)
from proxy.store import (
    BudgetExceeded,
    NotFound,
    StorageError,
    Store,
    default_reference_event,
)

log = logging.getLogger("dpicl.proxy")

MAX_UPLOAD_BYTES = 64 * 1024 * 1024
MAX_UPLOAD_RECORDS = 500_000
DEFAULT_MAX_TOKENS = 256
EPSILON_SPENT_NOTE = (
    "information only: epsilon_spent is the RDP composition (at delta) of the charges so far; "
    "the guarantee is the Renyi filter's limit (epsilon_limit, delta), not this realised figure"
)


def _now() -> int:
    return int(time.time())


def create_app(
    store: Store,
    engine: Engine,
    *,
    metrics_key: str | None = None,
    run_jobs: bool = True,
    serving_backend: serving.Backend | None = None,
) -> FastAPI:
    app = FastAPI(title="dpicl", version="0.1.0", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    metrics = Metrics()
    # Chat/completions backend (vLLM's scheduler for a vLLM engine); built before the job
    # runner, so it can take over the engine's lock before any job step runs.
    backend = serving_backend or backend_for(engine)
    runner = JobRunner(store, engine) if run_jobs else None
    app.state.store, app.state.engine, app.state.runner = store, engine, runner
    app.state.serving = backend
    base_model = engine.name

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        log.error("storage failure on %s %s", request.method, request.url.path)
        return storage_unavailable().response()

    @app.middleware("http")
    async def _measure(request: Request, call_next):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - t0)
        return response

    # -- auth ------------------------------------------------------------------------------
    def _key(authorization: str | None = Header(default=None)):  # type: ignore[no-untyped-def]
        if not authorization or not authorization.startswith("Bearer "):
            raise APIError(
                401,
                "You didn't provide an API key. Use 'Authorization: Bearer KEY'.",
                "invalid_request_error",
                None,
                "invalid_api_key",
            )
        key = store.authenticate(authorization[len("Bearer ") :].strip())
        if key is None:
            raise APIError(
                401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
            )
        return key

    def _admin(key=Depends(_key)):  # type: ignore[no-untyped-def]
        if key.scope != "admin":
            raise APIError(
                403,
                "This route needs an admin key; serving keys cannot upload data "
                "or spend privacy budget.",
                "permission_error",
                None,
                "insufficient_scope",
            )
        return key

    # -- open routes -------------------------------------------------------------------------
    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics_route(authorization: str | None = Header(default=None)) -> Response:
        if metrics_key is None:
            raise APIError(
                404, "Metrics are disabled (start the server with --metrics-key).", code="not_found"
            )
        if authorization != f"Bearer {metrics_key}":
            raise APIError(
                401, "Incorrect metrics key.", "invalid_request_error", None, "invalid_api_key"
            )
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- models --------------------------------------------------------------------------------
    @app.get("/v1/models")
    def list_models(key=Depends(_key)) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        data = [{"id": base_model, "object": "model", "created": 0, "owned_by": "dpicl"}]
        for job in store.list_jobs(key.tenant_id):
            if job.status == "succeeded":
                data.append(
                    {
                        "id": job.name,
                        "object": "model",
                        "created": int(job.created),
                        "owned_by": "tenant",
                        "root": base_model,
                    }
                )
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str, key=Depends(_key)) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        if model_id == base_model:
            return {"id": base_model, "object": "model", "created": 0, "owned_by": "dpicl"}
        job = store.get_job_by_name(key.tenant_id, model_id)
        if job is None or job.status != "succeeded":
            raise model_not_found(model_id)
        return {
            "id": job.name,
            "object": "model",
            "created": int(job.created),
            "owned_by": "tenant",
        }

    def _demo_prefix(key: Any, model: str) -> str | None:
        """The released demonstrations for ``model`` as a system text (None for the base).

        A serving key gets the same ``model_not_found`` for a set that is queued, running or
        failed as for one that does not exist: whether a job failed may depend on private
        data, and only admin keys (the curator's side) see job status."""
        if model == base_model:
            return None
        job = store.get_job_by_name(key.tenant_id, model)
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

    # -- chat / completions ----------------------------------------------------------------------
    def _params(body: Any, max_tokens: int | None, top_logprobs: int) -> serving.SamplingParams:
        return serving.SamplingParams(
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            temperature=body.temperature,
            top_p=body.top_p,
            n=body.n,
            stop=body.stop_list(),
            seed=body.seed,
            top_logprobs=top_logprobs,
        )

    @app.post("/v1/chat/completions")
    def chat(body: ChatCompletionRequest, key=Depends(_key)):  # type: ignore[no-untyped-def]
        prefix = _demo_prefix(key, body.model)
        try:
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages
            ]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        if prefix:
            if messages[0]["role"] == "system":
                messages[0] = {
                    "role": "system",
                    "content": prefix + "\n\n" + messages[0]["content"],
                }
            else:
                messages.insert(0, {"role": "system", "content": prefix})
        prompt_ids = engine.apply_chat_template(messages)  # type: ignore[attr-defined]
        want_lp = body.logprobs
        params = _params(
            body,
            body.max_completion_tokens or body.max_tokens,
            (body.top_logprobs or 0) if want_lp else 0,
        )
        cid = "chatcmpl-" + uuid.uuid4().hex
        created = _now()
        events = backend.generate(prompt_ids, params, tenant=key.tenant_id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(
                _chat_stream(cid, created, body.model, prompt_ids, params, include_usage, events)
            )
        texts = [""] * params.n
        finish: list[str | None] = [None] * params.n
        lps: list[list[dict[str, Any]]] = [[] for _ in range(params.n)]
        completion_tokens = 0
        for ev in events:
            texts[ev.index] += ev.delta
            completion_tokens += 1
            if ev.finish_reason:
                finish[ev.index] = ev.finish_reason
            if want_lp:
                lps[ev.index].append(_chat_logprob(ev))
        metrics.served_tokens.labels("completion").inc(completion_tokens)
        metrics.served_tokens.labels("prompt").inc(len(prompt_ids))
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts[i]},
                "logprobs": {"content": lps[i]} if want_lp else None,
                "finish_reason": finish[i] or "length",
            }
            for i in range(params.n)
        ]
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(len(prompt_ids), completion_tokens),
        }

    def _chat_logprob(ev: serving.TokenEvent) -> dict[str, Any]:
        tok = engine.decode([ev.token])
        return {
            "token": tok,
            "logprob": ev.logprob,
            "bytes": list(tok.encode()),
            "top_logprobs": [
                {"token": (t := engine.decode([i])), "logprob": lp, "bytes": list(t.encode())}
                for i, lp in ev.top
            ],
        }

    def _chat_stream(
        cid: str,
        created: int,
        model: str,
        prompt_ids: list[int],
        params: serving.SamplingParams,
        include_usage: bool,
        events: Iterator[serving.TokenEvent],
    ) -> Iterator[str]:
        def chunk(choices: list[dict[str, Any]], usage: Any = None) -> str:
            obj = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if include_usage:
                obj["usage"] = usage
            return json.dumps(obj)

        for i in range(params.n):
            yield chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        count = 0
        for ev in events:
            count += 1
            if ev.delta or ev.finish_reason:
                delta = {"content": ev.delta} if ev.delta else {}
                yield chunk(
                    [
                        {
                            "index": ev.index,
                            "delta": delta,
                            "logprobs": None,
                            "finish_reason": ev.finish_reason,
                        }
                    ]
                )
        metrics.served_tokens.labels("completion").inc(count)
        metrics.served_tokens.labels("prompt").inc(len(prompt_ids))
        if include_usage:
            yield chunk([], _usage(len(prompt_ids), count))

    @app.post("/v1/completions")
    def completions(body: CompletionRequest, key=Depends(_key)):  # type: ignore[no-untyped-def]
        prefix = _demo_prefix(key, body.model)
        prompt = body.prompt_text()
        if prefix:
            prompt = prefix + "\n\n" + prompt
        prompt_ids = engine.tokenize(prompt)
        if not prompt_ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        params = _params(body, body.max_tokens or 16, body.logprobs or 0)
        cid = "cmpl-" + uuid.uuid4().hex
        created = _now()
        events = backend.generate(prompt_ids, params, tenant=key.tenant_id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(
                _completion_stream(
                    cid, created, body.model, prompt_ids, params, include_usage, events
                )
            )
        texts = [""] * params.n
        finish: list[str | None] = [None] * params.n
        lps: list[dict[str, list[Any]]] = [
            {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for _ in range(params.n)
        ]
        count = 0
        for ev in events:
            if body.logprobs is not None:
                lp = lps[ev.index]
                lp["text_offset"].append(len(texts[ev.index]))
                lp["tokens"].append(engine.decode([ev.token]))
                lp["token_logprobs"].append(ev.logprob)
                lp["top_logprobs"].append({engine.decode([i]): v for i, v in ev.top})
            texts[ev.index] += ev.delta
            count += 1
            if ev.finish_reason:
                finish[ev.index] = ev.finish_reason
        metrics.served_tokens.labels("completion").inc(count)
        metrics.served_tokens.labels("prompt").inc(len(prompt_ids))
        echo = body.prompt_text() if body.echo else ""
        choices = [
            {
                "index": i,
                "text": echo + texts[i],
                "logprobs": lps[i] if body.logprobs is not None else None,
                "finish_reason": finish[i] or "length",
            }
            for i in range(params.n)
        ]
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(len(prompt_ids), count),
        }

    def _completion_stream(
        cid: str,
        created: int,
        model: str,
        prompt_ids: list[int],
        params: serving.SamplingParams,
        include_usage: bool,
        events: Iterator[serving.TokenEvent],
    ) -> Iterator[str]:
        count = 0
        for ev in events:
            count += 1
            if ev.delta or ev.finish_reason:
                obj = {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": ev.index,
                            "text": ev.delta,
                            "logprobs": None,
                            "finish_reason": ev.finish_reason,
                        }
                    ],
                }
                yield json.dumps(obj)
        metrics.served_tokens.labels("completion").inc(count)
        if include_usage:
            yield json.dumps(
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(len(prompt_ids), count),
                }
            )

    # -- private: datasets ---------------------------------------------------------------------
    def _dataset_json(d: Any) -> dict[str, Any]:
        return {
            "id": d.id,
            "object": "private_dataset",
            "name": d.name,
            "records": d.records,
            # the curator's own view of their data (admin keys only): never a job's label set
            "labels": d.labels,
            "records_without_user": d.records_without_user,
            "created_at": int(d.created),
        }

    @app.post("/v1/private/datasets")
    async def upload_dataset(
        file: UploadFile = File(...), name: str = Form(...), key=Depends(_admin)
    ):  # type: ignore[no-untyped-def]
        raw = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(raw) > MAX_UPLOAD_BYTES:
            raise APIError(413, f"The file is larger than {MAX_UPLOAD_BYTES} bytes.", param="file")
        if not name.strip() or len(name) > 128:
            raise APIError(400, "name must be 1-128 characters.", param="name")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "The file must be UTF-8 JSONL.", param="file") from None
        try:
            records = list(parse_jsonl_lines(text.splitlines(), max_records=MAX_UPLOAD_RECORDS))
        except DataError as exc:
            raise APIError(400, f"Invalid dataset: {exc}", param="file") from None
        if not records:
            raise APIError(400, "The file holds no records.", param="file")
        rows = []
        for r in records:
            row: dict[str, Any] = {"text": r.text, "label": r.label}
            if r.unit.startswith("user:"):
                row["user"] = r.unit[len("user:") :]
            rows.append(row)
        d = await run_in_threadpool(store.create_dataset, key.tenant_id, name.strip(), rows)
        return _dataset_json(d)

    @app.get("/v1/private/datasets")
    def list_datasets(key=Depends(_admin)) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        return {
            "object": "list",
            "data": [_dataset_json(d) for d in store.list_datasets(key.tenant_id)],
        }

    @app.get("/v1/private/datasets/{dataset_id}")
    def get_dataset(dataset_id: str, key=Depends(_admin)) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        d = store.get_dataset(key.tenant_id, dataset_id)
        if d is None:
            raise not_found("dataset", dataset_id)
        return _dataset_json(d)

    @app.delete("/v1/private/datasets/{dataset_id}")
    def delete_dataset(dataset_id: str, key=Depends(_admin)) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        if not store.delete_dataset(key.tenant_id, dataset_id):
            raise not_found("dataset", dataset_id)
        return {"id": dataset_id, "object": "private_dataset.deleted", "deleted": True}

    # -- private: demonstrations -------------------------------------------------------------
    def _plan_for(body: DemonstrationJobRequest, tenant: Any, dataset: Any | None):
        """The plan from declared parameters only. ``dataset`` (its stored attributes, never
        its records) is checked for user ids when the privacy unit is the user."""
        labels = body.labels
        if not labels:
            if body.task != "generic":
                labels = list(get_task(body.task).labels)
            else:
                raise APIError(
                    400,
                    "A generic-task job must declare its label set: give 'labels' "
                    '(e.g. ["A", "B"]). The label set is a privacy parameter and is never '
                    "taken from the data; GET /v1/private/datasets/{id} shows the labels of "
                    "your dataset. Records whose label is not declared are dropped.",
                    param="labels",
                )
        if body.delta is not None and body.delta > tenant.delta:
            raise APIError(
                400,
                f"delta must be at most the tenant's delta ({tenant.delta:g}).",
                param="delta",
            )
        if (
            body.privacy_unit == "user"
            and dataset is not None
            and dataset.records_without_user != 0
        ):
            raise APIError(
                400,
                "privacy_unit 'user' needs a user id on every record, and this dataset has "
                "records without one (see records_without_user in GET "
                "/v1/private/datasets/{id}); upload it with a 'user' field on every line, or "
                "use privacy_unit 'record'.",
                param="privacy_unit",
            )
        try:
            plan = make_plan(
                labels=labels,
                epsilon=body.epsilon,  # type: ignore[arg-type]
                delta=body.delta if body.delta is not None else tenant.delta,
                shots=body.shots,
                max_tokens=body.max_tokens,
                regime=body.regime,
                mechanism=body.mechanism,
                prompts=body.prompts or DEFAULTS["prompts"],
                examples_per_prompt=body.examples_per_prompt or DEFAULTS["examples_per_prompt"],
                q=body.q,
                candidates=body.candidates,
                top_k=body.top_k or DEFAULTS["top_k"],
                public_prior=body.public_prior,
                gate_cutoff=body.gate_cutoff,
                gate_threshold=body.gate_threshold,
                privacy_unit=body.privacy_unit,
                task=body.task,
                model=base_model,
            )
            # the declared worst-case row must fit the engine: whether a job fails can then
            # never depend on how long the private records are
            task = generic_task(plan.labels) if plan.task == "generic" else get_task(plan.task)
            check_context(plan, task, engine.tokenize, getattr(engine, "max_context", None))
            return plan
        except PlanError as exc:
            raise APIError(400, str(exc), param=None, code="invalid_plan") from None

    def _job_json(job: Any) -> dict[str, Any]:
        out = {
            "id": job.id,
            "object": "demonstration_job",
            "name": job.name,
            "dataset": job.dataset_id,
            "status": job.status,
            "plan": job.plan,
            "epsilon": job.epsilon,
            "delta": job.delta,
            "progress": job.progress or {},
            "created_at": int(job.created),
            "error": job.error,
        }
        if job.status == "succeeded":
            out["demonstrations"] = job.demonstrations or []
        return out

    @app.post("/v1/private/demonstrations/plan")
    def plan_job(body: PlanRequest, key=Depends(_admin)) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        tenant = store.get_tenant(key.tenant_id)
        dataset = None
        if body.dataset:
            dataset = store.get_dataset(key.tenant_id, body.dataset)
            if dataset is None:
                raise not_found("dataset", body.dataset, "dataset")
        plan = _plan_for(body, tenant, dataset)
        d = plan.to_dict()
        return {
            "object": "demonstration_plan",
            "plan": d,
            "epsilon": d["epsilon"],
            "delta": plan.delta,
        }

    @app.post("/v1/private/demonstrations")
    def create_job(
        body: DemonstrationJobRequest,
        key=Depends(_admin),  # type: ignore[no-untyped-def]
        idempotency_key: str | None = Header(default=None),
    ):
        tenant = store.get_tenant(key.tenant_id)
        d = store.get_dataset(key.tenant_id, body.dataset)
        if d is None:
            raise not_found("dataset", body.dataset, "dataset")
        if body.name == base_model:
            raise APIError(400, "name collides with the base model id.", param="name")
        plan = _plan_for(body, tenant, d)
        try:
            job, created = store.admit_job(
                key.tenant_id,
                name=body.name,
                dataset_id=d.id,
                plan=plan.to_dict(),
                event=plan.event(),
                epsilon=plan.epsilon(),
                delta=plan.delta,
                idempotency_key=idempotency_key,
                key_id=key.id,
            )
        except BudgetExceeded as exc:
            metrics.jobs.labels("refused").inc()
            raise _budget_error(exc.requested_epsilon, exc.remaining_epsilon, exc.budget) from None
        except NotFound:
            raise not_found("dataset", body.dataset, "dataset") from None
        except ValueError as exc:
            raise APIError(409, str(exc), param="name", code="conflict") from None
        if created:
            metrics.jobs.labels("admitted").inc()
            if runner is not None:
                runner.submit(key.tenant_id, job.id, plan)
        return _job_json(job)

    def _budget_error(requested: float, remaining: float, which: str) -> APIError:
        return APIError(
            429,
            f"Privacy budget exceeded ({which} budget): requested ε={requested:.4g}, "
            f"largest admissible ε for a job of this shape={remaining:.4g}. "
            "Privacy budget is never refunded.",
            "privacy_budget_exceeded",
            "epsilon",
            "privacy_budget_exceeded",
            headers={"x-should-retry": "false"},
        )

    @app.get("/v1/private/demonstrations")
    def list_jobs(key=Depends(_admin)) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        return {"object": "list", "data": [_job_json(j) for j in store.list_jobs(key.tenant_id)]}

    @app.get("/v1/private/demonstrations/{job_id}")
    def get_job(job_id: str, key=Depends(_admin)) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        job = store.get_job(key.tenant_id, job_id)
        if job is None:
            raise not_found("demonstration job", job_id)
        return _job_json(job)

    # -- private: budget and keys ----------------------------------------------------------------
    @app.get("/v1/private/budget")
    def budget(key=Depends(_admin)) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        tenant = store.get_tenant(key.tenant_id)
        out = store.budget(
            key.tenant_id, reference=lambda eps: default_reference_event(eps, tenant.delta)
        )
        metrics.epsilon_spent.labels(key.tenant_id).set(out["epsilon_spent"])
        return {
            "object": "privacy_budget",
            "tenant": tenant.name,
            **out,
            "epsilon_spent_note": EPSILON_SPENT_NOTE,
        }

    @app.post("/v1/private/keys")
    def create_key(body: KeyRequest, key=Depends(_admin)) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        k, plaintext = store.create_key(key.tenant_id, body.scope, body.name, body.epsilon_cap)
        return {
            "id": k.id,
            "object": "api_key",
            "scope": k.scope,
            "name": k.name,
            "epsilon_cap": k.epsilon_cap,
            "key": plaintext,
        }

    return app


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _sse(chunks: Iterator[str]) -> StreamingResponse:
    def body() -> Iterator[str]:
        for c in chunks:
            yield f"data: {c}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )


__all__ = ["create_app"]
