"""Continuous batching of chat and completions on the embedded engine.

:class:`BatchingBackend` owns one *scheduler thread* and one running serving batch (an
:class:`~dp_decoding.engines.base.ResizableBatch` from ``engine.start_serving``). Every request in
flight has one row per choice in that batch; each round of :meth:`BatchingBackend.step`:

1. drops the rows of requests whose consumer went away (a client that disconnected);
2. admits waiting requests (FIFO) that fit the limits: their prompts are prefilled together in
   one engine call and merged into the running batch (``merge``);
3. samples one token for every row with the request's own parameters (temperature, top_p,
   seed, stop, n, logprobs: :func:`proxy.serving.next_event`, the step loop's sampler) and hands
   each request its tokens, as :class:`~proxy.serving.TokenEvent` s, through its sink (a queue
   read by an HTTP thread, or an asyncio queue read on the event loop: no thread per stream);
4. drops the rows that finished (``keep``) and runs one decode forward pass over the rest.

So requests join and leave between decode steps, and the app's response builder
(:mod:`proxy.responses`) receives the same events as from the step loop.

Why a scheduler of our own rather than transformers' (``ContinuousBatchingManager``,
``generate_batch``, in the installed 5.19): its background thread steps the model with no hook
to take turns with the private jobs' engine calls under the engine's lock (the phase separation
and the share below); it keeps its own paged KV cache and may switch the *shared* model's
attention implementation (``set_attn_implementation``: eager to ``paged|eager``, or to flash
attention where installed), which the private rows use too; and greedy or sampling, the seed
and the number of choices are global to the manager, only the sampled token's log-probability
comes back, and there are no stop strings. What is needed here is small: merge two left-padded
KV caches, select rows, and the step loop's own sampler.

Invariants:

* **Serving rows only.** The scheduler's batches come from ``start_serving`` and merge only
  with each other; a private batch (``engine.start`` in a job) is a different engine call, so a
  private row never shares a forward pass, a cache or a batch with a serving row.
* **Turns and the share.** Each prefill and each decode step is one engine call under the
  engine's lock, made a FIFO :class:`~proxy.phases.PhaseLock` shared with the private jobs: a
  waiting private call runs before the next serving call, so it waits for at most one serving
  forward pass (a decode of at most ``max_rows`` rows, or a prefill of at most
  ``prefill_tokens`` padded tokens, or one request's prompt alone when that is longer). And
  while a job is busy, the scheduler waits before each engine call until the job's calls have
  held the lock at least as long as serving's (:meth:`~proxy.phases.PhaseLock.wait_share`):
  the job keeps at least half of the engine's time.
* **Abort within one step.** :meth:`BatchingBackend.abort` (called when a consumer stops early,
  is cancelled or is garbage-collected) takes effect at the start of the next round: the rows
  are out of the batch before the next decode forward pass.
* **No cache shared across requests.** A row's KV cache belongs to its request and is freed
  when it leaves; this path keeps no prefix cache, so nothing of one tenant is reused for
  another (``tenant`` is accepted for the backend protocol and unused).
* **Bounded memory.** A request joins only while the batch stays within ``max_rows`` rows and
  ``max_cells`` KV cells (rows × padded length), except alone in an empty batch; a request that
  does not fit waits, and the ones behind it wait too (FIFO: no starvation).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dp_decoding.engines.base import ContinuousBatching, Locking, ResizableBatch
from proxy.errors import APIError
from proxy.phases import share_engine_lock
from proxy.serving import Choice, SamplingParams, TokenEvent, new_rng, next_event

__all__ = ["AsyncEventStream", "BatchingBackend", "EventStream", "supports_batching"]

log = logging.getLogger("dpicl.serving")

_Item = tuple[list[TokenEvent], bool] | BaseException
"""What a request's sink receives: one step's events and whether the request finished."""


def supports_batching(engine: object) -> bool:
    """Whether ``engine`` starts resizable serving batches (continuous batching)."""
    return isinstance(engine, ContinuousBatching) and bool(engine.supports_continuous_batching)


class _ThreadSink:
    """Events for a consumer thread."""

    def __init__(self) -> None:
        self.q: queue.SimpleQueue[_Item] = queue.SimpleQueue()

    def put(self, item: _Item) -> None:
        self.q.put(item)


class _LoopSink:
    """Events for a consumer on an event loop (handed over with ``call_soon_threadsafe``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.q: asyncio.Queue[_Item] = asyncio.Queue()

    def put(self, item: _Item) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)


@dataclass(eq=False)
class _Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    sink: _ThreadSink | _LoopSink
    choices: list[Choice]
    rng: np.random.Generator
    steps: int = 0  # tokens sampled so far by each live choice
    done: bool = False


@dataclass
class _Consumer:
    """The reading end of one request: buffers a step's events, aborts when left early."""

    backend: BatchingBackend
    req: _Request
    buf: deque[TokenEvent] = field(default_factory=deque)
    finished: bool = False

    def _take(self, item: _Item) -> None:
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        events, self.finished = item
        self.buf.extend(events)

    def close(self) -> None:
        """Stop reading: abort the request unless it has finished."""
        if not self.finished:
            self.finished = True
            self.backend.abort(self.req)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the backend may be gone
            self.close()


class EventStream(_Consumer):
    """A blocking iterator of events (for a thread)."""

    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        assert isinstance(self.req.sink, _ThreadSink)
        while not self.buf:
            if self.finished:
                raise StopIteration
            try:
                self._take(self.req.sink.q.get())
            except BaseException:
                self.close()
                raise
        return self.buf.popleft()


class AsyncEventStream(_Consumer):
    """An async iterator of events: a cancelled read (a client that disconnected) aborts."""

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self

    async def __anext__(self) -> TokenEvent:
        assert isinstance(self.req.sink, _LoopSink)
        while not self.buf:
            if self.finished:
                raise StopAsyncIteration
            try:
                self._take(await self.req.sink.q.get())
            except BaseException:
                self.close()
                raise
        return self.buf.popleft()

    async def aclose(self) -> None:
        self.close()


class BatchingBackend:
    """Serving backend over an engine with resizable serving batches (see the module text).

    ``generate`` (for a thread) and ``agenerate`` (on an event loop) submit at once and return
    the request's events; stopping early aborts it. ``step`` is one scheduler round: the
    scheduler thread, started by the first request, calls it; tests may call it themselves
    with ``start_thread=False``. ``on_step`` (if set) is called with each decode step's number
    and the request id of each of its rows.
    """

    def __init__(
        self,
        engine: Any,
        *,
        max_rows: int = 64,
        max_cells: int = 65536,
        prefill_tokens: int = 4096,
        start_thread: bool = True,
    ) -> None:
        if not supports_batching(engine):
            raise TypeError("the engine has no resizable serving batches")
        self.engine = engine
        self.max_rows, self.max_cells, self.prefill_tokens = max_rows, max_cells, prefill_tokens
        # FIFO turns and the time share with the private jobs' engine calls
        self._lock = share_engine_lock(engine) if isinstance(engine, Locking) else None
        self._start_thread = start_thread
        self._cv = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._aborts: set[int] = set()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        # owned by the scheduler (the thread, or the caller of step()):
        self._batch: ResizableBatch | None = None
        self._rows: list[tuple[_Request, int]] = []  # (request, choice) of each batch row
        self.steps = 0
        """Decode forward passes so far."""
        self.stats: Counter[str] = Counter()
        """prefills, prefill_rows, decodes, decode_rows, aborted (requests), max_rows."""
        self.on_step: Callable[[int, list[int]], None] | None = None

    # -- submitting and consuming ---------------------------------------------------------
    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, tenant: str | None = None
    ) -> EventStream:
        """Submit one request (``params.n`` rows) now; iterate its events (blocking)."""
        return EventStream(self, self._submit(prompt_ids, params, _ThreadSink()))

    def agenerate(
        self, prompt_ids: list[int], params: SamplingParams, *, tenant: str | None = None
    ) -> AsyncEventStream:
        """Submit one request now (call on the event loop); iterate its events asynchronously."""
        sink = _LoopSink(asyncio.get_running_loop())
        return AsyncEventStream(self, self._submit(prompt_ids, params, sink))

    def _submit(
        self, prompt_ids: list[int], params: SamplingParams, sink: _ThreadSink | _LoopSink
    ) -> _Request:
        if not prompt_ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        choices = [Choice(self.engine, params.stop) for _ in range(params.n)]
        req = _Request(next(self._ids), list(prompt_ids), params, sink, choices, new_rng(params))
        with self._cv:
            if self._closed:
                raise RuntimeError("the serving backend is closed")
            self._pending.append(req)
            if self._start_thread and self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="dpicl-batching", daemon=True
                )
                self._thread.start()
            self._cv.notify_all()
        return req

    def abort(self, req: _Request) -> None:
        """Forget ``req``: dropped from the queue now, or its rows at the next round."""
        with self._cv:
            if req.done:
                return
            if req in self._pending:
                self._pending.remove(req)
                req.done = True
                return
            self._aborts.add(req.rid)
            self._cv.notify_all()

    def close(self) -> None:
        """Stop the scheduler after its current round; requests still in flight fail."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        else:
            self._fail_all(RuntimeError("the serving backend is closed"))

    # -- the scheduler --------------------------------------------------------------------
    def _run(self) -> None:
        if self._lock is not None:
            self._lock.serve_from_this_thread()
        while True:
            with self._cv:
                while not (self._pending or self._rows or self._aborts or self._closed):
                    self._cv.wait()
                if self._closed:
                    break
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - every waiting consumer must hear of it
                log.error("serving step failed (%s)", type(exc).__name__)
                self._fail_all(exc)
        self._fail_all(RuntimeError("server shutting down"))

    def step(self) -> None:
        """One round: drop abandoned rows, admit newcomers (one prefill), sample and deliver
        one token for every row, drop finished rows, run one decode step over the rest."""
        self._drop_aborted()
        self._admit()
        if self._batch is None:
            return
        lp = self._batch.logprobs()
        out: dict[_Request, list[TokenEvent]] = {}
        keep: list[int] = []
        tokens: list[int] = []
        for row, (req, i) in enumerate(self._rows):
            last = req.steps == req.params.max_tokens - 1
            ev = next_event(self.engine, req.choices[i], i, lp[row], req.params, req.rng, last=last)
            out.setdefault(req, []).append(ev)
            if not req.choices[i].done:
                keep.append(row)
                tokens.append(ev.token)
        for req, events in out.items():
            req.steps += 1
            req.done = all(c.done for c in req.choices)
            req.sink.put((events, req.done))
        self._resize(keep)
        if self._batch is not None:
            self._turn()
            self._batch.append(tokens)
            self.steps += 1
            self.stats["decodes"] += 1
            self.stats["decode_rows"] += len(tokens)
            if self.on_step is not None:
                self.on_step(self.steps, [req.rid for req, _ in self._rows])

    def _turn(self) -> None:
        """Before an engine call: wait while a busy private job is owed engine time."""
        if self._lock is not None:
            self._lock.wait_share()

    def _resize(self, keep: list[int]) -> None:
        if self._batch is None or len(keep) == len(self._rows):
            return
        if not keep:
            self._batch.close()
            self._batch, self._rows = None, []
            return
        self._batch.keep(keep)
        self._rows = [self._rows[r] for r in keep]

    def _drop_aborted(self) -> None:
        with self._cv:
            aborts, self._aborts = self._aborts, set()
        if not aborts:
            return
        gone = {req for req, _ in self._rows if req.rid in aborts}
        for req in gone:
            req.done = True
        self.stats["aborted"] += len(gone)
        self._resize([r for r, (req, _) in enumerate(self._rows) if req not in gone])

    def _width(self) -> int:
        """The running batch's padded length (its longest row)."""
        return max((len(req.prompt) + req.steps for req, _ in self._rows), default=0)

    def _take_newcomers(self) -> list[_Request]:
        """Pop the waiting requests (FIFO) that fit the limits; the first one always fits an
        empty batch."""
        rows, width = len(self._rows), self._width()
        take: list[_Request] = []
        new_rows, new_width = 0, 0
        with self._cv:
            while self._pending:
                req = self._pending[0]
                n, w = req.params.n, len(req.prompt)
                fits = (
                    rows + new_rows + n <= self.max_rows
                    and (rows + new_rows + n) * max(width, new_width, w) <= self.max_cells
                    and (new_rows + n) * max(new_width, w) <= self.prefill_tokens
                )
                if not fits and (rows or take):
                    break
                take.append(self._pending.popleft())
                new_rows, new_width = new_rows + n, max(new_width, w)
        return take

    def _admit(self) -> None:
        take = self._take_newcomers()
        if not take:
            return
        prompts = [req.prompt for req in take for _ in range(req.params.n)]
        self._turn()
        try:
            new = self.engine.start_serving(prompts)  # one engine call, under the engine's lock
        except Exception as exc:
            self._fail(take, exc)
            raise
        if self._batch is None:
            self._batch = new
        else:
            self._batch.merge(new)
        self._rows += [(req, i) for req in take for i in range(req.params.n)]
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += len(prompts)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))

    def _fail_all(self, exc: BaseException) -> None:
        with self._cv:
            waiting = list(self._pending)
            self._pending.clear()
            self._aborts.clear()
        live = list({req: None for req, _ in self._rows})
        if self._batch is not None:
            self._batch.close()
        self._batch, self._rows = None, []
        self._fail([*live, *waiting], exc)

    @staticmethod
    def _fail(requests: list[_Request], exc: BaseException) -> None:
        for req in requests:
            req.done = True
            req.sink.put(RuntimeError(f"generation failed ({type(exc).__name__})"))
