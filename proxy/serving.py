"""Ordinary (non-private) text generation for chat and completions on an engine.

Serving only ever sees released demonstrations (post-processing), never private records, and
never touches a generation job's batches or cache salt.

Three backends produce the same :class:`TokenEvent` stream, so the app builds identical
responses from any: :class:`StepLoopBackend` samples token by token on the engine protocol
(batch of one request, under the engine's lock), :class:`proxy.batching.BatchingBackend`
batches all requests in flight on an engine with resizable serving batches (the embedded
engine: continuous batching), and, for a vLLM engine, :class:`proxy.vllm_serving.VLLMServing`
lets vLLM's scheduler batch them. All sample with :func:`next_event`.
:func:`proxy.backends.backend_for` picks one. This module imports none of the other two
(they build on the types here, never the other way round).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from dp_decoding.engines.base import Engine

__all__ = [
    "AsyncBackend",
    "Backend",
    "Choice",
    "SamplingParams",
    "StepLoopBackend",
    "TokenEvent",
    "generate",
    "new_rng",
    "next_event",
]


@dataclass
class TokenEvent:
    """One generated token of one choice, with the text it adds (possibly empty while a
    multi-byte character or a possible stop sequence is held back)."""

    index: int
    token: int
    delta: str
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class SamplingParams:
    """OpenAI's sampling fields, validated by :mod:`proxy.schemas` before they get here."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: Sequence[str] = ()
    seed: int | None = None
    top_logprobs: int = 0


def _sample(lp: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.temperature == 0.0:
        return int(np.argmax(lp))
    logits = lp.astype(np.float64) / params.temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < params.top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.shape[0], p=p))


class Choice:
    """Incremental detokenisation and stop-sequence handling for one row."""

    def __init__(self, engine: Engine, stops: Sequence[str]) -> None:
        self.engine = engine
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0  # characters of the (stop-truncated) text already released
        self.done = False

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (newly releasable text, stopped)."""
        self.ids.append(token)
        text = self.engine.decode(self.ids)
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                out = text[self.emitted : max(at, self.emitted)]
                self.emitted = max(at, self.emitted)
                return out, True
        if text.endswith("\ufffd"):
            return "", False  # incomplete multi-byte character
        safe = len(text) - self.hold
        if safe <= self.emitted:
            return "", False
        out = text[self.emitted : safe]
        self.emitted = safe
        return out, False

    def flush(self) -> str:
        text = self.engine.decode(self.ids)
        out = text[self.emitted :]
        self.emitted = len(text)
        return out


def _top(lp: np.ndarray, k: int) -> list[tuple[int, float]]:
    if not k:
        return []
    idx = np.argpartition(-lp, k - 1)[:k]
    idx = idx[np.argsort(-lp[idx])]
    return [(int(t), float(lp[t])) for t in idx]


def next_event(
    engine: Engine,
    choice: Choice,
    index: int,
    lp: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    *,
    last: bool,
) -> TokenEvent:
    """Sample choice ``index``'s next token from its log-probabilities ``lp`` and account for it
    (end of text, a stop sequence, or ``last``: the ``max_tokens``-th token); marks the choice
    done when it finishes. The one sampling step of every backend built on the engine protocol."""
    tok = _sample(lp, params, rng)
    top = _top(lp, params.top_logprobs)
    if tok in engine.eos_token_ids:
        choice.done = True
        return TokenEvent(index, tok, choice.flush(), float(lp[tok]), top, "stop")
    delta, stopped = choice.push(tok)
    finish = None
    if stopped:
        choice.done, finish = True, "stop"
    elif last:
        delta += choice.flush()
        choice.done, finish = True, "length"
    return TokenEvent(index, tok, delta, float(lp[tok]), top, finish)


def new_rng(params: SamplingParams) -> np.random.Generator:
    """The request's sampler: seeded by ``seed``, else from the OS."""
    return np.random.default_rng(params.seed if params.seed is not None else secrets.randbits(64))


def generate(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
    """Sample ``params.n`` continuations of one prompt in one batch, token by token."""
    rng = new_rng(params)
    batch = engine.start([prompt_ids] * params.n)
    choices = [Choice(engine, params.stop) for _ in range(params.n)]
    filler = next(iter(engine.eos_token_ids))
    try:
        for step in range(params.max_tokens):
            lp = batch.logprobs()
            tokens: list[int] = []
            for i, c in enumerate(choices):
                if c.done:
                    tokens.append(filler)
                    continue
                ev = next_event(
                    engine, c, i, lp[i], params, rng, last=step == params.max_tokens - 1
                )
                yield ev
                tokens.append(filler if ev.token in engine.eos_token_ids else ev.token)
            if all(c.done for c in choices):
                return
            batch.append(tokens)
    finally:
        batch.close()


class Backend(Protocol):
    """What the app needs to serve chat and completions.

    ``generate`` yields one :class:`TokenEvent` per generated token of each of ``params.n``
    choices; a choice's last event carries its ``finish_reason``. ``tenant`` scopes any prefix
    cache the backend keeps (never shared with private generation).
    """

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, tenant: str | None = None
    ) -> Iterator[TokenEvent]: ...


@runtime_checkable
class AsyncBackend(Protocol):
    """A backend that also feeds an event loop without a thread per request: ``agenerate``
    (called on the loop) submits at once, so bad input is refused before any byte is sent,
    and returns an async iterator of the same events; leaving it early (a client that went
    away) aborts the request."""

    def agenerate(
        self, prompt_ids: list[int], params: SamplingParams, *, tenant: str | None = None
    ) -> AsyncIterator[TokenEvent]: ...


class StepLoopBackend:
    """:func:`generate` on the engine protocol: one request at a time per engine call."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, tenant: str | None = None
    ) -> Iterator[TokenEvent]:
        return generate(self.engine, prompt_ids, params)

    def close(self) -> None:
        return None
