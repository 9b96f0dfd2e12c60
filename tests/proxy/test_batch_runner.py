"""The Batch API's parts in-process (fake engine): the shared engine batch gives every request
exactly the events it would get alone, lines are recorded exactly once (SQLite and
PostgreSQL), finalisation writes the files, and ``dpicl classify`` resumes where it stopped."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.answering import ENDPOINTS, Answer
from proxy.backends import backend_for
from proxy.batch_input import (
    InputLine,
    check_upload,
    output_line,
    parse_input,
)
from proxy.batches import run_lines
from proxy.classify import classify, done_ids, local_key, read_requests
from proxy.context import AppContext
from proxy.errors import APIError
from proxy.limits import DEFAULT_LIMITS, Limits
from proxy.lockstep import Lockstep, Stopped
from proxy.metrics import Metrics
from proxy.serving import SamplingParams, generate
from proxy.store import LineResult, Store
from tests.proxy.conftest import PG_URL
from tests.proxy.fake_server import MODEL, ChatFakeEngine

PARAMS = [
    SamplingParams(max_tokens=5, temperature=0.0),
    SamplingParams(max_tokens=9, temperature=1.0, seed=7, n=3),
    SamplingParams(max_tokens=2, temperature=0.7, seed=1, stop=["c"]),
    SamplingParams(max_tokens=12, temperature=1.0, seed=3, top_logprobs=2, n=2),
]


def _events(events: Any) -> list[tuple[Any, ...]]:
    return [(e.index, e.token, e.delta, e.logprob, e.top, e.finish_reason) for e in events]


def test_lockstep_gives_each_request_its_own_events() -> None:
    engine = ChatFakeEngine()
    prompts = [engine.tokenize(f"prompt number {i}" * (i + 1)) for i in range(len(PARAMS))]
    alone = [_events(generate(engine, p, s)) for p, s in zip(prompts, PARAMS, strict=True)]
    shared = Lockstep(engine, [(p, s.n) for p, s in zip(prompts, PARAMS, strict=True)])
    got: list[Any] = [None] * len(PARAMS)

    def run(i: int) -> None:
        got[i] = _events(shared.generate(i, prompts[i], PARAMS[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PARAMS))]
    starts = len(engine.started)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone
    assert len(engine.started) == starts  # one prefill, made before the threads ran


def test_stopped_lockstep_answers_nothing_more() -> None:
    engine = ChatFakeEngine()
    stop = threading.Event()
    prompt = engine.tokenize("x")
    shared = Lockstep(engine, [(prompt, 1)], stop.is_set)
    events = shared.generate(0, prompt, SamplingParams(max_tokens=50, temperature=1.0, seed=2))
    next(events)
    stop.set()
    with pytest.raises(Stopped):
        list(events)


def _context(store: Store, serving: str = "step-loop") -> AppContext:
    """The step loop by default (chunks share one engine batch through Lockstep); the fake
    engine also batches continuously, which ``serving="batching"`` selects."""
    engine = ChatFakeEngine()
    return AppContext(store, engine, Metrics(), backend_for(engine, serving), None, engine.name)


def _line(i: int, **body: Any) -> InputLine:
    base = {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 4}
    return InputLine(i + 1, f"r{i}", ENDPOINTS[0], {**base, **body})


def test_run_lines_answers_each_line_once_and_batches_them(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    context = _context(store)
    lines = [_line(i) for i in range(7)] + [_line(7, model="nope"), _line(8, n=2)]
    results: list[LineResult] = []
    assert run_lines(context, local_key(), lines, results.append, chunk_lines=4)
    assert sorted(r.line for r in results) == [line.line for line in lines]
    assert [r.line for r in results if not r.ok] == [8]
    engine = context.engine
    assert isinstance(engine, ChatFakeEngine)
    assert [len(rows) for rows in engine.started] == [4, 3, 2]  # the unknown model never ran
    store.close()


def test_run_lines_on_the_continuous_batching_backend(tmp_path: Path) -> None:
    """The embedded engine's default backend: a chunk's lines go to the scheduler together,
    each answered once, with the same bodies as on the step loop (greedy, so equal)."""
    lines = [_line(i, temperature=0) for i in range(7)] + [_line(7, model="nope"), _line(8, n=2)]
    bodies: dict[str, list[Any]] = {}
    for serving in ("step-loop", "batching"):
        store = Store(f"sqlite:///{tmp_path / (serving + '.db')}")
        context = _context(store, serving)
        results: list[LineResult] = []
        assert run_lines(context, local_key(), lines, results.append, chunk_lines=4)
        assert sorted(r.line for r in results) == [line.line for line in lines]
        assert [r.line for r in results if not r.ok] == [8]
        bodies[serving] = sorted(
            (r.line, [c["message"] for c in json.loads(r.text)["response"]["body"]["choices"]])
            for r in results
            if r.ok and r.line <= 7  # the greedy lines (line 9 samples n=2)
        )
        if serving == "batching":
            engine = context.engine
            assert isinstance(engine, ChatFakeEngine)
            assert engine.started == []  # serving rows only: never a private-style batch
            assert engine.serving_started
        close = getattr(context.backend, "close", None)
        if close is not None:
            close()
        store.close()
    assert bodies["batching"] == bodies["step-loop"]


def _stored_batch(store: Store, tenant: str, key_id: str, n: int) -> str:
    f = store.create_file(tenant, "in.jsonl", "batch", b"{}\n" * n)
    batch = store.create_batch(
        tenant, key_id, endpoint=ENDPOINTS[0], input_file_id=f.id, completion_window="24h"
    )
    assert store.batches.start(batch.id, n)
    return batch.id


def _exactly_once(store: Store) -> None:
    tenant, _ = store.create_tenant("t", 8.0, 1e-6)
    key, _ = store.create_key(tenant.id, "serving")
    batch_id = _stored_batch(store, tenant.id, key.id, 6)
    recorded: list[bool] = []

    def answer_all() -> None:
        for i in range(1, 7):
            result = output_line(InputLine(i, f"c{i}", ENDPOINTS[0], {}), Answer(200, {}))
            recorded.append(store.batches.record(batch_id, result))

    threads = [threading.Thread(target=answer_all) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert recorded.count(True) == 6 and recorded.count(False) == 12
    assert store.batches.done_lines(batch_id) == set(range(1, 7))
    final = store.batches.finalize(batch_id)
    assert final is not None and final.status == "completed"
    assert (final.total, final.completed, final.failed) == (6, 6, 0)
    assert final.output_file_id and final.error_file_id is None
    content = store.file_content(tenant.id, final.output_file_id)
    assert content is not None
    assert [json.loads(x)["custom_id"] for x in content.splitlines()] == [
        f"c{i}" for i in range(1, 7)
    ]
    assert store.batches.finalize(batch_id) == final  # already ended: unchanged
    assert store.get_batch("another-tenant", batch_id) is None


def test_lines_are_recorded_exactly_once_sqlite(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'once.db'}")
    _exactly_once(store)
    store.close()


def test_lines_are_recorded_exactly_once_postgresql(pg_schema: str) -> None:
    store = Store(f"{PG_URL}?schema={pg_schema}")
    _exactly_once(store)
    store.close()


def test_upload_limits() -> None:
    with pytest.raises(APIError) as big:
        check_upload(b"x" * (DEFAULT_LIMITS.max_upload_bytes + 1))
    assert big.value.status == 413
    with pytest.raises(APIError) as nul:
        check_upload(b'{"a": 1}\x00')
    assert nul.value.status == 400
    small = Limits(max_upload_bytes=100, max_upload_line_bytes=10)  # `dpicl serve --max-upload-…`
    with pytest.raises(APIError) as configured:
        check_upload(b"x" * 101, small)
    assert configured.value.status == 413
    with pytest.raises(APIError) as long_line:
        check_upload(b'{"a": 1}\n' + b"y" * 11, small)
    assert long_line.value.code == "line_too_long" and "Line 2" in long_line.value.message
    lines, errors = parse_input(b"\n\n", "/v1/chat/completions")
    assert lines == [] and errors[0]["code"] == "empty_file"


def test_classify_resumes_where_it_stopped(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    context = _context(store)
    data = "\n".join(
        [json.dumps({"text": f"text {i}"}) for i in range(5)]
        + [
            json.dumps(
                {"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}]}}
            )
        ]
    ).encode()
    lines, errors = read_requests(data, MODEL, max_tokens=3)
    assert errors == [] and [line.custom_id for line in lines][-2:] == ["line-5", "x"]
    assert all(line.body["model"] == MODEL for line in lines)
    out = tmp_path / "out.jsonl"
    assert classify(context, local_key(), lines[:3], out, chunk_lines=2) == (3, 0)
    first = out.read_text().splitlines()
    with out.open("a") as f:
        f.write('{"id": "cut sho')  # an interrupted write
    assert classify(context, local_key(), lines, out, chunk_lines=2) == (3, 0)
    final = out.read_text().splitlines()
    assert final[:3] == first
    assert sorted(json.loads(x)["custom_id"] for x in final) == sorted(
        line.custom_id for line in lines
    )
    assert done_ids(out) == {line.custom_id for line in lines}
    bad, errors = read_requests(b'{"text": "a"}\n[1]\n', MODEL, 3)
    assert [e["line"] for e in errors] == [2]
    store.close()


def test_a_failed_write_is_retried_and_no_line_is_lost(tmp_path: Path) -> None:
    """The first commit of answered lines fails (storage error): the runner retries the batch
    later, answers the unwritten lines again, and every line ends recorded once."""
    from proxy.batches import BatchRunner
    from proxy.db import StorageError

    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    tenant, _ = store.create_tenant("t", 8.0, 1e-6)
    key, _ = store.create_key(tenant.id, "serving")
    rows = [{"custom_id": f"c{i}", "url": ENDPOINTS[0], "body": _line(i).body} for i in range(6)]
    f = store.create_file(tenant.id, "in.jsonl", "batch", "\n".join(map(json.dumps, rows)).encode())
    batch = store.create_batch(
        tenant.id, key.id, endpoint=ENDPOINTS[0], input_file_id=f.id, completion_window="24h"
    )
    real = store.batches.record_many
    calls = [0]

    def flaky(batch_id: str, results: list[LineResult]) -> int:
        calls[0] += 1
        if calls[0] == 1:
            raise StorageError("disk I/O error")
        return real(batch_id, results)

    store.batches.record_many = flaky  # type: ignore[method-assign]  # a test double
    runner = BatchRunner(store, chunk_lines=4)
    runner.start(_context(store))
    runner.submit(batch.id)
    deadline = time.monotonic() + 60  # a liveness bound, not a timing assertion
    while (now := store.get_batch(tenant.id, batch.id)) is not None and now.status != "completed":
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    runner.stop()
    assert now is not None and (now.total, now.completed, now.failed) == (6, 6, 0)
    assert now.output_file_id is not None
    content = store.file_content(tenant.id, now.output_file_id) or b""
    assert sorted(json.loads(x)["custom_id"] for x in content.splitlines()) == [
        f"c{i}" for i in range(6)
    ]
    store.close()


def test_classify_command_refuses_bad_input_and_unknown_keys(tmp_path: Path) -> None:
    """Both refused before any engine is loaded: exit 2, the line number, never the content."""
    from devtools.server import dpicl

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"secret": "PRIVATE-42"}\n')
    out = tmp_path / "out.jsonl"
    db = f"sqlite:///{tmp_path / 'c.db'}"
    r = dpicl("classify", "--data", str(bad), "--model", "m", "--out", str(out), "--db", db,
              check=False)  # fmt: skip
    assert r.returncode == 2 and "Line 2" in r.stderr and "PRIVATE-42" not in r.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine"}\n')
    r = dpicl("classify", "--data", str(good), "--model", "m", "--out", str(out), "--db", db,
              "--key", "sk-nope", check=False)  # fmt: skip
    assert r.returncode == 2 and "unknown API key" in r.stderr
    assert not out.exists()


def _runner_batch(store: Store, n: int) -> tuple[str, str]:
    tenant, _ = store.create_tenant(f"t{n}", 8.0, 1e-6)
    key, _ = store.create_key(tenant.id, "serving")
    rows = [{"custom_id": f"c{i}", "url": ENDPOINTS[0], "body": _line(i).body} for i in range(n)]
    f = store.create_file(tenant.id, "in.jsonl", "batch", "\n".join(map(json.dumps, rows)).encode())
    batch = store.create_batch(
        tenant.id, key.id, endpoint=ENDPOINTS[0], input_file_id=f.id, completion_window="24h"
    )
    return tenant.id, batch.id


def _settle(store: Store, tenant_id: str, batch_id: str) -> Any:
    deadline = time.monotonic() + 60  # a liveness bound, not a timing assertion
    while (now := store.get_batch(tenant_id, batch_id)) is not None and now.status not in (
        "completed", "cancelled", "expired", "failed"
    ):  # fmt: skip
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    return now


def test_expired_and_early_cancelled_batches(tmp_path: Path) -> None:
    """A batch past its window ends ``expired``, every unanswered line in the error file with
    ``batch_expired``; a batch cancelled before it ran ends ``cancelled`` with no files."""
    from proxy.batches import BatchRunner

    store = Store(f"sqlite:///{tmp_path / 'e.db'}")
    old_tenant, old = _runner_batch(store, 3)
    with store.db.transaction(write=True) as tx:
        tx.execute("UPDATE batches SET expires_at = 0 WHERE id = ?", (old,))
    early_tenant, early = _runner_batch(store, 4)
    store.cancel_batch(early_tenant, early)
    runner = BatchRunner(store)
    runner.start(_context(store))
    runner.resume()
    expired, cancelled = _settle(store, old_tenant, old), _settle(store, early_tenant, early)
    runner.stop()
    assert expired.status == "expired" and expired.expired_at and expired.failed == 3
    content = store.file_content(old_tenant, expired.error_file_id) or b""
    errors = [json.loads(x) for x in content.splitlines()]
    assert [e["error"]["code"] for e in errors] == ["batch_expired"] * 3
    assert all(e["response"] is None for e in errors) and expired.output_file_id is None
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    assert (cancelled.completed, cancelled.failed, cancelled.output_file_id) == (0, 0, None)
    store.close()


def test_a_line_failing_mid_generation_frees_its_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line whose answer fails after its first token (a bug, say) releases its rows at once:
    the chunk's other lines finish, and it gets the online route's 500."""
    from proxy.responses import Reply

    real = Reply.json

    def failing(self: Reply, events: Any) -> dict[str, Any]:
        if self.n == 3:
            next(events)
            raise RuntimeError("boom")
        return real(self, events)

    monkeypatch.setattr(Reply, "json", failing)
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    lines = [_line(0, max_tokens=8), _line(1, n=3), _line(2, max_tokens=8)]
    results: list[LineResult] = []
    run_lines(_context(store), local_key(), lines, results.append, chunk_lines=3)
    status = {r.line: json.loads(r.text)["response"]["status_code"] for r in results}
    assert status == {1: 200, 2: 500, 3: 200}
    store.close()
