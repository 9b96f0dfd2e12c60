"""The Batch API's file formats: an input file's request lines, and the output and error lines.

**Validation (OpenAI's choice: the whole file, up front).** A batch's input file is read once
while the batch is ``validating``; if any line is malformed the batch fails without answering
any line, and ``errors.data`` names every bad line by number (1-based, blank lines counted and
skipped), at most :data:`MAX_LISTED_ERRORS` of them. A line is malformed when it is not a JSON
object, lacks a string ``custom_id`` (or repeats one), its ``method`` is not ``POST``, its
``url`` is not the batch's endpoint, or its ``body`` is not an object (a missing ``method``
is POST, a missing ``url`` the batch's endpoint). What a body *says* (an
unknown model, a bad temperature, ``stream``) is the line's own answer: the 4xx status and
error body the online route would return, in the error file. Messages name line numbers and
fields, never the line's content.

**Output lines** are OpenAI's: ``{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error": null}``; a line that never ran (the batch expired) has
``"response": null`` and ``"error": {"code", "message"}``. A body is serialised exactly as
the online route's JSON response is (:func:`dumps`, Starlette's ``JSONResponse`` settings),
so its bytes inside the line are the bytes the online route would send.

An upload's size, line length and encoding are checked by the server's one set of limits
(:class:`proxy.limits.Limits`: ``max_upload_bytes``, ``max_upload_line_bytes``, the same as a
dataset upload and the same ``dpicl serve --max-upload-…`` flags); this module adds only what
is particular to batch files (no NUL byte, :data:`MAX_BATCH_LINES`).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from proxy.answering import ENDPOINTS, Answer
from proxy.errors import APIError
from proxy.limits import DEFAULT_LIMITS, Limits
from proxy.storage.batches import LineResult

__all__ = [
    "MAX_BATCH_LINES",
    "MAX_LISTED_ERRORS",
    "InputLine",
    "batch_error",
    "check_upload",
    "dumps",
    "expired_line",
    "output_line",
    "parse_input",
]

MAX_BATCH_LINES = 50_000
"""The most requests in one batch (OpenAI's bound)."""
MAX_LISTED_ERRORS = 100


@dataclass(frozen=True)
class InputLine:
    """One request of an input file: its 1-based line number, ``custom_id``, ``url`` and
    ``body`` (a JSON object, not yet validated against the endpoint's schema)."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


def dumps(value: Any) -> str:
    """JSON as the online routes send it (Starlette's ``JSONResponse``: compact, UTF-8)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def check_upload(data: bytes, limits: Limits = DEFAULT_LIMITS) -> None:
    """An upload's bytes are storable: within ``limits``' size (413) and line length (400,
    naming the first long line), UTF-8 (400) and without a NUL byte (400)."""
    limits.upload_lines(data)
    if b"\x00" in data:
        raise APIError(400, "The file must be UTF-8 JSONL (it holds a NUL byte).", param="file")


def batch_error(
    code: str, message: str, *, param: str | None = None, line: int | None = None
) -> dict[str, Any]:
    """One item of a failed batch's ``errors.data`` (OpenAI's shape)."""
    return {"code": code, "message": message, "param": param, "line": line}


def _error(line: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return batch_error(code, f"Line {line}: {message}", param=param, line=line)


def _check_line(number: int, raw: str, endpoint: str | None) -> InputLine | dict[str, Any]:
    """The request on line ``number``, or the OpenAI ``errors.data`` item that refuses it."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return _error(number, "invalid_json_line", "this line is not valid JSON.")
    if not isinstance(obj, dict):
        return _error(number, "invalid_json_line", "this line is not a JSON object.")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _error(
            number, "missing_custom_id", "custom_id must be a non-empty string.", "custom_id"
        )
    if obj.get("method", "POST") != "POST":
        return _error(number, "invalid_method", "method must be POST.", "method")
    url = obj.get("url", endpoint)
    if endpoint is not None and url != endpoint:
        return _error(
            number, "mismatched_endpoint", f"url must be the batch's endpoint {endpoint}.", "url"
        )
    if url not in ENDPOINTS:
        return _error(number, "invalid_url", "url must be one of " + ", ".join(ENDPOINTS), "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return _error(number, "invalid_body", "body must be a JSON object.", "body")
    return InputLine(number, custom_id, str(url), body)


def parse_input(data: bytes, endpoint: str | None) -> tuple[list[InputLine], list[dict[str, Any]]]:
    """The requests of an input file and the errors that refuse it (empty when it is valid).
    ``endpoint`` is the batch's (every line must name it); None accepts either endpoint."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [batch_error("invalid_file", "The file is not UTF-8.")]
    lines: list[InputLine] = []
    errors: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        checked = _check_line(number, raw, endpoint)
        if isinstance(checked, InputLine) and checked.custom_id in seen:
            checked = _error(
                number,
                "duplicate_custom_id",
                f"custom_id repeats the one on line {seen[checked.custom_id]}.",
                "custom_id",
            )
        if isinstance(checked, InputLine):
            seen[checked.custom_id] = number
            lines.append(checked)
        elif len(errors) < MAX_LISTED_ERRORS:
            errors.append(checked)
    if not lines and not errors:
        errors.append(batch_error("empty_file", "The file holds no requests."))
    if len(lines) > MAX_BATCH_LINES:
        limit = f"A batch holds at most {MAX_BATCH_LINES} requests."
        errors.append(batch_error("too_many_requests", limit))
    return lines, errors


def output_line(line: InputLine, answer: Answer) -> LineResult:
    """The output (2xx) or error line of an answered request."""
    record = {
        "id": "batch_req_" + secrets.token_hex(12),
        "custom_id": line.custom_id,
        "response": {
            "status_code": answer.status,
            "request_id": "req_" + secrets.token_hex(12),
            "body": answer.body,
        },
        "error": None,
    }
    return LineResult(line.line, 200 <= answer.status < 300, dumps(record))


def expired_line(line: InputLine) -> LineResult:
    """The error line of a request the batch did not reach before its window closed."""
    record = {
        "id": "batch_req_" + secrets.token_hex(12),
        "custom_id": line.custom_id,
        "response": None,
        "error": {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        },
    }
    return LineResult(line.line, False, dumps(record))
