"""Fault injection against a real ``dpicl serve`` (the fake chat engine of
tests/proxy/fake_server.py; real SQLite files and real PostgreSQL schemas).

The server is SIGKILLed during an admission transaction (a job, a private-prediction query),
during a running demonstration job and during a stream, on SQLite and on PostgreSQL, and
restarted; SQLite runs out of disk space under a running server (a quota on the process's file
size, always; a full tmpfs where ``mount`` works). After each fault the invariants are checked from the stored ledger, never from timing:

* every admission the client saw succeed has exactly one charge; one whose answer never
  arrived has none or one, never two; nothing else is charged;
* a job found running at restart is marked failed, keeps its charge and is never run again
  (so never re-run with fresh noise);
* storage failure is refusal: 503 in OpenAI's error shape, no job, no charge, and service
  comes back when the storage does, without restarting the server;
* ``dpicl ledger verify`` passes.

Each point is reached deterministically with the fake server's hold files (a hold creates
``FILE.reached`` when reached; the test polls for it with a liveness bound only).
PostgreSQL stopped and restarted under load is in tests/proxy/test_pg_outage.py.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.server import Server, create_tenant, dpicl
from proxy.db import Database
from proxy.storage.models import INTERRUPTED_ERROR
from tests.proxy.conftest import PG_URL
from tests.proxy.fake_server import MODEL

JOB = {"epsilon": 1.0, "shots": 1, "max_tokens": 4, "prompts": 4, "labels": ["a", "b"]}
ROWS = "\n".join(
    f'{{"text": "item {i} about markets", "label": "{"ab"[i % 2]}"}}' for i in range(24)
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh ledger: a SQLite file, or a PostgreSQL schema of its own (skipped if none)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dpicl.db'}"
    schema = request.getfixturevalue("pg_schema")
    return f"{PG_URL}?schema={schema}"


def serve(tmp: Path, db: str, name: str, **env: str) -> Server:
    """A started fake-engine server; interrupted jobs are failed at start-up on any backend."""
    return Server(
        db=db,
        log_path=tmp / f"{name}.log",
        engine="fake-chat",
        entry="tests.proxy.fake_server",
        extra_args=("--fail-stale-jobs-after", "0"),
        env=env,
    ).start()


def sigkill(srv: Server) -> None:
    """SIGKILL the server (no shutdown code runs) and reap it."""
    assert srv.proc is not None
    srv.proc.kill()
    srv.proc.wait()
    srv.stop()


def client(srv: Server, key: str, timeout: float = 60) -> httpx.Client:
    return httpx.Client(
        base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
    )


def until(check: Any, what: str, timeout: float = 60) -> None:
    """Poll ``check()`` until true (a liveness bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.05)


def upload(h: httpx.Client) -> str:
    r = h.post(
        "/v1/private/datasets", data={"name": "d"}, files={"file": ("d.jsonl", ROWS.encode())}
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def post_job(h: httpx.Client, dataset: str, name: str) -> httpx.Response:
    return h.post("/v1/private/demonstrations", json={"dataset": dataset, "name": name, **JOB})


def job_status(h: httpx.Client, job_id: str) -> dict[str, Any]:
    r = h.get(f"/v1/private/demonstrations/{job_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def charges(db: str) -> list[str]:
    """The job ids of every ledger row, in charge order."""
    d = Database(db)
    try:
        with d.transaction() as tx:
            return [
                str(r["job_id"]) for r in tx.execute("SELECT job_id FROM ledger ORDER BY id").rows
            ]
    finally:
        d.close()


def jobs(db: str) -> dict[str, str]:
    """Every stored job: id -> status."""
    d = Database(db)
    try:
        with d.transaction() as tx:
            return {
                str(r["id"]): str(r["status"])
                for r in tx.execute("SELECT id, status FROM jobs").rows
            }
    finally:
        d.close()


def verified(db: str) -> None:
    """``dpicl ledger verify`` exits 0 (dpicl raises with its stderr otherwise)."""
    dpicl("ledger", "verify", "--db", db)


def storage_refusal(r: httpx.Response) -> None:
    """A 503 in OpenAI's error shape, naming the storage."""
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "storage_unavailable"


# -- SIGKILL ----------------------------------------------------------------------------------


def test_sigkill_during_admission_charges_nothing_twice(db_url: str, tmp_path: Path) -> None:
    key = create_tenant(db_url, "t", 8.0)
    hold = tmp_path / "admission.hold"
    srv = serve(tmp_path, db_url, "first", DPICL_FAKE_ADMISSION_HOLD_FILE=str(hold))
    lost: list[BaseException] = []
    try:
        with client(srv, key) as h:
            dataset = upload(h)
            done = post_job(h, dataset, "before")  # admitted and answered: charged once
            assert done.status_code == 200, done.text
            hold.touch()

            def in_flight() -> None:
                try:
                    with client(srv, key) as h2:
                        post_job(h2, dataset, "killed")
                except httpx.HTTPError as exc:  # the answer never arrives
                    lost.append(exc)

            t = threading.Thread(target=in_flight)
            t.start()
            until(Path(str(hold) + ".reached").exists, "the admission transaction")
    finally:
        sigkill(srv)
    t.join(timeout=60)
    assert lost, "the killed admission must not have been answered"
    hold.unlink()

    assert charges(db_url) == [done.json()["id"]]  # the uncommitted charge is gone
    assert set(jobs(db_url)) == {done.json()["id"]}
    verified(db_url)
    again = serve(tmp_path, db_url, "again")
    try:
        with client(again, key) as h:
            retry = post_job(h, dataset, "killed")  # the name was never taken
            assert retry.status_code == 200, retry.text
    finally:
        again.stop()
    assert charges(db_url) == [done.json()["id"], retry.json()["id"]]
    verified(db_url)


def test_sigkill_during_a_predictor_query_charges_it_at_most_once(
    db_url: str, tmp_path: Path
) -> None:
    """A private-prediction query is an admission too: killed inside its transaction it is not
    charged; retried with its ``Idempotency-Key`` after the restart it is charged once."""
    key = create_tenant(db_url, "t", 8.0)
    hold = tmp_path / "query.hold"
    srv = serve(tmp_path, db_url, "first", DPICL_FAKE_ADMISSION_HOLD_FILE=str(hold))
    ask = {"model": "pred", "messages": [{"role": "user", "content": "item 3 about markets"}]}
    lost: list[BaseException] = []
    try:
        with client(srv, key) as h:
            dataset = upload(h)
            r = h.post(
                "/v1/private/predictors",
                json={
                    "dataset": dataset,
                    "name": "pred",
                    "labels": ["a", "b"],
                    "prompts": 4,
                    "examples_per_prompt": 2,
                    "sampling_rate": 0.4,
                    "epsilon": 1.0,
                },
            )
            assert r.status_code == 200, r.text
            hold.touch()

            def in_flight() -> None:
                try:
                    with client(srv, key) as h2:
                        h2.post("/v1/chat/completions", json=ask, headers={"Idempotency-Key": "q"})
                except httpx.HTTPError as exc:
                    lost.append(exc)

            t = threading.Thread(target=in_flight)
            t.start()
            until(Path(str(hold) + ".reached").exists, "the query's admission transaction")
    finally:
        sigkill(srv)
    t.join(timeout=60)
    assert lost, "the killed query must not have been answered"
    hold.unlink()
    assert charges(db_url) == []
    again = serve(tmp_path, db_url, "again")
    try:
        with client(again, key) as h:
            answers = [
                h.post("/v1/chat/completions", json=ask, headers={"Idempotency-Key": "q"})
                for _ in range(2)
            ]
    finally:
        again.stop()
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    assert answers[0].json()["choices"] == answers[1].json()["choices"]
    assert len(charges(db_url)) == 1  # the retry after the restart, once
    verified(db_url)


def test_sigkill_during_a_running_job_never_reruns_it(db_url: str, tmp_path: Path) -> None:
    key = create_tenant(db_url, "t", 8.0)
    hold = tmp_path / "engine.hold"
    hold.touch()  # the job's first private engine batch waits
    srv = serve(tmp_path, db_url, "first", DPICL_FAKE_HOLD_FILE=str(hold))
    try:
        with client(srv, key) as h:
            dataset = upload(h)
            r = post_job(h, dataset, "running")
            assert r.status_code == 200, r.text
            job_id = r.json()["id"]
            until(Path(str(hold) + ".reached").exists, "the job's first engine call")
            assert job_status(h, job_id)["status"] == "running"
    finally:
        sigkill(srv)
    hold.unlink()

    again = serve(tmp_path, db_url, "again")
    try:
        with client(again, key) as h:
            killed = job_status(h, job_id)
            assert killed["status"] == "failed" and killed["error"] == INTERRUPTED_ERROR
            # a job admitted after the restart runs to the end; the runner is FIFO, so had
            # the killed job been queued again it would have run (with fresh noise) first
            later = post_job(h, dataset, "later")
            assert later.status_code == 200, later.text
            until(
                lambda: job_status(h, later.json()["id"])["status"] == "succeeded",
                "the later job",
            )
            killed = job_status(h, job_id)
            assert killed["status"] == "failed" and not killed.get("demonstrations")
    finally:
        again.stop()
    assert "marked 1 interrupted job(s) failed" in again.log_tail(20_000)
    assert charges(db_url) == [job_id, later.json()["id"]]  # kept its charge, charged once
    verified(db_url)


def test_sigkill_during_a_stream(db_url: str, tmp_path: Path) -> None:
    key = create_tenant(db_url, "t", 8.0)
    hold = tmp_path / "step.hold"
    srv = serve(tmp_path, db_url, "first", DPICL_FAKE_STEP_HOLD_FILE=str(hold))
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 32,
        "stream": True,
        # a fixed seed whose first token is not end-of-text, so a decode step follows it:
        # unseeded, the fake model ends at once in a few percent of runs and the hold is
        # never reached
        "seed": 0,
    }
    chunks: list[str] = []
    try:
        with client(srv, key) as h:
            dataset = upload(h)
            charged = post_job(h, dataset, "charged")
            assert charged.status_code == 200, charged.text
            until(
                lambda: job_status(h, charged.json()["id"])["status"] == "succeeded",
                "the job",
            )
            hold.touch()  # from now on every serving decode step waits
            with (
                pytest.raises(httpx.HTTPError),
                h.stream("POST", "/v1/chat/completions", json=body) as s,
            ):
                assert s.status_code == 200
                for line in s.iter_lines():
                    chunks.append(line)
                    if '"content"' in line:
                        until(Path(str(hold) + ".reached").exists, "the next decode step")
                        sigkill(srv)  # mid-stream: the next decode step is held
    finally:
        sigkill(srv)
    hold.unlink()
    assert chunks and not any("[DONE]" in c for c in chunks)

    again = serve(tmp_path, db_url, "again")
    try:
        with client(again, key) as h:
            r = h.post("/v1/chat/completions", json={**body, "stream": False})
            assert r.status_code == 200, r.text
    finally:
        again.stop()
    assert charges(db_url) == [charged.json()["id"]]  # serving charges nothing
    verified(db_url)


# -- SQLite on a full disk ----------------------------------------------------------------------


@contextlib.contextmanager
def _quota(srv: Server, db_path: Path) -> Iterator[None]:
    """Lower the server's RLIMIT_FSIZE to the write-ahead log's present size, so the next
    transaction that must grow it fails (EFBIG; Python ignores SIGXFSZ), as on a full disk.
    Needs no privilege (one's own process, soft limit only)."""
    assert srv.proc is not None
    pid = srv.proc.pid
    wal = Path(str(db_path) + "-wal")
    limit = max(wal.stat().st_size, 1)
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))


@contextlib.contextmanager
def _tmpfs(directory: Path) -> Iterator[None]:
    """A 4 MiB tmpfs at ``directory`` (skip when mounting is not allowed here)."""
    directory.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@contextlib.contextmanager
def _filled(directory: Path) -> Iterator[None]:
    """Fill the file system of ``directory`` to the last byte with one file (removed after)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (65536, 512, 1):
            with contextlib.suppress(OSError):
                while fh.write(b"\0" * size):
                    pass
    try:
        yield
    finally:
        filler.unlink()


@pytest.mark.parametrize("how", ["quota", "tmpfs"])
def test_sqlite_full_disk_refuses_with_503_and_recovers(how: str, tmp_path: Path) -> None:
    where = tmp_path / "disk"
    with contextlib.ExitStack() as stack:
        if how == "tmpfs":
            stack.enter_context(_tmpfs(where))
        else:
            where.mkdir()
        db_path = where / "dpicl.db"
        db = f"sqlite:///{db_path}"
        key = create_tenant(db, "t", 8.0)
        srv = serve(tmp_path, db, "server")
        stack.callback(srv.stop)
        with client(srv, key) as h:
            dataset = upload(h)
            with _quota(srv, db_path) if how == "quota" else _filled(where):
                refused = post_job(h, dataset, "full")
                storage_refusal(refused)
                budget = h.get("/v1/private/budget")  # reads still answer
                assert budget.status_code == 200, budget.text
                assert budget.json()["charges_total"] == 0
                chat = h.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                )
                assert chat.status_code == 200, chat.text
            assert charges(db) == [] and jobs(db) == {}  # nothing generated, nothing charged
            # space again: the same server admits (no restart), and the job runs
            ok = post_job(h, dataset, "full")
            assert ok.status_code == 200, ok.text
            until(lambda: job_status(h, ok.json()["id"])["status"] == "succeeded", "the job")
        srv.stop()
        assert charges(db) == [ok.json()["id"]]
        verified(db)
