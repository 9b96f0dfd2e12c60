"""Continuous batching (proxy/batching.py) on the deterministic fake engine: the same events as
the step loop, requests joining and leaving between steps, aborts within one step, admission
limits, the phase separation from private batches and the turns with private engine calls.

The scheduler is driven by hand (``start_thread=False``, ``backend.step()``), so every claim is
counted in decode steps, never in seconds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import pytest

from dp_decoding.engines.fake import VOCAB, FakeEngine
from proxy.backends import backend_for
from proxy.batching import BatchingBackend
from proxy.phases import PhaseLock
from proxy.serving import SamplingParams, TokenEvent, generate

PARAMS = [
    SamplingParams(max_tokens=7, temperature=0.0),
    SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=11),
    SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=5, top_logprobs=3),
    SamplingParams(max_tokens=12, temperature=0.0, stop=["ab"]),
    SamplingParams(max_tokens=1, temperature=0.0, n=2),
]
PROMPTS = ["hello there", "a", "the quick brown fox", "zzzz", "abc\ndef"]


class _NoEos(FakeEngine):
    """End of text is never sampled: a request runs to its ``max_tokens`` (for counting)."""

    eos_token_ids = frozenset({VOCAB + 1})


def drain(
    backend: BatchingBackend, streams: Sequence[Iterator[TokenEvent]]
) -> list[list[TokenEvent]]:
    """Step the scheduler until every stream has finished; collect each stream's events."""
    out: list[list[TokenEvent]] = [[] for _ in streams]
    for _ in range(200):
        backend.step()
        if not backend._rows and not backend._pending:
            break
    for i, s in enumerate(streams):
        out[i] = list(s)
    return out


def test_batched_events_equal_the_step_loops() -> None:
    """Every request gets exactly the events it gets alone from the step loop (greedy and
    seeded sampling, n, stop, top logprobs), whether it joined first or three steps late."""
    engine = FakeEngine()
    prompts = [engine.tokenize(p) for p in PROMPTS]
    alone = [list(generate(engine, p, sp)) for p, sp in zip(prompts, PARAMS, strict=True)]
    backend = BatchingBackend(engine, start_thread=False)
    early = [backend.generate(p, sp) for p, sp in zip(prompts[:3], PARAMS[:3], strict=True)]
    for _ in range(3):
        backend.step()
    late = [backend.generate(p, sp) for p, sp in zip(prompts[3:], PARAMS[3:], strict=True)]
    assert drain(backend, early + late) == alone
    assert backend.stats["prefills"] == 2  # the three first together, the two late together


def test_rows_join_and_leave_between_steps() -> None:
    engine = _NoEos()
    backend = BatchingBackend(engine, start_thread=False)
    steps: list[list[int]] = []
    backend.on_step = lambda n, rids: steps.append(rids)
    a = backend.generate(engine.tokenize("aa"), SamplingParams(max_tokens=3, temperature=0.0))
    backend.step()
    b = backend.generate(engine.tokenize("bb"), SamplingParams(max_tokens=5, temperature=0.0, n=2))
    drain(backend, [a, b])
    # a: 3 tokens (2 decode steps after the prefill); b joins at step 2 with two rows
    assert steps[0] == [1]
    assert steps[1] == [1, 2, 2]
    assert all(rids == [2, 2] for rids in steps[2:])
    assert len(steps) == 1 + 4  # b's 5 tokens: its prefill plus 4 decode steps


def test_a_dropped_consumer_leaves_the_batch_within_one_step() -> None:
    engine = _NoEos()
    backend = BatchingBackend(engine, start_thread=False)
    steps: list[list[int]] = []
    backend.on_step = lambda n, rids: steps.append(rids)
    long = SamplingParams(max_tokens=50, temperature=0.0)
    a = backend.generate(engine.tokenize("aa"), long)
    b = backend.generate(engine.tokenize("bb"), long)
    backend.step()
    backend.step()
    next(a)
    a.close()  # the client went away
    seen = len(steps)
    backend.step()
    assert steps[seen:] == [[2]]  # the very next decode step holds b's row only
    assert backend.stats["aborted"] == 1
    b.close()
    backend.step()
    assert backend._batch is None and not backend._rows


def test_an_abandoned_iterator_aborts_when_collected() -> None:
    engine = _NoEos()
    backend = BatchingBackend(engine, start_thread=False)
    a = backend.generate(engine.tokenize("aa"), SamplingParams(max_tokens=50))
    backend.step()
    del a  # never read (a response that was never sent): garbage-collected at once
    backend.step()
    assert not backend._rows and backend.stats["aborted"] == 1


def test_a_request_aborted_before_admission_is_never_prefilled() -> None:
    engine = FakeEngine()
    backend = BatchingBackend(engine, start_thread=False)
    a = backend.generate(engine.tokenize("aa"), SamplingParams(max_tokens=5))
    a.close()
    backend.step()
    assert engine.serving_started == [] and backend._batch is None


def test_cancelled_async_reader_aborts_within_one_step() -> None:
    """The event-loop path: a streaming response cancelled by a disconnect (CancelledError in
    the read) aborts the request; the scheduler runs in its own thread here."""
    engine = _NoEos()
    backend = BatchingBackend(engine, start_thread=False)
    steps: list[list[int]] = []
    backend.on_step = lambda n, rids: steps.append(rids)
    long = SamplingParams(max_tokens=60, temperature=0.0)

    async def scenario() -> None:
        a = backend.agenerate(engine.tokenize("aa"), long)
        b = backend.agenerate(engine.tokenize("bb"), long)
        backend.step()
        assert (await anext(a)).index == 0 and (await anext(b)).index == 0

        async def read_all() -> None:
            async for _ in a:
                pass

        task = asyncio.ensure_future(read_all())
        await asyncio.sleep(0)  # the reader is now waiting for the next step
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen = len(steps)
        backend.step()
        assert steps[seen:] == [[2]]
        await b.aclose()

    asyncio.run(scenario())
    assert backend.stats["aborted"] == 1


def test_admission_respects_max_rows_in_fifo_order() -> None:
    engine = _NoEos()
    backend = BatchingBackend(engine, max_rows=4, start_thread=False)
    sp = SamplingParams(max_tokens=3, temperature=0.0, n=3)
    a = backend.generate(engine.tokenize("aa"), sp)
    b = backend.generate(engine.tokenize("bb"), sp)
    c = backend.generate(engine.tokenize("c"), SamplingParams(max_tokens=2, n=1))
    backend.step()
    assert len(backend._rows) == 3 and len(backend._pending) == 2  # b does not fit; c waits
    drain(backend, [a, b, c])
    assert backend.stats["max_rows"] == 4  # b (3 rows) and c (1 row) together, after a


def test_a_lone_request_over_the_limits_still_runs() -> None:
    engine = FakeEngine()
    backend = BatchingBackend(engine, max_rows=2, max_cells=4, prefill_tokens=4, start_thread=False)
    events = drain(
        backend,
        [backend.generate(engine.tokenize("long prompt"), SamplingParams(max_tokens=3, n=3))],
    )
    assert sum(1 for ev in events[0] if ev.finish_reason) == 3


def test_the_scheduler_thread_serves_concurrent_threads() -> None:
    engine = FakeEngine()
    backend = BatchingBackend(engine)
    prompts = [engine.tokenize(p) for p in PROMPTS]
    alone = [list(generate(engine, p, sp)) for p, sp in zip(prompts, PARAMS, strict=True)]
    got: list[list[TokenEvent]] = [[] for _ in PROMPTS]

    def client(i: int) -> None:
        got[i] = list(backend.generate(prompts[i], PARAMS[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    backend.close()
    assert got == alone


def test_backend_for_picks_batching_where_the_engine_supports_it() -> None:
    assert isinstance(backend_for(FakeEngine()), BatchingBackend)
    assert type(backend_for(FakeEngine(), "step-loop")).__name__ == "StepLoopBackend"
    with pytest.raises(ValueError):
        backend_for(FakeEngine(), "warp")


# -- phase separation and turns with private engine calls ------------------------------------
class _LockedFake(FakeEngine):
    """The fake engine with the embedded engine's locking: every engine call (prefill,
    decode) holds ``lock``; ``calls`` records them in order ("S" serving, "P" private) and
    ``waited`` how many serving calls started while each private call waited for the lock."""

    def __init__(self) -> None:
        super().__init__()
        self.lock: AbstractContextManager[Any] = threading.Lock()
        self.calls: list[str] = []
        self.waited: list[int] = []

    def use_lock(self, lock: AbstractContextManager[Any]) -> None:
        self.lock = lock

    def call(self, kind: str) -> None:
        before = self.calls.count("S")
        with self.lock:
            if kind == "P":
                self.waited.append(self.calls.count("S") - before)
            self.calls.append(kind)

    def _locked(self, batch: Any, kind: str) -> Any:
        append = batch.append

        def locked_append(tokens: Any) -> None:
            self.call(kind)
            append(tokens)

        batch.append = locked_append
        return batch

    def start(self, prompts: Any, *, width: int | None = None) -> Any:
        self.call("P")
        return self._locked(super().start(prompts, width=width), "P")

    def start_serving(self, prompts: Any) -> Any:
        self.call("S")
        return self._locked(super().start_serving(prompts), "S")


def test_private_calls_wait_for_at_most_one_serving_call_and_never_share_a_batch() -> None:
    """Serving runs flat out on its thread while a private step loop runs 40 engine calls:
    the engine's lock becomes a FIFO PhaseLock, so each private call waits for at most one
    serving call; private prompts never reach a serving batch, nor serving prompts a private
    one."""
    engine = _LockedFake()
    backend = BatchingBackend(engine)
    assert isinstance(engine.lock, PhaseLock)
    serving_prompt = engine.tokenize("serving text")
    private_prompt = engine.tokenize("PRIVATE")
    stop = threading.Event()

    def clients() -> None:
        while not stop.is_set():
            streams = [
                backend.generate(serving_prompt, SamplingParams(max_tokens=20)) for _ in range(4)
            ]
            for s in streams:
                list(s)

    load = threading.Thread(target=clients)
    load.start()
    while engine.calls.count("S") < 5:
        threading.Event().wait(0.001)
    batch = engine.start([private_prompt] * 2)
    for _ in range(39):
        batch.append([1, 1])
    stop.set()
    load.join(timeout=60)
    backend.close()
    assert len(engine.waited) == 40 and max(engine.waited) <= 1
    assert all(private_prompt not in rows for rows in engine.serving_started)
    assert all(serving_prompt not in rows for rows in engine.started)


def test_time_share_holds_serving_back_until_private_calls_catch_up() -> None:
    """The share, on a fake clock: while a job is active, serving may not hold the engine
    longer than the job's calls have since serving's last turn; with no job it runs freely."""
    now = [0.0]
    lock = PhaseLock(clock=lambda: now[0], idle=0.5)
    lock.serve_from_this_thread()

    def hold(seconds: float) -> None:
        with lock:
            now[0] += seconds

    def private_hold(seconds: float) -> None:
        t = threading.Thread(target=hold, args=(seconds,))
        t.start()
        t.join()

    hold(3.0)
    assert not lock.serving_must_wait()  # no job: a serving lead does not matter
    private_hold(1.0)
    hold(0.25)  # serving 0.25 s ahead while the job is active (binary fractions: exact)
    assert lock.serving_must_wait()
    private_hold(0.125)
    assert lock.serving_must_wait()
    private_hold(0.125)  # the job has caught up
    assert not lock.serving_must_wait()
    hold(0.375)
    assert lock.serving_must_wait()
    now[0] += 1.0  # the job has not called the engine for longer than `idle`
    assert not lock.serving_must_wait()
    assert lock.held == {"serving": 3.625, "private": 1.25}
