"""The Batch API end to end: the official `openai` client against a real `dpicl serve` (the
fake engine with a chat template, tests/proxy/fake_server.py; a real SQLite ledger).

Files and batches in OpenAI's shapes, output and error files, a file that fails validation,
cancel, tenant isolation, a server killed with SIGKILL mid-batch and restarted (no line lost,
none answered twice), malformed requests. No timing is asserted: a test that must stop a batch
between two chunks holds the engine with a file (``DPICL_FAKE_HOLD_FILE``) and polls until
the batch reaches that point.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from devtools.server import Server, create_tenant
from proxy.batch_input import dumps
from tests.proxy.fake_server import MODEL

CHUNK = 4


def _server(tmp: Path, db: str, name: str, serving: str = "auto", **env: str) -> Server:
    return Server(
        db=db,
        log_path=tmp / f"{name}.log",
        engine="fake-chat",
        entry="tests.proxy.fake_server",
        extra_args=("--batch-chunk-lines", str(CHUNK), "--serving", serving),
        env=env,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("batch")
    db = f"sqlite:///{tmp / 'dpicl.db'}"
    keys = {"a": create_tenant(db, "alpha", 8.0), "b": create_tenant(db, "beta", 8.0)}
    srv = _server(tmp, db, "server").start()
    try:
        yield {"srv": srv, "keys": keys, "tmp": tmp, "db": db}
    finally:
        srv.stop()


def client(server: dict[str, Any], who: str = "a") -> openai.OpenAI:
    return openai.OpenAI(base_url=server["srv"].url + "/v1", api_key=server["keys"][who])


def raw(server: dict[str, Any], who: str = "a") -> httpx.Client:
    key = server["keys"][who]
    return httpx.Client(
        base_url=server["srv"].url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def chat_line(i: int, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"question {i}"}],
            "max_tokens": 6,
            "temperature": 0,
            **body,
        },
    }


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def submit(c: openai.OpenAI, rows: list[dict[str, Any]], endpoint: str = "/v1/chat/completions"):
    f = c.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch")
    return c.batches.create(
        input_file_id=f.id,
        endpoint=endpoint,  # type: ignore[arg-type]  # the client's Literal of endpoints
        completion_window="24h",
        metadata={"run": "test"},
    )


def wait(c: openai.OpenAI, batch_id: str, until: Any, timeout: float = 120) -> Any:
    """Poll until ``until(batch)`` holds (a liveness bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = c.batches.retrieve(batch_id)
        if until(b):
            return b
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} never reached the expected state: {b}")


def finished(b: Any) -> bool:
    return b.status in ("completed", "failed", "cancelled", "expired")


def lines_of(c: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in c.files.content(file_id).text.splitlines()]


# -- files -------------------------------------------------------------------------------------


def test_files_create_list_retrieve_content_delete(server: dict[str, Any]) -> None:
    c = client(server)
    data = jsonl([chat_line(0)])
    f = c.files.create(file=("mine.jsonl", data), purpose="batch")
    assert f.object == "file" and f.id.startswith("file-")
    assert (f.bytes, f.filename, f.purpose) == (len(data), "mine.jsonl", "batch")
    assert isinstance(f.created_at, int)
    assert c.files.retrieve(f.id).model_dump() == f.model_dump()
    assert f.id in [x.id for x in c.files.list()]
    assert c.files.content(f.id).content == data
    deleted = c.files.delete(f.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (f.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


# -- batches -----------------------------------------------------------------------------------


def test_batch_runs_to_completed_and_lines_match_the_online_route(server: dict[str, Any]) -> None:
    c = client(server)
    rows = [chat_line(i) for i in range(10)] + [chat_line(10, n=2, logprobs=True, top_logprobs=2)]
    batch = submit(c, rows)
    assert batch.object == "batch" and batch.status == "validating"
    assert batch.endpoint == "/v1/chat/completions" and batch.metadata == {"run": "test"}
    done = wait(c, batch.id, finished)
    assert done.status == "completed", done
    assert done.request_counts is not None
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (11, 11, 0)
    assert done.error_file_id is None and done.errors is None
    assert done.in_progress_at and done.completed_at and done.expires_at
    out = lines_of(c, done.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(r["custom_id"] for r in rows)
    by_id = {x["custom_id"]: x for x in out}
    with raw(server) as h:
        for i in (0, 10):
            line = by_id[f"req-{i}"]
            assert line["error"] is None and line["response"]["status_code"] == 200
            assert line["id"].startswith("batch_req_")
            online = h.post("/v1/chat/completions", json=rows[i]["body"])
            assert online.status_code == 200
            body = dict(line["response"]["body"])
            assert body["object"] == "chat.completion"
            # byte for byte what the online route sends, but for its own id and time
            body["id"], body["created"] = online.json()["id"], online.json()["created"]
            assert dumps(body).encode() == online.content


def test_demonstration_set_lines_match_the_online_route(server: dict[str, Any]) -> None:
    """A line naming a released demonstration set, in a batch made with a serving key."""
    rows = "\n".join(
        json.dumps({"text": f"item {i} about markets", "label": "ab"[i % 2]}) for i in range(24)
    )
    with raw(server) as h:
        ds = h.post(
            "/v1/private/datasets", data={"name": "d"}, files={"file": ("d.jsonl", rows.encode())}
        ).json()
        job = h.post(
            "/v1/private/demonstrations",
            json={
                "dataset": ds["id"],
                "name": "demo-set",
                "epsilon": 4.0,
                "shots": 1,
                "max_tokens": 4,
                "prompts": 4,
                "labels": ["a", "b"],
            },
        ).json()
        deadline = time.monotonic() + 120
        while h.get(f"/v1/private/demonstrations/{job['id']}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline, "the demonstration job did not succeed"
            time.sleep(0.2)
        demos = h.get(f"/v1/private/demonstrations/{job['id']}").json()["demonstrations"]
        assert any(d["text"] for d in demos)  # the set puts text in the prompt
        serving = h.post("/v1/private/keys", json={"scope": "serving"}).json()["key"]
    c = openai.OpenAI(base_url=server["srv"].url + "/v1", api_key=serving)
    line = chat_line(0, model="demo-set")
    done = wait(c, submit(c, [line]).id, finished)
    assert done.status == "completed" and done.request_counts.completed == 1
    body = lines_of(c, done.output_file_id)[0]["response"]["body"]
    online = httpx.post(
        server["srv"].url + "/v1/chat/completions",
        json=line["body"],
        headers={"Authorization": f"Bearer {serving}"},
        timeout=60,
    )
    assert online.status_code == 200 and body["model"] == "demo-set"
    body["id"], body["created"] = online.json()["id"], online.json()["created"]
    assert dumps(body).encode() == online.content


def test_completions_batch(server: dict[str, Any]) -> None:
    c = client(server)
    rows = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": MODEL,
                "prompt": f"p{i}",
                "max_tokens": 3,
                "temperature": 0,
                "logprobs": 2,
            },
        }
        for i in range(5)
    ]
    done = wait(c, submit(c, rows, "/v1/completions").id, finished)
    assert done.status == "completed"
    out = lines_of(c, done.output_file_id)
    with raw(server) as h:
        online = h.post("/v1/completions", json=rows[3]["body"])
    body = next(x for x in out if x["custom_id"] == "c3")["response"]["body"]
    body["id"], body["created"] = online.json()["id"], online.json()["created"]
    assert dumps(body).encode() == online.content


def test_lines_with_bad_bodies_go_to_the_error_file(server: dict[str, Any]) -> None:
    c = client(server)
    rows = [
        chat_line(0),
        chat_line(1, model="no-such-model"),
        chat_line(2, temperature=5),
        chat_line(3, stream=True),
    ]
    done = wait(c, submit(c, rows).id, finished)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 3)
    errors = {x["custom_id"]: x for x in lines_of(c, done.error_file_id)}
    assert set(errors) == {"req-1", "req-2", "req-3"}
    with raw(server) as h:
        for cid, i in (("req-1", 1), ("req-2", 2)):
            online = h.post("/v1/chat/completions", json=rows[i]["body"])
            response = errors[cid]["response"]
            assert response["status_code"] == online.status_code
            assert dumps(response["body"]).encode() == online.content
    assert errors["req-1"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors["req-3"]["response"]["status_code"] == 400
    assert [x["custom_id"] for x in lines_of(c, done.output_file_id)] == ["req-0"]


def test_a_file_with_bad_lines_fails_validation_naming_them(server: dict[str, Any]) -> None:
    c = client(server)
    good = json.dumps(chat_line(0))
    bad = [
        good,
        "{not json",
        json.dumps({**chat_line(1), "custom_id": None}),
        good,  # repeats req-0
        json.dumps({**chat_line(2), "url": "/v1/embeddings"}),
        "",
        json.dumps({**chat_line(3), "body": "text"}),
    ]
    f = c.files.create(file=("bad.jsonl", "\n".join(bad).encode()), purpose="batch")
    b = c.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait(c, b.id, finished)
    assert done.status == "failed" and done.failed_at
    assert done.errors is not None and done.errors.data is not None
    got = [(e.line, e.code) for e in done.errors.data]
    assert got == [
        (2, "invalid_json_line"),
        (3, "missing_custom_id"),
        (4, "duplicate_custom_id"),
        (5, "mismatched_endpoint"),
        (7, "invalid_body"),
    ]
    assert done.output_file_id is None and done.error_file_id is None
    assert all("question" not in (e.message or "") for e in done.errors.data)


def test_tenant_isolation(server: dict[str, Any]) -> None:
    a, b = client(server, "a"), client(server, "b")
    batch = submit(a, [chat_line(0)])
    wait(a, batch.id, finished)
    for call in (
        lambda: b.files.retrieve(batch.input_file_id),
        lambda: b.files.content(batch.input_file_id),
        lambda: b.files.delete(batch.input_file_id),
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
        lambda: b.batches.create(
            input_file_id=batch.input_file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [x.id for x in b.batches.list()]
    assert batch.input_file_id not in [x.id for x in b.files.list()]


def test_malformed_requests_get_openai_errors(server: dict[str, Any]) -> None:
    c = client(server)
    f = c.files.create(file=("x.jsonl", jsonl([chat_line(0)])), purpose="batch")
    with raw(server) as h:
        cases = [
            h.post("/v1/batches", json={"endpoint": "/v1/chat/completions"}),
            h.post(
                "/v1/batches",
                json={
                    "input_file_id": f.id,
                    "endpoint": "/v1/embeddings",
                    "completion_window": "24h",
                },
            ),
            h.post(
                "/v1/batches",
                json={
                    "input_file_id": f.id,
                    "endpoint": "/v1/completions",
                    "completion_window": "1h",
                },
            ),
            h.post(
                "/v1/batches",
                json={
                    "input_file_id": f.id,
                    "endpoint": "/v1/completions",
                    "completion_window": "24h",
                    "metadata": {"k": 1},
                },
            ),
            h.post("/v1/batches", content=b"[", headers={"content-type": "application/json"}),
            h.post("/v1/files", files={"file": ("x.jsonl", b"{}")}, data={"purpose": "fine-tune"}),
            h.post("/v1/files", data={"purpose": "batch"}),
            h.post(
                "/v1/files", files={"file": ("x.jsonl", b"\xff\xfe")}, data={"purpose": "batch"}
            ),
            h.post(
                "/v1/files",
                files={"file": ("x.jsonl", b"x" * (1024 * 1024 + 1))},
                data={"purpose": "batch"},
            ),
            h.get("/v1/batches", params={"limit": 0}),
        ]
        not_found = [h.get("/v1/batches/batch_nope"), h.get("/v1/files/file-nope/content")]
    for r in cases:
        assert r.status_code == 400, (r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert cases[-2].json()["error"]["code"] == "line_too_long"
    for r in not_found:
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    done = wait(c, submit(c, [chat_line(0)]).id, finished)
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(done.id)


# -- cancel and restart (a server of their own, held between chunks) --------------------------


def _held(tmp: Path, name: str, after: int) -> tuple[Server, Path, str, str]:
    db = f"sqlite:///{tmp / (name + '.db')}"
    key = create_tenant(db, "held", 8.0)
    hold = tmp / f"{name}.hold"
    hold.touch()
    # the hold counts engine batch starts: the step loop's Lockstep starts one per chunk
    # (continuous batching's serving batches are covered in tests/proxy/test_batch_runner.py)
    srv = _server(
        tmp,
        db,
        name,
        "step-loop",
        DPICL_FAKE_HOLD_FILE=str(hold),
        DPICL_FAKE_HOLD_AFTER=str(after),
    ).start()
    return srv, hold, db, key


def test_cancel_stops_at_a_line_boundary(tmp_path: Path) -> None:
    srv, hold, _, key = _held(tmp_path, "cancel", after=2)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key=key)
        batch = submit(c, [chat_line(i) for i in range(5 * CHUNK)])
        wait(c, batch.id, lambda b: b.request_counts.completed == 2 * CHUNK)
        cancelling = c.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
        hold.unlink()
        done = wait(c, batch.id, finished)
        out = lines_of(c, done.output_file_id)
    finally:
        srv.stop()
    assert done.status == "cancelled" and done.cancelled_at
    counts = done.request_counts
    assert counts.total == 5 * CHUNK and 2 * CHUNK <= counts.completed < 5 * CHUNK
    ids = [x["custom_id"] for x in out]
    assert len(ids) == len(set(ids)) == counts.completed
    assert all(x["response"]["status_code"] == 200 for x in out)


def test_restart_resumes_without_losing_or_repeating_a_line(tmp_path: Path) -> None:
    srv, _, db, key = _held(tmp_path, "resume", after=2)
    rows = [chat_line(i) for i in range(4 * CHUNK + 1)]
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key=key)
        batch = submit(c, rows)
        wait(c, batch.id, lambda b: b.request_counts.completed == 2 * CHUNK)
    finally:
        assert srv.proc is not None
        srv.proc.kill()  # SIGKILL mid-batch: the third chunk is held in the engine
        srv.proc.wait()
        srv.stop()
    with sqlite3.connect(db[len("sqlite:///") :]) as conn:
        before = dict(conn.execute("SELECT line, result FROM batch_lines").fetchall())
    assert len(before) == 2 * CHUNK

    again = _server(tmp_path, db, "restarted").start()
    try:
        c = openai.OpenAI(base_url=again.url + "/v1", api_key=key)
        done = wait(c, batch.id, finished)
        out = c.files.content(done.output_file_id).text.splitlines()
    finally:
        again.stop()
    assert "resuming 1 unfinished batch" in again.log_tail(20_000)
    assert done.status == "completed"
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(rows), len(rows), 0)
    ids = [json.loads(x)["custom_id"] for x in out]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows)  # none lost, none twice
    for text in before.values():  # the lines answered before the kill were not answered again
        assert text in out
