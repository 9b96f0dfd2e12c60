"""The app in-process (httpx.ASGITransport, fake engine): storage failure during admission
fails closed with 503 and generates nothing; the shapes of errors from the app itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from proxy.app import create_app
from proxy.store import StorageError, Store
from tests.fakes import FakeEngine


class _Engine(FakeEngine):
    name = "fake-model"

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize("".join(m["content"] for m in messages))


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def _upload(c: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    """A six-record, two-label dataset."""
    rows = "\n".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) for i in range(6))
    return await c.post(
        "/v1/private/datasets",
        data={"name": "d"},
        headers=headers,
        files={"file": ("d.jsonl", rows.encode())},
    )


def test_storage_failure_during_admission_is_503_and_nothing_runs(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'a.db'}")
    _, key = store.create_tenant("t", 8.0, 1e-6)
    engine = _Engine()
    app = create_app(store, engine, run_jobs=False)

    def broken_admit(*args: Any, **kwargs: Any) -> Any:
        raise StorageError("disk I/O error")

    async def go() -> httpx.Response:
        async with _client(app) as c:
            h = {"Authorization": f"Bearer {key}"}
            ds = await _upload(c, h)
            store.admit_job = broken_admit  # type: ignore[method-assign]  # a test double
            return await c.post(
                "/v1/private/demonstrations",
                headers=h,
                json={
                    "dataset": ds.json()["id"],
                    "name": "n",
                    "epsilon": 1.0,
                    "labels": ["a", "b"],
                },
            )

    r = asyncio.run(go())
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "storage_unavailable" and "disk" not in err["message"]
    assert engine.started == []  # nothing private was read or generated
    store.close()


def test_unknown_route_and_method_are_openai_shaped(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'b.db'}")
    app = create_app(store, _Engine(), run_jobs=False)

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with _client(app) as c:
            return await c.get("/v1/nope"), await c.delete("/health")

    missing, method = asyncio.run(go())
    assert missing.status_code == 404 and set(missing.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    assert method.status_code == 405 and "error" in method.json()
    store.close()


def test_gated_plan_through_the_api_is_charged_as_gated(tmp_path: Path) -> None:
    """The gate's parameters reach the plan; the ledger stores the gated event (c rounds) and
    the budget spent is that event's ε; an inconsistent gate is a 400 naming the problem."""
    store = Store.open(f"sqlite:///{tmp_path / 'g.db'}")
    _, key = store.create_tenant("t", 8.0, 1e-6)
    app = create_app(store, _Engine(), run_jobs=False)
    job = {
        "epsilon": 2.0,
        "labels": ["a", "b"],
        "mechanism": "exponential",
        "max_tokens": 20,
        "prompts": 4,
        "public_prior": 1.0,
        "gate_cutoff": 5,
        "gate_threshold": 0.4,
    }

    async def go() -> tuple[httpx.Response, ...]:
        async with _client(app) as c:
            h = {"Authorization": f"Bearer {key}"}
            ds = await _upload(c, h)
            ds_id = ds.json()["id"]
            plan = await c.post(
                "/v1/private/demonstrations/plan", headers=h, json={"dataset": ds_id, **job}
            )
            made = await c.post(
                "/v1/private/demonstrations",
                headers=h,
                json={"dataset": ds_id, "name": "g", **job},
            )
            bad = await c.post(
                "/v1/private/demonstrations/plan",
                headers=h,
                json={"dataset": ds_id, **job, "regime": "resampled", "q": 0.1},
            )
            budget = await c.get("/v1/private/budget", headers=h)
            return plan, made, bad, budget

    plan, made, bad, budget = asyncio.run(go())
    assert plan.status_code == 200 and made.status_code == 200
    p = plan.json()["plan"]
    assert p["gate_cutoff"] == 5 and p["gate_threshold"] == 0.4 and p["public_prior"] == 1.0
    assert p["event"]["gated"] is True and p["event"]["steps"] == 5
    assert bad.status_code == 400 and "gate" in bad.json()["error"]["message"]
    assert budget.json()["epsilon_spent"] <= 2.0 + 1e-9
    assert budget.json()["epsilon_spent"] >= plan.json()["epsilon"] - 1e-6
    store.close()


def test_generic_job_must_declare_its_labels(tmp_path: Path) -> None:
    """With a generic task and no `labels`, both the plan and the job are refused with 400
    (param `labels`, saying how to declare them) even though the dataset's labels are known:
    the label set is never taken from the data. Nothing is charged or generated. With the
    labels declared the same request is admitted, and the dataset's own labels stay visible to
    the admin (the curator's side)."""
    store = Store.open(f"sqlite:///{tmp_path / 'l.db'}")
    tenant, key = store.create_tenant("t", 8.0, 1e-6)
    engine = _Engine()
    app = create_app(store, engine, run_jobs=False)

    async def go() -> tuple[httpx.Response, ...]:
        async with _client(app) as c:
            h = {"Authorization": f"Bearer {key}"}
            ds = await _upload(c, h)
            body = {"dataset": ds.json()["id"], "name": "n", "epsilon": 1.0}
            plan = await c.post("/v1/private/demonstrations/plan", headers=h, json=body)
            plan_no_ds = await c.post(
                "/v1/private/demonstrations/plan", headers=h, json={"epsilon": 1.0}
            )
            made = await c.post("/v1/private/demonstrations", headers=h, json=body)
            budget = await c.get("/v1/private/budget", headers=h)
            ok = await c.post(
                "/v1/private/demonstrations", headers=h, json={**body, "labels": ["a", "b"]}
            )
            return ds, plan, plan_no_ds, made, budget, ok

    ds, plan, plan_no_ds, made, budget, ok = asyncio.run(go())
    assert ds.json()["labels"] == ["a", "b"]
    for r in (plan, plan_no_ds, made):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "labels" and err["type"] == "invalid_request_error"
        assert "'labels'" in err["message"] and "GET /v1/private/datasets/{id}" in err["message"]
    assert budget.json()["charges"] == []  # the refused requests charged nothing
    assert engine.started == []
    assert ok.status_code == 200, ok.text
    assert ok.json()["plan"]["labels"] == ["a", "b"]
    assert ok.json()["plan"]["labels_source"] == "declared"
    assert [j.id for j in store.list_jobs(tenant.id)] == [ok.json()["id"]]  # the one admitted
    store.close()


def _rows(users: bool) -> bytes:
    return "\n".join(
        json.dumps({"text": f"t{i}", "label": "ab"[i % 2], **({"user": f"u{i}"} if users else {})})
        for i in range(6)
    ).encode()


def test_user_level_job_needs_user_ids_on_every_record(tmp_path: Path) -> None:
    """The dataset says at upload how many records lack a user id; a user-level job over a
    dataset with any is refused before admission (400, nothing charged), never run as record
    level under a user-level claim; over a dataset with user ids it is admitted."""
    store = Store.open(f"sqlite:///{tmp_path / 'u.db'}")
    _, key = store.create_tenant("t", 8.0, 1e-6)
    engine = _Engine()
    app = create_app(store, engine, run_jobs=False)
    job = {"epsilon": 1.0, "labels": ["a", "b"], "privacy_unit": "user"}

    async def go() -> tuple[httpx.Response, ...]:
        async with _client(app) as c:
            h = {"Authorization": f"Bearer {key}"}
            out = []
            for users in (False, True):
                ds = await c.post(
                    "/v1/private/datasets",
                    data={"name": f"users-{users}"},
                    headers=h,
                    files={"file": ("d.jsonl", _rows(users))},
                )
                body = {"dataset": ds.json()["id"], **job}
                plan = await c.post("/v1/private/demonstrations/plan", headers=h, json=body)
                made = await c.post(
                    "/v1/private/demonstrations", headers=h, json={**body, "name": f"j{users}"}
                )
                budget = await c.get("/v1/private/budget", headers=h)
                out += [ds, plan, made, budget]
            return tuple(out)

    ds0, plan0, made0, budget0, ds1, plan1, made1, budget1 = asyncio.run(go())
    assert ds0.json()["records_without_user"] == 6 and ds1.json()["records_without_user"] == 0
    for r in (plan0, made0):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "privacy_unit" and "user id" in err["message"]
    assert budget0.json()["charges"] == [] and engine.started == []
    assert plan1.status_code == 200 and made1.status_code == 200, made1.text
    assert made1.json()["plan"]["privacy_unit"] == "user"
    assert len(budget1.json()["charges"]) == 1
    store.close()


def test_job_delta_is_capped_at_the_tenants(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'd.db'}")
    _, key = store.create_tenant("t", 8.0, 1e-6)
    app = create_app(store, _Engine(), run_jobs=False)

    async def go() -> tuple[httpx.Response, ...]:
        async with _client(app) as c:
            h = {"Authorization": f"Bearer {key}"}
            ds = await _upload(c, h)
            body = {"dataset": ds.json()["id"], "name": "n", "epsilon": 1.0, "labels": ["a"]}
            plan = await c.post(
                "/v1/private/demonstrations/plan", headers=h, json={**body, "delta": 1e-5}
            )
            made = await c.post(
                "/v1/private/demonstrations", headers=h, json={**body, "delta": 1e-5}
            )
            budget = await c.get("/v1/private/budget", headers=h)
            ok = await c.post("/v1/private/demonstrations", headers=h, json={**body, "delta": 1e-7})
            return plan, made, budget, ok

    plan, made, budget, ok = asyncio.run(go())
    for r in (plan, made):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "delta" and "1e-06" in r.json()["error"]["message"]
    assert budget.json()["charges"] == []
    assert ok.status_code == 200 and ok.json()["delta"] == 1e-7
    store.close()


def test_budget_says_epsilon_spent_is_information(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'b.db'}")
    _, key = store.create_tenant("t", 8.0, 1e-6)
    app = create_app(store, _Engine(), run_jobs=False)

    async def go() -> httpx.Response:
        async with _client(app) as c:
            return await c.get("/v1/private/budget", headers={"Authorization": f"Bearer {key}"})

    b = asyncio.run(go()).json()
    assert b["epsilon_spent"] == 0.0 and b["epsilon_limit"] == 8.0  # kept for clients
    note = b["epsilon_spent_note"]
    assert note.startswith("information only") and "filter's limit" in note
    store.close()


def test_serving_key_sees_unfinished_sets_as_nonexistent(tmp_path: Path) -> None:
    """Whether a set is queued, running or failed (a failure may depend on private data) is
    not visible to a serving key: each answers exactly as a set that does not exist, on every
    route naming a model. An admin key still sees the status."""
    store = Store.open(f"sqlite:///{tmp_path / 's.db'}")
    tenant, admin = store.create_tenant("t", 8.0, 1e-6)
    _, serving = store.create_key(tenant.id, "serving")
    app = create_app(store, _Engine(), run_jobs=False)
    names = {s: f"set-{s}-zq" for s in ("queued", "running", "failed", "missing")}

    async def go() -> dict[str, list[tuple[int, str]]]:
        async with _client(app) as c:
            h = {"Authorization": f"Bearer {admin}"}
            ds = (await _upload(c, h)).json()["id"]
            for status in ("queued", "running", "failed"):
                body = {"dataset": ds, "name": names[status], "epsilon": 0.5, "labels": ["a"]}
                job = (await c.post("/v1/private/demonstrations", headers=h, json=body)).json()
                if status != "queued":
                    store.update_job(job["id"], status=status, error="generation failed (X)")
            out: dict[str, list[tuple[int, str]]] = {}
            for who, k in (("serving", serving), ("admin", admin)):
                hk = {"Authorization": f"Bearer {k}"}
                for status, name in names.items():
                    msg = [{"role": "user", "content": "x"}]
                    rs = [
                        await c.post(
                            "/v1/chat/completions",
                            headers=hk,
                            json={"model": name, "messages": msg, "max_tokens": 1},
                        ),
                        await c.post(
                            "/v1/completions",
                            headers=hk,
                            json={"model": name, "prompt": "x", "max_tokens": 1},
                        ),
                        await c.get(f"/v1/models/{name}", headers=hk),
                    ]
                    listed = (await c.get("/v1/models", headers=hk)).json()["data"]
                    assert name not in [m["id"] for m in listed]
                    out[f"{who}-{status}"] = [
                        (r.status_code, r.text.replace(name, "NAME")) for r in rs
                    ]
            return out

    out = asyncio.run(go())
    missing = out["serving-missing"]
    assert all(code == 404 and "model_not_found" in text for code, text in missing)
    for status in ("queued", "running", "failed"):
        assert out[f"serving-{status}"] == missing, status
    # the admin (curator's side) keeps the detailed status on chat and completions
    for status in ("queued", "running", "failed"):
        chat, completion, _ = out[f"admin-{status}"]
        for code, text in (chat, completion):
            assert code == 400 and "model_not_ready" in text and f"status: {status}" in text
    store.close()


def test_routes_are_wired_in_their_historic_order(tmp_path: Path) -> None:
    """create_app includes the ops, OpenAI, private and batch routers: exactly these routes,
    in this order (route order decides matching and the order of /openapi.json)."""
    store = Store.open(f"sqlite:///{tmp_path / 'r.db'}")
    app = create_app(store, _Engine(), run_jobs=False)
    from fastapi.routing import APIRoute

    routes = [(r.path, sorted(r.methods)) for r in app.routes if isinstance(r, APIRoute)]
    assert routes == [
        ("/health", ["GET"]),
        ("/metrics", ["GET"]),
        ("/v1/models", ["GET"]),
        ("/v1/models/{model_id:path}", ["GET"]),
        ("/v1/chat/completions", ["POST"]),
        ("/v1/completions", ["POST"]),
        ("/v1/private/datasets", ["POST"]),
        ("/v1/private/datasets", ["GET"]),
        ("/v1/private/datasets/{dataset_id}", ["GET"]),
        ("/v1/private/datasets/{dataset_id}", ["DELETE"]),
        ("/v1/private/demonstrations/plan", ["POST"]),
        ("/v1/private/demonstrations", ["POST"]),
        ("/v1/private/demonstrations", ["GET"]),
        ("/v1/private/demonstrations/{job_id}", ["GET"]),
        ("/v1/private/budget", ["GET"]),
        ("/v1/private/keys", ["POST"]),
        ("/v1/private/predictors", ["POST"]),
        ("/v1/private/predictors", ["GET"]),
        ("/v1/private/predictors/{predictor_id}", ["GET"]),
        ("/v1/files", ["POST"]),
        ("/v1/files", ["GET"]),
        ("/v1/files/{file_id}", ["GET"]),
        ("/v1/files/{file_id}/content", ["GET"]),
        ("/v1/files/{file_id}", ["DELETE"]),
        ("/v1/batches", ["POST"]),
        ("/v1/batches", ["GET"]),
        ("/v1/batches/{batch_id}", ["GET"]),
        ("/v1/batches/{batch_id}/cancel", ["POST"]),
    ]
    store.close()


def _events(text: str) -> list[dict[str, Any]]:
    """The JSON chunks of a server-sent-events body; it must end with ``[DONE]``."""
    lines = [ln for ln in text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    return [json.loads(ln[len("data: ") :]) for ln in lines[:-1]]


def test_chat_and_completions_response_shapes(tmp_path: Path) -> None:
    """The one response builder keeps each endpoint's shape: field order, ids, ``object``,
    ``finish_reason`` on every choice, ``usage`` (``"usage": null`` on every chat chunk, none on
    a completion chunk, when usage is requested), logprobs formats and ``[DONE]``."""
    store = Store.open(f"sqlite:///{tmp_path / 's.db'}")
    _, key = store.create_tenant("t", 8.0, 1e-6)
    app = create_app(store, _Engine(), run_jobs=False)
    h = {"Authorization": f"Bearer {key}"}
    common = {"model": "fake-model", "seed": 3, "n": 2, "max_tokens": 4}
    chat = {**common, "messages": [{"role": "user", "content": "hi"}]}
    cmpl = {**common, "prompt": "hi"}
    usage_opt = {"stream": True, "stream_options": {"include_usage": True}}

    async def go() -> list[httpx.Response]:
        async with _client(app) as c:
            return [
                await c.post("/v1/chat/completions", headers=h, json={**chat, "logprobs": True}),
                await c.post("/v1/completions", headers=h, json={**cmpl, "logprobs": 1}),
                await c.post("/v1/chat/completions", headers=h, json={**chat, **usage_opt}),
                await c.post("/v1/completions", headers=h, json={**cmpl, **usage_opt}),
                await c.post("/v1/completions", headers=h, json={**cmpl, "stream": True}),
            ]

    chat_json, cmpl_json, chat_sse, cmpl_sse, cmpl_plain = asyncio.run(go())
    for r, obj, text_key in (
        (chat_json, "chat.completion", "message"),
        (cmpl_json, "text_completion", "text"),
    ):
        body = r.json()
        assert list(body) == ["id", "object", "created", "model", "choices", "usage"]
        assert body["object"] == obj and body["model"] == "fake-model"
        u = body["usage"]
        assert u["prompt_tokens"] == 2 and 2 <= u["completion_tokens"] <= 8
        assert list(u) == ["prompt_tokens", "completion_tokens", "total_tokens"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        for i, choice in enumerate(body["choices"]):
            assert list(choice) == ["index", text_key, "logprobs", "finish_reason"]
            assert choice["index"] == i and choice["finish_reason"] in ("stop", "length")
    assert chat_json.json()["id"].startswith("chatcmpl-") and cmpl_json.json()["id"].startswith(
        "cmpl-"
    )
    lp = chat_json.json()["choices"][0]["logprobs"]["content"]
    assert 1 <= len(lp) <= 4 and list(lp[0]) == ["token", "logprob", "bytes", "top_logprobs"]
    clp = cmpl_json.json()["choices"][0]["logprobs"]
    assert list(clp) == ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
    assert clp["text_offset"][0] == 0 and len(clp["text_offset"]) == len(clp["tokens"])

    chunks = _events(chat_sse.text)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""}
    ] * 2
    assert all(list(c) == ["id", "object", "created", "model", "choices", "usage"] for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 2
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    chunks = _events(cmpl_sse.text)
    assert all(list(c) == ["id", "object", "created", "model", "choices"] for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 2
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert all("usage" not in c for c in _events(cmpl_plain.text))
    assert cmpl_plain.headers["cache-control"] == "no-cache"
    assert cmpl_plain.headers["content-type"].startswith("text/event-stream")
    store.close()


def test_proxy_modules_import_no_cycle() -> None:
    """No import cycle among proxy modules (lazy imports inside functions included)."""
    import ast

    root = Path(__file__).resolve().parents[2]
    graph: dict[str, set[str]] = {}
    for p in (root / "proxy").rglob("*.py"):
        name = ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxy"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("proxy"))
        graph[name] = deps
    edges = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, " -> ".join((*path, m))
        if m in done:
            return
        for d in sorted(edges[m]):
            visit(d, (*path, m))
        done.add(m)

    for m in sorted(edges):
        visit(m, ())


def test_a_body_refused_before_routing_is_counted_under_its_route(tmp_path: Path) -> None:
    """A 413 from the body limit (no route ran) is counted in ``/metrics`` under the route its
    path names; a path no route matches stays ``unmatched``."""
    from proxy.limits import Limits

    store = Store.open(f"sqlite:///{tmp_path / 'a.db'}")
    app = create_app(
        store, _Engine(), run_jobs=False, metrics_key="m", limits=Limits(max_body_bytes=1024)
    )

    async def go() -> str:
        async with _client(app) as c:
            big = await c.post("/v1/chat/completions", content=b" " * 2048)
            assert big.status_code == 413
            assert (await c.get("/v1/nowhere")).status_code == 404
            return (await c.get("/metrics", headers={"Authorization": "Bearer m"})).text

    text = asyncio.run(go())
    assert 'method="POST",route="/v1/chat/completions",status="413"} 1.0' in text
    assert 'method="GET",route="unmatched",status="404"} 1.0' in text
