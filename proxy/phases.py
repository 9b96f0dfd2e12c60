"""The lock that takes serving and private work in turns on one engine.

Both serving backends that batch (:mod:`proxy.batching` on the embedded engine,
:mod:`proxy.vllm_serving` on vLLM) share the engine's lock with the private jobs, made a FIFO
:class:`PhaseLock` by :func:`share_engine_lock`: a thread that waits is served before a releasing
holder can take the lock back, so a private engine call waits for at most one serving turn and a
serving turn for at most one private engine call.

The lock also keeps a *time share* for continuous batching (docs/ARCHITECTURE.md §9): it adds up
how long the threads marked as serving (:meth:`PhaseLock.serve_from_this_thread`) and all other
threads (the private jobs) hold it. While private work is active — a private thread waits for
the lock, holds it, or released it less than ``idle`` seconds ago — :meth:`PhaseLock.wait_share`
keeps a serving thread from its next engine call until private calls have held the lock at
least as long as serving has since serving's previous turn. So a busy job gets at least half of
the engine's time, less one serving forward pass, and a serving turn is never withheld for
longer than ``idle`` once the job stops calling the engine.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["PhaseLock", "share_engine_lock"]


class PhaseLock:
    """A FIFO lock, a drop-in for ``threading.Lock`` (``with``, ``acquire``, ``release``,
    ``locked``), that also tells its holder how many threads wait for it and keeps the serving
    / private time share (see the module text; ``clock`` is for tests).

    FIFO: a releasing holder cannot barge back in ahead of a thread already waiting, which is
    what makes private steps and serving waves alternate.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, idle: float = 0.5) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._held = False
        self._queue: deque[tuple[object, int]] = deque()  # (ticket, thread id) of each waiter
        self._clock = clock
        self.idle = idle
        self._serving: set[int] = set()
        self._owner = 0
        self._since = 0.0
        self._lead = 0.0  # serving's hold time since its last turn, less private hold time
        self._private_seen = float("-inf")  # when a private holder last released
        self.held = {"serving": 0.0, "private": 0.0}
        """Total seconds the lock was held by serving threads and by all others."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = (object(), threading.get_ident())
        with self._cv:
            if not self._held and not self._queue:
                self._take(me[1])
                return True
            if not blocking:
                return False
            self._queue.append(me)
            ok = self._cv.wait_for(
                lambda: not self._held and self._queue[0] is me,
                None if timeout is None or timeout < 0 else timeout,
            )
            self._queue.remove(me)
            if ok:
                self._take(me[1])
            else:
                self._cv.notify_all()  # the next in line may be free to go now
            return ok

    def _take(self, ident: int) -> None:
        self._held, self._owner, self._since = True, ident, self._clock()

    def release(self) -> None:
        with self._cv:
            if not self._held:
                raise RuntimeError("release of an unlocked PhaseLock")
            now = self._clock()
            spent = now - self._since
            if self._owner in self._serving:
                self.held["serving"] += spent
                self._lead += spent
            else:
                self.held["private"] += spent
                self._lead = max(0.0, self._lead - spent)
                self._private_seen = now
            self._held = False
            self._cv.notify_all()

    def locked(self) -> bool:
        return self._held

    @property
    def waiting(self) -> int:
        """Threads blocked in :meth:`acquire` right now."""
        with self._cv:
            return len(self._queue)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- the time share ----------------------------------------------------------------------
    def serve_from_this_thread(self) -> None:
        """Count the calling thread's holds as serving (the scheduler thread calls this)."""
        with self._cv:
            self._serving.add(threading.get_ident())

    def _private_active(self) -> bool:
        if self._held and self._owner not in self._serving:
            return True
        if any(ident not in self._serving for _, ident in self._queue):
            return True
        return self._clock() - self._private_seen < self.idle

    def serving_must_wait(self) -> bool:
        """Whether a serving call should wait now: private work is active and serving is ahead
        in hold time. With no private work the lead is forgotten."""
        with self._cv:
            if not self._private_active():
                self._lead = 0.0
                return False
            return self._lead > 0.0

    def wait_share(self) -> None:
        """Block (a serving thread, before an engine call) while :meth:`serving_must_wait`."""
        with self._cv:
            while True:
                if not self._private_active():
                    self._lead = 0.0
                    return
                if self._lead <= 0.0:
                    return
                self._cv.wait(timeout=self.idle)


def share_engine_lock(engine: Any) -> PhaseLock:
    """The engine's lock, made a :class:`PhaseLock` (once) and returned for serving to share.

    An engine with the ``Locking`` capability (``VLLMEngine``, ``EmbeddedEngine``) serialises its
    engine calls with ``with self.lock``; the proxy hands it a PhaseLock through the engine's
    :meth:`use_lock`: it keeps ``with``/``acquire``/``release`` and adds FIFO hand-over, a
    waiter count and the time share. It must happen before any job step runs (``create_app``
    builds the serving backend before the job runner); a second call returns the same lock."""
    if not isinstance(engine.lock, PhaseLock):
        engine.use_lock(PhaseLock())
    lock: PhaseLock = engine.lock
    return lock
