"""What a client may send: the documented limits, enforced before any work is done.

One frozen :class:`Limits` holds every limit (defaults below; ``dpicl serve --max-...`` flags or
``DPICL_MAX_...`` environment variables change them, :func:`add_arguments` /
:func:`from_args`). They are checked in this order, each before anything costlier:

1. **Bytes on the wire** (:class:`BodyLimit`, an ASGI middleware): a declared
   ``Content-Length`` above the route's limit is refused before a byte is read, and the
   running count of a body (chunked transfer included) is checked on every chunk *while it is
   read*, before any JSON parsing; a body is never buffered past its limit. The limit is
   :attr:`Limits.max_body_bytes`, or :attr:`Limits.max_upload_bytes` (plus multipart framing)
   on the upload routes (:data:`UPLOAD_PATHS`).
2. **Shape and characters** (:meth:`Limits.check_chat`, :meth:`Limits.check_completion`):
   number of messages, characters per message and in the whole prompt, stop sequences,
   ``n``, log-probabilities. The static ceilings (:data:`CEILINGS`) are also the schema's
   bounds (:mod:`proxy.schemas`); a configured limit may only be lower.
3. **Tokens** (:meth:`Limits.check_tokens`), only after 1 and 2 have bounded the text: the
   prompt's tokens plus ``max_tokens`` against the engine's context.

Uploads (``/v1/private/datasets``, and ``/v1/files`` of the batch API) use
:meth:`Limits.check_upload` and :meth:`Limits.upload_lines` (size, line length, UTF-8).

Every refusal is an :class:`~proxy.errors.APIError` (400, or 413 for sizes) in OpenAI's shape
with ``param`` naming the field and a ``code`` (:data:`REQUEST_TOO_LARGE`, ...); messages
state the limit and never quote the content.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import MutableMapping
from dataclasses import dataclass, fields
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import APIError

__all__ = [
    "CEILINGS",
    "CONTEXT_LENGTH_EXCEEDED",
    "DEFAULT_LIMITS",
    "FILE_TOO_LARGE",
    "LINE_TOO_LONG",
    "REQUEST_TOO_LARGE",
    "TOO_MANY_MESSAGES",
    "UPLOAD_PATHS",
    "BodyLimit",
    "Limits",
    "add_arguments",
    "from_args",
]

REQUEST_TOO_LARGE = "request_too_large"
FILE_TOO_LARGE = "file_too_large"
LINE_TOO_LONG = "line_too_long"
TOO_MANY_MESSAGES = "too_many_messages"
MESSAGE_TOO_LONG = "message_too_long"
PROMPT_TOO_LONG = "prompt_too_long"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
LIMIT_EXCEEDED = "limit_exceeded"

UPLOAD_PATHS = ("/v1/private/datasets", "/v1/files")
"""Routes whose body is a multipart upload: their byte limit is ``max_upload_bytes`` plus
:data:`MULTIPART_SLACK` (the form's other fields and the part headers)."""

MULTIPART_SLACK = 64 * 1024

CEILINGS = {
    "max_tokens": 4096,
    "n": 8,
    "stop_sequences": 4,
    "top_logprobs": 20,
    "completion_logprobs": 5,
}
"""The API's own ceilings (the schema's bounds, :mod:`proxy.schemas`); limits may be lower."""

_DRAIN_BYTES = 256 * 1024 * 1024
"""After refusing a body, up to this many further bytes are read and discarded (never kept), so
the client, still sending, reads the 413 instead of a reset connection."""


def _too_large(what: str, limit: int, param: str | None, code: str) -> APIError:
    return APIError(
        413, f"{what} is larger than the limit of {limit} bytes.", param=param, code=code
    )


def _over(param: str, limit: int, unit: str, code: str = LIMIT_EXCEEDED) -> APIError:
    return APIError(400, f"'{param}' exceeds the limit of {limit} {unit}.", param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """The limits of one server (see the module docstring for where each is checked)."""

    max_body_bytes: int = 2 * 1024 * 1024
    """A request body (JSON), in bytes."""
    max_messages: int = 256
    """Messages in one chat request."""
    max_message_chars: int = 131_072
    """Characters of one chat message (its text parts together)."""
    max_prompt_chars: int = 262_144
    """Characters of a whole prompt: all messages, or a completion's prompt."""
    max_tokens: int = CEILINGS["max_tokens"]
    """``max_tokens`` / ``max_completion_tokens`` (and never past the engine's context)."""
    max_n: int = CEILINGS["n"]
    """Choices per request (``n``)."""
    max_stop_sequences: int = CEILINGS["stop_sequences"]
    """Stop sequences per request."""
    max_stop_chars: int = 256
    """Characters of one stop sequence."""
    max_top_logprobs: int = CEILINGS["top_logprobs"]
    """Chat ``top_logprobs``."""
    max_completion_logprobs: int = CEILINGS["completion_logprobs"]
    """Completions ``logprobs``."""
    max_upload_bytes: int = 64 * 1024 * 1024
    """One uploaded file (datasets, and the batch API's ``/v1/files``), in bytes."""
    max_upload_line_bytes: int = 1024 * 1024
    """One line of an uploaded JSONL file, in bytes."""
    max_upload_records: int = 500_000
    """Records of one uploaded dataset."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer")
        pairs = (
            ("max_tokens", "max_tokens"),
            ("max_n", "n"),
            ("max_stop_sequences", "stop_sequences"),
            ("max_top_logprobs", "top_logprobs"),
            ("max_completion_logprobs", "completion_logprobs"),
        )
        for name, ceiling in pairs:
            if getattr(self, name) > CEILINGS[ceiling]:
                raise ValueError(f"{name} may not exceed {CEILINGS[ceiling]}")
        if self.max_message_chars > self.max_prompt_chars:
            raise ValueError("max_message_chars may not exceed max_prompt_chars")

    # -- bytes -------------------------------------------------------------------------------

    def body_limit(self, path: str) -> int:
        """The byte limit of a request body on ``path``."""
        if path.rstrip("/") in UPLOAD_PATHS:
            return self.max_upload_bytes + MULTIPART_SLACK
        return self.max_body_bytes

    def check_upload(self, size: int, param: str = "file") -> None:
        """413 ``file_too_large`` for an uploaded file of ``size`` bytes over the limit."""
        if size > self.max_upload_bytes:
            raise _too_large("The file", self.max_upload_bytes, param, FILE_TOO_LARGE)

    def upload_lines(self, raw: bytes, param: str = "file") -> list[str]:
        """An uploaded JSONL file's lines (``str.splitlines``), after checking its size, that
        every ``\\n``-separated line fits :attr:`max_upload_line_bytes` (400 ``line_too_long``
        naming the line number) and that it is UTF-8 (400)."""
        self.check_upload(len(raw), param)
        start, lineno, limit = 0, 1, self.max_upload_line_bytes
        while start < len(raw):
            end = raw.find(b"\n", start)
            end = len(raw) if end < 0 else end
            if end - start > limit:
                raise APIError(
                    400,
                    f"Line {lineno} of the file is longer than the limit of {limit} bytes.",
                    param=param,
                    code=LINE_TOO_LONG,
                )
            start, lineno = end + 1, lineno + 1
        try:
            return raw.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise APIError(400, "The file must be UTF-8 JSONL.", param=param) from None

    # -- shape and characters ----------------------------------------------------------------

    def _check_sampling(
        self,
        body: Any,
        max_tokens: int | None,
        max_tokens_param: str,
    ) -> None:
        if max_tokens is not None and max_tokens > self.max_tokens:
            raise _over(max_tokens_param, self.max_tokens, "tokens")
        if body.n > self.max_n:
            raise _over("n", self.max_n, "choices")
        stops = body.stop_list()
        if len(stops) > self.max_stop_sequences:
            raise _over("stop", self.max_stop_sequences, "sequences")
        if any(len(s) > self.max_stop_chars for s in stops):
            raise _over("stop", self.max_stop_chars, "characters per sequence")

    def check_chat(self, body: Any) -> None:
        """Messages, characters, sampling fields of a chat request (400 on the first excess).
        ``body``: a :class:`proxy.schemas.ChatCompletionRequest` (not imported: the schemas
        import this module)."""
        messages = body.messages
        if len(messages) > self.max_messages:
            raise _over("messages", self.max_messages, "messages", TOO_MANY_MESSAGES)
        total = 0
        for i, m in enumerate(messages):
            chars = _message_chars(m.content)
            if chars > self.max_message_chars:
                raise _over(
                    f"messages.{i}.content", self.max_message_chars, "characters", MESSAGE_TOO_LONG
                )
            total += chars
        if total > self.max_prompt_chars:
            raise _over("messages", self.max_prompt_chars, "characters in all", PROMPT_TOO_LONG)
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        self._check_sampling(body, body.max_completion_tokens or body.max_tokens, param)
        if body.top_logprobs is not None and body.top_logprobs > self.max_top_logprobs:
            raise _over("top_logprobs", self.max_top_logprobs, "log-probabilities")

    def check_completion(self, body: Any) -> None:
        """Characters and sampling fields of a completions request (400 on the first excess);
        ``body``: a :class:`proxy.schemas.CompletionRequest`."""
        if len(body.prompt_text()) > self.max_prompt_chars:
            raise _over("prompt", self.max_prompt_chars, "characters", PROMPT_TOO_LONG)
        self._check_sampling(body, body.max_tokens, "max_tokens")
        if body.logprobs is not None and body.logprobs > self.max_completion_logprobs:
            raise _over("logprobs", self.max_completion_logprobs, "log-probabilities")

    # -- tokens ------------------------------------------------------------------------------

    @staticmethod
    def check_tokens(
        prompt_tokens: int, max_tokens: int | None, default: int, context: int | None, param: str
    ) -> int:
        """The completion's token budget: ``max_tokens`` if given (400 when prompt + it exceed
        ``context``), else ``default`` cut to what the context leaves; 400
        ``context_length_exceeded`` when the prompt alone fills the context."""
        if context is None:
            return max_tokens or default
        if prompt_tokens >= context:
            raise APIError(
                400,
                f"The prompt is {prompt_tokens} tokens; this model's context is {context} "
                "tokens, prompt and completion together.",
                param=param,
                code=CONTEXT_LENGTH_EXCEEDED,
            )
        room = context - prompt_tokens
        if max_tokens is None:
            return min(default, room)
        if max_tokens > room:
            raise APIError(
                400,
                f"The prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceed this "
                f"model's context of {context} tokens.",
                param="max_tokens",
                code=CONTEXT_LENGTH_EXCEEDED,
            )
        return max_tokens


def _message_chars(content: str | list[dict[str, Any]] | None) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    total = 0
    for part in content:
        text = part.get("text")
        total += len(text) if isinstance(text, str) else 0
    return total


DEFAULT_LIMITS = Limits()


# -- configuration ---------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "DPICL_" + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--max-...`` flag per limit (default: ``$DPICL_MAX_...``, else the built-in)."""
    group = parser.add_argument_group("request limits (docs: README, Limits)")
    for f in fields(Limits):
        default = getattr(DEFAULT_LIMITS, f.name)
        group.add_argument(
            _flag(f.name),
            type=int,
            default=None,
            metavar="N",
            help=f"default ${_env(f.name)} or {default}",
        )


def from_args(args: argparse.Namespace, environ: MutableMapping[str, str] | None = None) -> Limits:
    """The limits named by ``args`` (flags), else the environment, else the defaults;
    ValueError naming the flag or variable for a bad value."""
    env = os.environ if environ is None else environ
    values: dict[str, int] = {}
    for f in fields(Limits):
        flag = getattr(args, f.name, None)
        if flag is not None:
            values[f.name] = flag
        elif _env(f.name) in env:
            try:
                values[f.name] = int(env[_env(f.name)])
            except ValueError:
                raise ValueError(f"${_env(f.name)} must be an integer") from None
    return dataclasses.replace(DEFAULT_LIMITS, **values)


# -- the body's bytes, while it is read --------------------------------------------------------


class _BodyTooLarge(Exception):
    """Internal: raised from ``receive`` once the running count passes the limit (FastAPI
    turns it into a 400 while parsing; :class:`BodyLimit` drops that answer and sends 413)."""


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain(receive: Receive, budget: int) -> None:
    """Read and discard the rest of a refused body (at most ``budget`` bytes), keeping none."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimit:
    """ASGI middleware: 413 ``request_too_large`` for a body over :meth:`Limits.body_limit`,
    decided from ``Content-Length`` before reading, else on the chunk that passes the limit;
    the app's own answer to an aborted body is replaced by the 413."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.body_limit(str(scope.get("path", "")))
        refusal = _too_large("The request body", limit, None, REQUEST_TOO_LARGE)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            if declared <= _DRAIN_BYTES:
                await _drain(receive, declared)
            await refusal.response()(scope, receive, send)
            return
        seen = 0
        over = False

        async def counted() -> Message:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    if message.get("more_body", False):
                        await _drain(receive, _DRAIN_BYTES)
                    raise _BodyTooLarge
            return message

        async def guarded(message: Message) -> None:
            if not over:  # the app's reply to a body it never got whole is dropped
                await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:  # _BodyTooLarge, or the app's wrapping of it, ends here
                raise
        if over:
            await refusal.response()(scope, receive, send)
