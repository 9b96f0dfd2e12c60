"""Batch execution: lines answered many at a time on the engine, results written as they come,
cancel at the next line boundary, and restart resume without redoing or losing a line.

:func:`run_lines` (shared by the server's :class:`BatchRunner` and ``dpicl classify``) takes the
lines in chunks of ``chunk_lines``. A chunk's lines are prepared one by one
(:mod:`proxy.answering`: a bad body or an unknown model is that line's 4xx answer), lines
whose model a :data:`~proxy.answering.DIRECT_ANSWERERS` entry owns are answered there, and the
rest are generated together: on the step-loop backend as one shared engine batch
(:class:`~proxy.lockstep.Lockstep`: one prefill and one forward pass per token for all of the
chunk's rows), on the continuous-batching backend (:mod:`proxy.batching`, the embedded
engine's default) or vLLM by submitting them at once to its scheduler. Each line's answer is
handed to ``on_result`` as soon as it is complete.

:class:`BatchRunner` is one worker thread per server. For each batch: validate the input file
(:func:`proxy.batch_input.parse_input`; a bad file fails the batch), move it to
``in_progress``, answer the lines not yet recorded, write each answer as one exactly-once row
as soon as it is complete (:meth:`proxy.storage.batches.Batches.record_many`, from a writer
thread: lines that finish together share one commit), then finalise (output and error files, final
status). ``cancel`` stops the shared batch at its next token step (lines already complete are
kept, the others are never recorded); the database status is re-read between chunks, so a
cancel made through another replica also stops it. At start-up :meth:`BatchRunner.resume`
queues every unfinished batch: its recorded lines are skipped, so a line is never answered
twice and none is lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

from proxy.answering import Answer, Prepared, answer_line, prepare_line, reply_answer
from proxy.batch_input import InputLine, batch_error, expired_line, output_line, parse_input
from proxy.errors import APIError, internal_error
from proxy.lockstep import Lockstep, Stopped
from proxy.serving import StepLoopBackend, TokenEvent
from proxy.storage.batches import Batch, LineResult
from proxy.storage.files import UNFINISHED
from proxy.store import ApiKey, StorageError, Store

if TYPE_CHECKING:
    from proxy.context import AppContext

__all__ = ["CHUNK_LINES", "BatchRunner", "run_lines"]

log = logging.getLogger("dpicl.batches")

CHUNK_LINES = 32
"""Lines per engine batch (each line brings its ``n`` rows)."""

_RETRY_STORAGE_S = 5.0

Generate = Callable[[int, Prepared], Iterator[TokenEvent]]
Ref = Callable[[InputLine], "str | None"]


def _together(
    context: AppContext,
    key: ApiKey,
    pending: list[tuple[InputLine, Prepared]],
    on_result: Callable[[LineResult], None],
    stop: Callable[[], bool],
    ref: Ref,
) -> None:
    """Generate the prepared lines at once; a line whose shared generation failed (not its
    own request) is answered again alone, so one bad line cannot fail its chunk."""
    generate: Generate
    if isinstance(context.backend, StepLoopBackend):
        requests = [(p.prompt_ids, p.params.n) for _, p in pending]
        try:
            lockstep = Lockstep(context.engine, requests, stop)
        except Exception:  # noqa: BLE001 - e.g. one prompt the engine refuses: each alone
            _each_alone(context, key, [line for line, _ in pending], on_result, stop, ref)
            return

        def generate(i: int, p: Prepared) -> Iterator[TokenEvent]:
            return lockstep.generate(i, p.prompt_ids, p.params)
    else:  # continuous batching (proxy/batching.py) or vLLM: the scheduler batches the lines

        def generate(i: int, p: Prepared) -> Iterator[TokenEvent]:
            return context.backend.generate(p.prompt_ids, p.params, tenant=key.tenant_id)

    def run(i: int, prepared: Prepared) -> Answer | None:
        events = generate(i, prepared)
        try:
            return reply_answer(prepared, events)
        except Stopped:
            return None
        finally:
            # release the line's rows now, whatever happened (a suspended generator kept
            # alive by a traceback would hold the other lines at the shared step)
            close = getattr(events, "close", None)
            if close is not None:
                close()

    retry: list[InputLine] = []
    with ThreadPoolExecutor(max_workers=len(pending), thread_name_prefix="dpicl-line") as pool:
        futures = {pool.submit(run, i, p): line for i, (line, p) in enumerate(pending)}
        for future in as_completed(futures):
            line = futures[future]
            try:
                answer = future.result()
            except Exception:  # noqa: BLE001 - the shared batch failed under this line
                retry.append(line)
                continue
            if answer is not None:
                on_result(output_line(line, answer))
    _each_alone(context, key, sorted(retry, key=lambda line: line.line), on_result, stop, ref)


def _each_alone(
    context: AppContext,
    key: ApiKey,
    lines: list[InputLine],
    on_result: Callable[[LineResult], None],
    stop: Callable[[], bool],
    ref: Ref,
) -> None:
    """Each line on the serving backend by itself, as the online route runs it."""
    for line in lines:
        if stop():
            return
        answer = answer_line(context, key, line.url, line.body, ref=ref(line))
        on_result(output_line(line, answer))


def run_lines(
    context: AppContext,
    key: ApiKey,
    lines: Sequence[InputLine],
    on_result: Callable[[LineResult], None],
    *,
    stop: Callable[[], bool] = lambda: False,
    proceed: Callable[[], bool] = lambda: True,
    chunk_lines: int = CHUNK_LINES,
    ref: Ref = lambda line: None,
) -> bool:
    """Answer ``lines`` in chunks (see the module text), handing each result to ``on_result``
    as it completes. ``stop`` is checked at every token step, ``proceed`` before each chunk;
    ``ref(line)`` is the line's stable name for a direct answerer (see
    :data:`proxy.answering.DirectAnswerer`). Returns False if it stopped before answering
    every line."""
    for start in range(0, len(lines), chunk_lines):
        if stop() or not proceed():
            return False
        pending: list[tuple[InputLine, Prepared]] = []
        for line in lines[start : start + chunk_lines]:
            first = prepare_line(context, key, line.url, line.body, ref(line))
            if isinstance(first, Answer):
                on_result(output_line(line, first))
            else:
                pending.append((line, first))
        if pending:
            _together(context, key, pending, on_result, stop, ref)
    return not stop()


class _Recorder:
    """Writes answered lines from a thread of its own as they come: every line waiting is
    written in one transaction per batch (one commit for lines that finish together), while
    the engine goes on. A batch's storage failure is raised by :meth:`flush`; the lines not
    written are answered again when the batch is retried (never recorded twice)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: queue.Queue[tuple[str, LineResult] | threading.Event] = queue.Queue()
        self._failed: dict[str, StorageError] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._write, name="dpicl-batch-writer", daemon=True).start()

    def put(self, batch_id: str, result: LineResult) -> None:
        self._queue.put((batch_id, result))

    def failed(self, batch_id: str) -> bool:
        with self._lock:
            return batch_id in self._failed

    def flush(self, batch_id: str) -> None:
        """Wait until every line queued so far is written; StorageError if one of
        ``batch_id``'s writes failed (the failure is then forgotten)."""
        written = threading.Event()
        self._queue.put(written)
        written.wait()
        with self._lock:
            error = self._failed.pop(batch_id, None)
        if error is not None:
            raise error

    def _write(self) -> None:
        while True:
            items = [self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            groups: dict[str, list[LineResult]] = {}
            for item in items:
                if not isinstance(item, threading.Event):
                    groups.setdefault(item[0], []).append(item[1])
            for batch_id, results in groups.items():
                if self.failed(batch_id):
                    continue
                try:
                    self.store.batches.record_many(batch_id, results)
                except StorageError as exc:
                    with self._lock:
                        self._failed[batch_id] = exc
            for item in items:
                if isinstance(item, threading.Event):
                    item.set()


class BatchRunner:
    """The server's batch worker (one thread); see the module text."""

    def __init__(self, store: Store, *, chunk_lines: int = CHUNK_LINES) -> None:
        self.store = store
        self.chunk_lines = chunk_lines
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._queued: set[str] = set()
        self._thread: threading.Thread | None = None
        self._watch: threading.Thread | None = None
        self._stopping = threading.Event()
        self._context: AppContext | None = None
        self._recorder: _Recorder

    def start(self, context: AppContext) -> None:
        """Start the worker and writer threads, answering lines through ``context``."""
        self._context = context
        self._recorder = _Recorder(self.store)
        self._thread = threading.Thread(target=self._work, name="dpicl-batches", daemon=True)
        self._thread.start()

    def submit(self, batch_id: str) -> None:
        """Queue ``batch_id`` (once: a batch already queued or running is not queued again)."""
        with self._lock:
            if batch_id in self._queued:
                return
            self._queued.add(batch_id)
        self._queue.put(batch_id)

    def cancel(self, batch_id: str) -> None:
        """Stop ``batch_id`` at its next token step (its status is already ``cancelling``)."""
        with self._lock:
            self._cancelled.add(batch_id)

    def resume(self, *, stale_after: float | None = None) -> int:
        """Queue every unfinished batch (with ``stale_after``, only those nobody has updated
        for that long: another replica's live batches stay with it); returns how many. With
        ``stale_after`` the scan repeats every ``min(stale_after, 60)`` seconds, so a batch
        whose server died is taken over once it has gone stale."""
        batches = self.store.batches.unfinished(stale_after=stale_after)
        for batch in batches:
            self.submit(batch.id)
        if stale_after is not None and self._watch is None:
            self._watch = threading.Thread(
                target=self._rescan, args=(stale_after,), name="dpicl-batch-scan", daemon=True
            )
            self._watch.start()
        return len(batches)

    def _rescan(self, stale_after: float) -> None:
        while not self._stopping.wait(min(stale_after, 60.0)):
            try:
                for batch in self.store.batches.unfinished(stale_after=stale_after):
                    self.submit(batch.id)
            except StorageError:
                log.error("batch scan: storage failure")

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _is_cancelled(self, batch_id: str) -> bool:
        with self._lock:
            return batch_id in self._cancelled

    def _work(self) -> None:
        while True:
            batch_id = self._queue.get()
            if batch_id is None:
                return
            try:
                self._run(batch_id)
            except StorageError:
                log.error("batch %s: storage failure; retrying", batch_id)
                threading.Timer(_RETRY_STORAGE_S, self.submit, (batch_id,)).start()
            except Exception as exc:  # noqa: BLE001 - never leave a batch hanging
                log.error("batch %s failed (%s)", batch_id, type(exc).__name__)
                self._fail_remaining(batch_id)
            finally:
                with self._lock:
                    self._queued.discard(batch_id)

    def _lines(self, batch: Batch) -> tuple[list[InputLine], list[dict[str, Any]]]:
        data = self.store.file_content(batch.tenant_id, batch.input_file_id)
        if data is None:
            gone = "The input file no longer exists."
            return [], [batch_error("file_not_found", gone, param="input_file_id")]
        return parse_input(data, batch.endpoint)

    def _run(self, batch_id: str) -> None:
        batches = self.store.batches
        batch = batches.by_id(batch_id)
        if batch is None or batch.status not in UNFINISHED:
            return
        lines, errors = self._lines(batch)
        if batch.status == "validating":
            if errors:
                batches.fail(batch_id, errors)
                log.info("batch %s failed validation (%d errors)", batch_id, len(errors))
                return
            batches.start(batch_id, len(lines))
            batch = batches.by_id(batch_id) or batch
        if batch.status == "in_progress":
            self._answer(batch, lines)
        self._finalize(batch_id, lines)

    def _answer(self, batch: Batch, lines: list[InputLine]) -> None:
        assert self._context is not None
        done = self.store.batches.done_lines(batch.id)
        todo = [line for line in lines if line.line not in done]
        key = self.store.batches.key(batch)
        if key is None:  # the key is gone: every remaining line is refused as the route would
            gone = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
            for line in todo:
                self.store.batches.record(batch.id, output_line(line, Answer.error(gone)))
            return

        recorder = self._recorder

        def proceed() -> bool:
            now = self.store.batches.by_id(batch.id)
            return (
                not recorder.failed(batch.id)
                and now is not None
                and now.status == "in_progress"
                and time.time() < now.expires_at
            )

        try:
            run_lines(
                self._context,
                key,
                todo,
                lambda result: recorder.put(batch.id, result),
                stop=lambda: self._is_cancelled(batch.id),
                proceed=proceed,
                chunk_lines=self.chunk_lines,
                ref=lambda line: f"{batch.id}:{line.line}",
            )
        finally:
            recorder.flush(batch.id)

    def _finalize(self, batch_id: str, lines: list[InputLine]) -> None:
        batch = self.store.batches.by_id(batch_id)
        if batch is None or batch.status not in UNFINISHED:
            return
        expired = None
        if batch.status != "cancelling" and time.time() >= batch.expires_at:
            done = self.store.batches.done_lines(batch_id)
            expired = [expired_line(line) for line in lines if line.line not in done]
        final = self.store.batches.finalize(batch_id, expired=expired)
        with self._lock:
            self._cancelled.discard(batch_id)
        if final is not None:
            counts = (final.completed, final.failed, final.total)
            log.info("batch %s %s: %d completed, %d failed of %d", batch_id, final.status, *counts)

    def _fail_remaining(self, batch_id: str) -> None:
        """After an unexpected failure: every unanswered line gets the online route's 500, and
        the batch is finalised (no line is lost, nothing hangs)."""
        try:
            batch = self.store.batches.by_id(batch_id)
            if batch is None or batch.status not in UNFINISHED:
                return
            lines, errors = self._lines(batch)
            if batch.status == "validating":
                internal = batch_error("internal_error", "Internal server error.")
                self.store.batches.fail(batch_id, errors or [internal])
                return
            done = self.store.batches.done_lines(batch_id)
            for line in lines:
                if line.line not in done:
                    answer = Answer.error(internal_error())
                    self.store.batches.record(batch_id, output_line(line, answer))
            self._finalize(batch_id, lines)
        except Exception as exc:  # noqa: BLE001
            log.error("batch %s: could not record the failure (%s)", batch_id, type(exc).__name__)
