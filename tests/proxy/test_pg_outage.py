"""PostgreSQL stopped and restarted under load, without restarting ``dpicl serve``.

A private PostgreSQL instance (``initdb`` into a temporary directory, its own port; the shared
server on 5432 is never touched) backs a real server with the fake chat engine. Client threads
keep sending chat, budget polls and admissions while the database is stopped and started again.
Checked: while it is down every answer is a 503 in OpenAI's error shape (never a 500, never a
dropped connection); once it is back the first request and all after it succeed, on the same
server process (each thread's stale connection is replaced at the start of its next
transaction); admissions refused during the outage charged nothing; ``dpicl ledger verify``
passes. Skipped, with the reason, where the PostgreSQL server binaries or a postgres user are
missing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.server import Server, create_tenant, dpicl, free_port
from tests.proxy.fake_server import MODEL
from tests.proxy.test_faults import charges, client, post_job, storage_refusal, until, upload

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class PrivatePostgres:
    """``initdb`` + ``pg_ctl`` on a temporary directory and a free port (trust auth)."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        found = shutil.which("pg_ctl")
        pg_ctl = bins[-1] if bins else found
        if pg_ctl is None:
            pytest.skip("no PostgreSQL server binaries (pg_ctl, initdb) on this machine")
        self.bin = Path(pg_ctl).parent
        self.root = os.geteuid() == 0
        if self.root and shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot run initdb as another user")
        self.dir = Path(tempfile.mkdtemp(prefix="dpicl-pg-"))
        self.port = free_port()
        if self.root:
            r = subprocess.run(["chown", "postgres:postgres", str(self.dir)], capture_output=True)
            if r.returncode != 0:
                pytest.skip("running as root but there is no postgres user to run initdb as")
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.root:
            command = ["runuser", "-u", "postgres", "--", *command]
        r = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{tool} failed: {r.stderr[-2000:]}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        data = str(self.dir / "data")
        self._run("pg_ctl", "-D", data, "-o", options, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.remove()


def test_postgres_outage_answers_503_and_recovers_without_restart(
    private_pg: PrivatePostgres, tmp_path: Path
) -> None:
    db = private_pg.url
    key = create_tenant(db, "t", 8.0)
    srv = Server(
        db=db, log_path=tmp_path / "server.log", engine="fake-chat", entry="tests.proxy.fake_server"
    ).start()
    seen: Counter[int] = Counter()
    bad: list[str] = []
    stop = threading.Event()

    def load() -> None:  # chat and budget polls, as fast as the server answers
        with client(srv, key, timeout=30) as h:
            while not stop.is_set():
                try:
                    for r in (
                        h.post("/v1/chat/completions", json=CHAT),
                        h.get("/v1/private/budget"),
                    ):
                        seen[r.status_code] += 1
                        if r.status_code == 503:
                            storage_refusal(r)
                        elif r.status_code != 200:
                            bad.append(f"{r.status_code} {r.text[:200]}")
                except (httpx.HTTPError, AssertionError, ValueError) as exc:
                    bad.append(repr(exc))  # a dropped connection or a malformed 503

    threads = [threading.Thread(target=load) for _ in range(3)]
    admitted: list[str] = []
    try:
        with client(srv, key) as h:
            dataset = upload(h)
            for t in threads:
                t.start()
            first = post_job(h, dataset, "before")
            assert first.status_code == 200, first.text
            admitted.append(first.json()["id"])
            until(lambda: seen[200] >= 6, "load before the outage")

            private_pg.stop()
            storage_refusal(h.post("/v1/chat/completions", json=CHAT))
            storage_refusal(h.get("/v1/private/budget"))
            storage_refusal(post_job(h, dataset, "during"))  # nothing charged
            until(lambda: seen[503] >= 6, "the load's requests refused during the outage")

            private_pg.start()
            # the same server: the first request after the restart succeeds, and so do all
            for i in range(12):
                r = (
                    h.post("/v1/chat/completions", json=CHAT)
                    if i % 2
                    else h.get("/v1/private/budget")
                )
                assert r.status_code == 200, r.text
            during = post_job(h, dataset, "during")  # the refused name was never taken
            assert during.status_code == 200, during.text
            admitted.append(during.json()["id"])
            after_restart = seen[200]
            until(lambda: seen[200] >= after_restart + 6, "the load after the outage")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        srv.stop()
    assert not bad, bad  # only 200 and 503 ever, and no dropped connection (it would raise)
    assert srv.proc is not None and srv.proc.returncode is not None
    assert charges(db) == admitted
    dpicl("ledger", "verify", "--db", db)


def test_a_connection_left_from_before_a_restart_is_replaced(private_pg: PrivatePostgres) -> None:
    """A thread whose connection died with the server (it made no request during the outage)
    gets a fresh one at the start of its next transaction instead of a 503."""
    from proxy.db import Database

    d = Database(private_pg.url)
    try:
        with d.transaction() as tx:
            assert tx.execute("SELECT 1 AS one").rows == [{"one": 1}]
        private_pg.stop()
        private_pg.start()
        with d.transaction() as tx:
            assert tx.execute("SELECT 2 AS two").rows == [{"two": 2}]
        with d.transaction(write=True) as tx:
            assert tx.execute("SELECT 3 AS three").rows == [{"three": 3}]
    finally:
        d.close()
