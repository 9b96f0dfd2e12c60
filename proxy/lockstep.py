"""Many requests in one engine batch: the step loop of :func:`proxy.serving.generate`, run for
several requests at once on one shared engine batch (one prefill, one forward pass per step
for every row), each request in its own thread.

Each request gets a :class:`RowsEngine`, an engine whose ``start`` hands out that request's
rows of the shared batch (a :class:`RowsView`). The request's thread runs the unchanged
:func:`~proxy.serving.generate` on it, so its sampling, stop handling and events are exactly
the online route's. ``append`` is the barrier: the shared batch advances one token, for every
row, when each request still running has appended its rows' tokens; a finished request's rows
get an end-of-text filler (rows never see each other: each row's distribution depends on its
own tokens only, as in any padded batch).

``stop`` (a callable) is checked at every request's ``append``: once it answers True every
request still running raises :class:`Stopped` at its next step, and nothing more is generated.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from dp_decoding.engines.base import Batch, Engine
from proxy.serving import SamplingParams, TokenEvent, generate

__all__ = ["Lockstep", "RowsEngine", "RowsView", "Stopped"]


class Stopped(Exception):
    """The shared batch was stopped (cancelled) before this request finished."""


class Lockstep:
    """One engine batch holding the rows of several requests (``rows[i]`` prompts of request
    ``i``, its ``n`` choices)."""

    def __init__(
        self,
        engine: Engine,
        requests: Sequence[tuple[list[int], int]],
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.engine = engine
        self.stop = stop
        self._spans: list[tuple[int, int]] = []
        rows: list[list[int]] = []
        for prompt_ids, n in requests:
            self._spans.append((len(rows), len(rows) + n))
            rows.extend([list(prompt_ids)] * n)
        self._filler = next(iter(engine.eos_token_ids))
        self._tokens = [self._filler] * len(rows)
        self._batch: Batch = engine.start(rows)  # the one prefill of every row
        self._lp: np.ndarray = self._batch.logprobs()
        self._cond = threading.Condition()
        self._live = set(range(len(requests)))
        self._arrived: set[int] = set()
        self._step = 0
        self._failed = False

    def engine_for(self, index: int) -> RowsEngine:
        """The engine request ``index`` generates on."""
        return RowsEngine(self, index)

    def generate(
        self, index: int, prompt_ids: list[int], params: SamplingParams
    ) -> Iterator[TokenEvent]:
        """:func:`proxy.serving.generate` for request ``index`` on its rows."""
        return generate(self.engine_for(index), prompt_ids, params)

    # -- called by the views, under the condition ----------------------------------------------
    def _logprobs(self, index: int) -> np.ndarray:
        a, b = self._spans[index]
        with self._cond:
            if self._failed:
                raise RuntimeError("the shared batch failed")
            return self._lp[a:b]

    def _append(self, index: int, tokens: Sequence[int]) -> None:
        a, b = self._spans[index]
        if len(tokens) != b - a:
            raise ValueError("append() needs one token per row")
        with self._cond:
            if self._failed:
                raise RuntimeError("the shared batch failed")
            if self.stop():
                raise Stopped()
            self._tokens[a:b] = [int(t) for t in tokens]
            self._arrived.add(index)
            step = self._step
            self._advance_if_all_arrived()
            while self._step == step and not self._failed:
                self._cond.wait()
            if self._failed:
                raise RuntimeError("the shared batch failed")

    def _close(self, index: int) -> None:
        a, b = self._spans[index]
        with self._cond:
            if index not in self._live:
                return
            self._live.discard(index)
            self._arrived.discard(index)
            self._tokens[a:b] = [self._filler] * (b - a)
            if not self._live:
                self._batch.close()
                return
            # this request is done; if the step fails, the waiting requests see it
            with contextlib.suppress(Exception):
                self._advance_if_all_arrived()

    def _advance_if_all_arrived(self) -> None:
        if self._failed or not self._live or self._arrived != self._live:
            return
        try:
            self._batch.append(self._tokens)
            self._lp = self._batch.logprobs()
        except BaseException:
            self._failed = True
            raise
        finally:
            self._arrived.clear()
            self._step += 1
            for i in set(range(len(self._spans))) - self._live:
                a, b = self._spans[i]
                self._tokens[a:b] = [self._filler] * (b - a)
            self._cond.notify_all()


class RowsView:
    """One request's rows of a :class:`Lockstep` batch, behind the engine ``Batch`` protocol."""

    def __init__(self, owner: Lockstep, index: int) -> None:
        self._owner = owner
        self._index = index
        a, b = owner._spans[index]
        self._rows = b - a

    @property
    def rows(self) -> int:
        return self._rows

    def logprobs(self, candidates: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        lp = self._owner._logprobs(self._index)
        return lp if candidates is None else lp[:, np.asarray(candidates)]

    def append(self, tokens: Sequence[int]) -> None:
        self._owner._append(self._index, tokens)

    def close(self) -> None:
        self._owner._close(self._index)


class RowsEngine:
    """The engine one request of a :class:`Lockstep` sees: the real engine's tokenizer and
    vocabulary, and a ``start`` that returns the request's rows (already prefilled)."""

    def __init__(self, owner: Lockstep, index: int) -> None:
        self._owner = owner
        self._index = index
        engine = owner.engine
        self.name: str = engine.name
        self.vocab_size: int = engine.vocab_size
        self.eos_token_ids: frozenset[int] = engine.eos_token_ids

    def tokenize(self, text: str) -> list[int]:
        return self._owner.engine.tokenize(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._owner.engine.decode(token_ids)

    def start(self, prompts: Sequence[Sequence[int]], *, width: int | None = None) -> RowsView:
        view = RowsView(self._owner, self._index)
        if width is not None or len(prompts) != view.rows:
            raise ValueError("a request's rows were fixed when the shared batch started")
        return view
