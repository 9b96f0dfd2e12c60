"""Chat and completions through the continuously batching backend, in process (fake engine):
the same response bodies and streams as the step loop, and a client that disconnects from a
non-streamed request aborts it (counted in decode steps)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from proxy.app import create_app
from proxy.backends import backend_for
from proxy.batching import BatchingBackend
from proxy.metrics import Metrics
from proxy.responses import CHAT, Reply, until_disconnect
from proxy.serving import SamplingParams
from proxy.store import Store
from tests.fakes import VOCAB, FakeEngine


class _Engine(FakeEngine):
    name = "fake-model"
    eos_token_ids = frozenset({VOCAB + 1})  # never sampled: requests run to max_tokens

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize("".join(m["content"] for m in messages))


BODIES: list[tuple[str, dict[str, Any]]] = [
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0},
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "tell me"}],
            "max_tokens": 6,
            "n": 2,
            "seed": 3,
            "temperature": 0.9,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "stream"}],
            "max_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "seed": 1,
        },
    ),
    (
        "/v1/completions",
        {"prompt": "once upon", "max_tokens": 9, "stop": ["q"], "logprobs": 2, "seed": 4},
    ),
    ("/v1/completions", {"prompt": "abc", "max_tokens": 5, "stream": True, "n": 2, "seed": 9}),
]


def _scrub(text: str) -> str:
    """A body with its random id and clock removed (they differ between any two calls)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: {") or line.startswith("{"):
            prefix = "data: " if line.startswith("data: ") else ""
            obj = json.loads(line[len(prefix) :])
            obj.pop("id", None)
            obj.pop("created", None)
            line = prefix + json.dumps(obj, sort_keys=True)
        out.append(line)
    return "\n".join(out)


async def _answers(app: Any, key: str) -> list[str]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        h = {"Authorization": f"Bearer {key}"}
        calls = [c.post(path, headers=h, json={"model": "fake-model", **b}) for path, b in BODIES]
        responses = await asyncio.gather(*calls)  # concurrent: batched together
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [_scrub(r.text) for r in responses]


def test_batched_responses_equal_the_step_loops(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'a.db'}")
    _, key = store.create_tenant("t", 8.0, 1e-6)
    engine = _Engine()
    batching = create_app(store, engine, run_jobs=False)
    assert isinstance(batching.state.serving, BatchingBackend)
    step_loop = create_app(
        store, engine, run_jobs=False, serving_backend=backend_for(engine, "step-loop")
    )
    got = asyncio.run(_answers(batching, key))
    want = asyncio.run(_answers(step_loop, key))
    assert got == want
    assert engine.serving_started  # the batching app used serving batches
    registry = batching.state.context.metrics.registry
    assert registry.get_sample_value("dpicl_serving_forward_passes_total", {"kind": "decode"})
    batching.state.serving.close()
    store.close()


class _Disconnecting:
    """Just enough of a Starlette request for :func:`until_disconnect`: ``receive`` answers
    ``http.disconnect`` once ``gone`` is set."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_a_non_streamed_request_whose_client_disconnects_is_aborted_within_one_step() -> None:
    engine = _Engine()
    backend = BatchingBackend(engine, start_thread=False)
    steps: list[list[int]] = []
    backend.on_step = lambda n, rids: steps.append(rids)
    reply = Reply(CHAT, "chatcmpl-", "fake-model", 3, 1, Metrics(), engine.decode)

    async def scenario() -> Any:
        request = _Disconnecting()
        events = backend.agenerate(engine.tokenize("abc"), SamplingParams(max_tokens=100))
        other = backend.agenerate(engine.tokenize("xyz"), SamplingParams(max_tokens=100))
        answer = asyncio.ensure_future(until_disconnect(request, reply.ajson(events)))  # type: ignore[arg-type]  # a stand-in request
        for _ in range(3):
            backend.step()
            await asyncio.sleep(0)
        assert steps[-1] == [1, 2]
        request.gone.set()  # the client hangs up
        response = await answer
        seen = len(steps)
        backend.step()
        assert steps[seen:] == [[2]]  # its row is gone at the very next decode step
        await other.aclose()
        return response

    response = asyncio.run(scenario())
    assert response.status_code == 499 and backend.stats["aborted"] == 1


def test_a_non_streamed_step_loop_request_whose_client_disconnects_is_aborted() -> None:
    """The step loop (read in the thread pool): once the client is gone, the engine step in
    progress finishes, no further one starts, and the batch is closed (its rows freed)."""
    import threading

    from dp_decoding.engines.fake import FakeBatch
    from proxy.responses import json_until_disconnect
    from proxy.serving import StepLoopBackend

    stop = threading.Event()
    appends: list[int] = []

    class Held(FakeBatch):
        def append(self, tokens: Any) -> None:
            super().append(tokens)
            appends.append(1)
            if len(appends) == 3:  # the third decode step lasts until the client is gone
                assert stop.wait(timeout=60)

    class Engine(_Engine):
        def start(self, prompts: Any, *, width: int | None = None) -> FakeBatch:
            self.batches.append(Held(self, prompts))
            return self.batches[-1]

    engine = Engine()
    reply = Reply(CHAT, "chatcmpl-", "fake-model", 3, 1, Metrics(), engine.decode)
    events = StepLoopBackend(engine).generate(
        engine.tokenize("abc"), SamplingParams(max_tokens=100)
    )

    async def scenario() -> Any:
        request = _Disconnecting()
        answer = asyncio.ensure_future(
            json_until_disconnect(request, reply, events, stop)  # type: ignore[arg-type]  # a stand-in request
        )
        while len(appends) < 3:  # a liveness wait for the held step, not a timing bound
            await asyncio.sleep(0.01)
        request.gone.set()  # the client hangs up: sets ``stop``, which releases the step
        return await answer

    response = asyncio.run(scenario())
    assert response.status_code == 499
    batch = engine.batches[-1]
    assert isinstance(batch, Held)
    for _ in range(6000):  # the worker thread may still be leaving: a liveness bound (60 s)
        if batch.closed:
            break
        time.sleep(0.01)
    assert batch.closed and len(appends) == 3
