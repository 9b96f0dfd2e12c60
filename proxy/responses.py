"""One response builder for chat and completions, JSON and server-sent events.

Both endpoints turn the same :class:`~proxy.serving.TokenEvent` stream (from either serving
backend) into OpenAI's shapes; they differ only in a few fields, which a :class:`Shape`
names: the ``object`` strings, how a choice carries its text (``message`` / ``delta`` for chat,
``text`` for completions), the log-probability format, and two quirks kept for byte-identical
output (a chat chunk carries ``"usage": null`` when usage is requested, and chat opens a stream
with one role chunk per choice).

Invariants: every choice ends with a ``finish_reason`` (``"length"`` when the backend gave
none); ``usage`` counts one completion token per event; a stream ends with ``data: [DONE]``;
served-token metrics are counted once the events are exhausted, so an aborted stream counts
nothing. Chunks are ``json.dumps`` with its default separators, JSON bodies FastAPI's. Events
come as a plain iterator (read in a worker thread) or an async iterator (read on the event loop:
:meth:`Reply.ajson`, :meth:`Reply.stream`); both give the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from proxy.metrics import Metrics
from proxy.serving import TokenEvent

__all__ = [
    "CHAT",
    "COMPLETION",
    "Reply",
    "Shape",
    "json_until_disconnect",
    "sse",
    "until_disconnect",
    "until_stopped",
    "usage",
]

Decode = Callable[[Sequence[int]], str]
T = TypeVar("T")


def usage(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def sse(chunks: Iterator[str] | AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events: each chunk as ``data: …``, then ``data: [DONE]``. A sync iterator
    is read in Starlette's thread pool, an async one on the event loop."""

    def body() -> Iterator[str]:
        assert isinstance(chunks, Iterator)
        for c in chunks:
            yield f"data: {c}\n\n"
        yield "data: [DONE]\n\n"

    async def abody() -> AsyncIterator[str]:
        assert isinstance(chunks, AsyncIterator)
        async for c in chunks:
            yield f"data: {c}\n\n"
        yield "data: [DONE]\n\n"

    content = abody() if isinstance(chunks, AsyncIterator) else body()
    return StreamingResponse(
        content, media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )


async def until_disconnect(
    request: Request, work: Awaitable[T], on_disconnect: Callable[[], object] | None = None
) -> T | Response:
    """Await ``work`` unless the client disconnects first: then ``on_disconnect()`` is called
    and ``work`` cancelled (so a request's events are abandoned and the backend aborts it) and
    an empty 499 response, which nobody reads, is returned. The request body must have been
    read already (FastAPI has)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        if on_disconnect is not None:
            on_disconnect()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)
    finally:
        watch.cancel()


class _Abandoned(Exception):
    """Internal: the client of a non-streamed request read in a worker thread went away."""


def until_stopped(events: Iterator[TokenEvent], stop: threading.Event) -> Iterator[TokenEvent]:
    """``events`` until ``stop`` is set, checked before each next event is computed (so at most
    the engine step in progress finishes), then :class:`_Abandoned`; ``events`` is closed
    either way (a generator's ``finally`` frees its batch)."""
    try:
        while not stop.is_set():
            try:
                event = next(events)
            except StopIteration:
                return
            yield event
        raise _Abandoned
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


async def json_until_disconnect(
    request: Request,
    reply: Reply,
    events: Iterator[TokenEvent],
    stop: threading.Event | None = None,
) -> dict[str, Any] | Response:
    """:meth:`Reply.json` of a backend read in the thread pool (the step loop), aborted when
    the client disconnects: ``stop`` (a fresh event unless given) is set, the worker thread
    leaves ``events`` before the next engine step and closes them, and the answer is 499."""
    flag = stop if stop is not None else threading.Event()

    def consume() -> dict[str, Any] | None:
        try:
            return reply.json(until_stopped(events, flag))
        except _Abandoned:
            return None

    answer = await until_disconnect(request, run_in_threadpool(consume), flag.set)
    return Response(status_code=499) if answer is None else answer


class Shape:
    """What distinguishes one endpoint's response from the other's (see the module text)."""

    object: str
    chunk_object: str
    usage_in_every_chunk: bool
    opens_with_role: bool
    counts_streamed_prompt: bool

    def choice_text(self, text: str) -> tuple[str, Any]:
        """The (field, value) carrying a finished choice's text."""
        raise NotImplementedError

    def delta(self, text: str) -> tuple[str, Any]:
        """The (field, value) carrying a streamed chunk's new text."""
        raise NotImplementedError

    def new_logprobs(self) -> Any:
        """An empty log-probability accumulator for one choice."""
        raise NotImplementedError

    def add_logprob(self, acc: Any, ev: TokenEvent, text_before: str, decode: Decode) -> None:
        """Record ``ev``'s log-probabilities; ``text_before`` is the choice's text so far."""
        raise NotImplementedError

    def logprobs(self, acc: Any) -> Any:
        """The finished choice's ``logprobs`` value."""
        return acc


class _ChatShape(Shape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    usage_in_every_chunk = True
    opens_with_role = True
    counts_streamed_prompt = True

    def choice_text(self, text: str) -> tuple[str, Any]:
        return "message", {"role": "assistant", "content": text}

    def delta(self, text: str) -> tuple[str, Any]:
        return "delta", ({"content": text} if text else {})

    def new_logprobs(self) -> list[dict[str, Any]]:
        return []

    def add_logprob(self, acc: Any, ev: TokenEvent, text_before: str, decode: Decode) -> None:
        tok = decode([ev.token])
        acc.append(
            {
                "token": tok,
                "logprob": ev.logprob,
                "bytes": list(tok.encode()),
                "top_logprobs": [
                    {"token": (t := decode([i])), "logprob": lp, "bytes": list(t.encode())}
                    for i, lp in ev.top
                ],
            }
        )

    def logprobs(self, acc: Any) -> Any:
        return {"content": acc}


class _CompletionShape(Shape):
    object = "text_completion"
    chunk_object = "text_completion"
    usage_in_every_chunk = False
    opens_with_role = False
    # kept as it was: a streamed completion counts its completion tokens only
    counts_streamed_prompt = False

    def choice_text(self, text: str) -> tuple[str, Any]:
        return "text", text

    def delta(self, text: str) -> tuple[str, Any]:
        return "text", text

    def new_logprobs(self) -> dict[str, list[Any]]:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add_logprob(self, acc: Any, ev: TokenEvent, text_before: str, decode: Decode) -> None:
        acc["text_offset"].append(len(text_before))
        acc["tokens"].append(decode([ev.token]))
        acc["token_logprobs"].append(ev.logprob)
        acc["top_logprobs"].append({decode([i]): v for i, v in ev.top})


CHAT: Shape = _ChatShape()
COMPLETION: Shape = _CompletionShape()


@dataclass
class Reply:
    """One request's response: its id, time, model and prompt, built from its events.

    ``prefix`` is prepended to every finished choice's text (a completion's ``echo``); with
    ``want_logprobs`` each finished choice carries its log-probabilities, else ``null``.
    """

    shape: Shape
    id_prefix: str
    model: str
    prompt_tokens: int
    n: int
    metrics: Metrics
    decode: Decode
    want_logprobs: bool = False
    prefix: str = ""
    id: str = field(init=False)
    created: int = field(init=False)

    def __post_init__(self) -> None:
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())

    def _count(self, completion_tokens: int, *, prompt: bool = True) -> None:
        self.metrics.served_tokens.labels("completion").inc(completion_tokens)
        if prompt:
            self.metrics.served_tokens.labels("prompt").inc(self.prompt_tokens)

    def json(self, events: Iterator[TokenEvent]) -> dict[str, Any]:
        """The whole (non-streamed) response body."""
        acc = _Collected(self)
        for ev in events:
            acc.add(ev)
        return self._body(acc)

    async def ajson(self, events: AsyncIterator[TokenEvent]) -> dict[str, Any]:
        """:meth:`json` from an async iterator of events."""
        acc = _Collected(self)
        async for ev in events:
            acc.add(ev)
        return self._body(acc)

    def _body(self, acc: _Collected) -> dict[str, Any]:
        self._count(acc.count)
        choices = []
        for i in range(self.n):
            name, value = self.shape.choice_text(self.prefix + acc.texts[i])
            choices.append(
                {
                    "index": i,
                    name: value,
                    "logprobs": self.shape.logprobs(acc.lps[i]) if self.want_logprobs else None,
                    "finish_reason": acc.finish[i] or "length",
                }
            )
        return {
            "id": self.id,
            "object": self.shape.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(self.prompt_tokens, acc.count),
        }

    def _chunk(self, choices: list[dict[str, Any]], *, with_usage: bool, usage_: Any = None) -> str:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": self.shape.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if with_usage:
            obj["usage"] = usage_
        return json.dumps(obj)

    def _opening(self, every: bool) -> Iterator[str]:
        if self.shape.opens_with_role:
            for i in range(self.n):
                role = {"role": "assistant", "content": ""}
                choice = {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
                yield self._chunk([choice], with_usage=every)

    def _event_chunk(self, ev: TokenEvent, every: bool) -> str | None:
        if not (ev.delta or ev.finish_reason):
            return None
        name, value = self.shape.delta(ev.delta)
        choice = {
            "index": ev.index,
            name: value,
            "logprobs": None,
            "finish_reason": ev.finish_reason,
        }
        return self._chunk([choice], with_usage=every)

    def _closing(self, count: int, include_usage: bool) -> Iterator[str]:
        self._count(count, prompt=self.shape.counts_streamed_prompt)
        if include_usage:
            yield self._chunk([], with_usage=True, usage_=usage(self.prompt_tokens, count))

    def _chunks(self, events: Iterator[TokenEvent], include_usage: bool) -> Iterator[str]:
        every = include_usage and self.shape.usage_in_every_chunk  # chat: "usage": null
        yield from self._opening(every)
        count = 0
        for ev in events:
            count += 1
            if (chunk := self._event_chunk(ev, every)) is not None:
                yield chunk
        yield from self._closing(count, include_usage)

    async def _achunks(
        self, events: AsyncIterator[TokenEvent], include_usage: bool
    ) -> AsyncIterator[str]:
        every = include_usage and self.shape.usage_in_every_chunk
        for chunk in self._opening(every):
            yield chunk
        count = 0
        async for ev in events:
            count += 1
            if (text := self._event_chunk(ev, every)) is not None:
                yield text
        for chunk in self._closing(count, include_usage):
            yield chunk

    def stream(
        self, events: Iterator[TokenEvent] | AsyncIterator[TokenEvent], *, include_usage: bool
    ) -> StreamingResponse:
        """The streamed response: one chunk per event that adds text or finishes a choice.
        Async events are streamed on the event loop (no thread per stream)."""
        if isinstance(events, AsyncIterator):
            return sse(self._achunks(events, include_usage))
        return sse(self._chunks(events, include_usage))


class _Collected:
    """A non-streamed response's choices, accumulated event by event."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.texts = [""] * reply.n
        self.finish: list[str | None] = [None] * reply.n
        self.lps = [reply.shape.new_logprobs() for _ in range(reply.n)]
        self.count = 0

    def add(self, ev: TokenEvent) -> None:
        r = self.reply
        if r.want_logprobs:
            r.shape.add_logprob(self.lps[ev.index], ev, self.texts[ev.index], r.decode)
        self.texts[ev.index] += ev.delta
        self.count += 1
        if ev.finish_reason:
            self.finish[ev.index] = ev.finish_reason
