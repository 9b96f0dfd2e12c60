"""Continuous batching end to end: a real ``dpicl serve`` on the embedded engine (SmolLM2),
real HTTP clients. 256 concurrent streaming clients all complete; clients that disconnect, from
a stream or from a non-streamed request, have their requests aborted (the server's own
``dpicl_serving_aborted_requests_total``), and the server answers normally afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devtools.server import Server, create_tenant

pytestmark = pytest.mark.model

BASE = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("batching")
    db = f"sqlite:///{tmp / 'dpicl.db'}"
    key = create_tenant(db, "alpha", 10.0)
    srv = Server(db=db, log_path=tmp / "server.log").start()
    try:
        yield {"srv": srv, "key": key}
    finally:
        srv.stop()


def _metric(srv: Server, name: str) -> float:
    for line in srv.metrics().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _stream(c: httpx.AsyncClient, i: int) -> tuple[int, int, bool]:
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": f"Say a word about the number {i}."}],
        "max_tokens": 4,
        "stream": True,
    }
    chunks, done = 0, False
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks += 1
                done = done or line == "data: [DONE]"
    return r.status_code, chunks, done


def test_256_concurrent_streams_all_complete(server: dict[str, Any]) -> None:
    srv: Server = server["srv"]

    async def run() -> list[tuple[int, int, bool] | BaseException]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {server['key']}"}
        async with httpx.AsyncClient(
            base_url=srv.url, headers=headers, limits=limits, timeout=600
        ) as c:
            return await asyncio.gather(
                *(_stream(c, i) for i in range(256)), return_exceptions=True
            )

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, repr(errors[:3])
    assert all(status == 200 and done and chunks >= 2 for status, chunks, done in results)  # type: ignore[misc]
    assert _metric(srv, "dpicl_serving_batch_rows_max") > 1  # they shared forward passes


def test_disconnected_clients_are_aborted_and_the_server_answers_after(
    server: dict[str, Any],
) -> None:
    srv: Server = server["srv"]
    headers = {"Authorization": f"Bearer {server['key']}"}
    before = _metric(srv, "dpicl_serving_aborted_requests_total")
    # a stream left after its first two chunks
    long_chat = {
        "model": BASE,
        "messages": [{"role": "user", "content": "Count from 1 to 2000, separated by commas."}],
        "max_tokens": 4000,
    }
    stream = {**long_chat, "stream": True}
    with (
        httpx.Client(base_url=srv.url, headers=headers, timeout=120) as c,
        c.stream("POST", "/v1/chat/completions", json=stream) as r,
    ):
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]  # role chunk, blank, first token, blank
        assert got[0].startswith("data: ")
    # a non-streamed request left before it finishes: 8 sampled raw continuations of up to
    # 4,000 tokens each, abandoned by the client after 3 s
    long_text = {"model": BASE, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 4000, "n": 8}
    with (
        pytest.raises(httpx.TimeoutException),
        httpx.Client(base_url=srv.url, headers=headers, timeout=3) as c,
    ):
        c.post("/v1/completions", json=long_text)
    for _ in range(600):  # wait for the server to notice (counted, not timed)
        if _metric(srv, "dpicl_serving_aborted_requests_total") >= before + 2:
            break
        time.sleep(0.2)
    assert _metric(srv, "dpicl_serving_aborted_requests_total") >= before + 2
    with httpx.Client(base_url=srv.url, headers=headers, timeout=120) as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
