"""Private records and their loading from JSONL.

Error messages name the line number and the problem, never the line's content: a curator sees
them, but errors may end up in logs, and private text must not (docs/ARCHITECTURE.md §1).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Malformed private data; the message holds a line number, never record content."""


@dataclass(frozen=True)
class Record:
    """One private example. ``unit`` is the privacy unit's id: the user id when records carry
    one, otherwise a stable id of the record itself (its content)."""

    text: str
    label: str
    unit: str


def record_unit(text: str, label: str, user: str | None) -> str:
    if user is not None:
        return "user:" + user
    return "record:" + json.dumps([label, text], ensure_ascii=False)


def parse_jsonl_lines(
    lines: Iterable[str],
    text_field: str = "text",
    label_field: str = "label",
    user_field: str | None = "user",
    max_records: int | None = None,
) -> Iterator[Record]:
    """Yield records; raise :class:`DataError` at the first malformed line (1-based)."""
    count = 0
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"line {lineno}: expected a JSON object")
        text = obj.get(text_field)
        label = obj.get(label_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"line {lineno}: field {text_field!r} must be a non-empty string")
        if isinstance(label, (int, float)) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str) or not label.strip():
            raise DataError(f"line {lineno}: field {label_field!r} must be a non-empty string")
        user = obj.get(user_field) if user_field else None
        if user is not None and not isinstance(user, (str, int)):
            raise DataError(f"line {lineno}: field {user_field!r} must be a string or integer")
        user_s = None if user is None else str(user)
        count += 1
        if max_records is not None and count > max_records:
            raise DataError(f"more than {max_records} records")
        yield Record(text=text.strip(), label=label.strip(), unit=record_unit(text, label, user_s))


def load_jsonl(path: str | Path, **kwargs: Any) -> list[Record]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        with p.open(encoding="utf-8") as fh:
            return list(parse_jsonl_lines(fh, **kwargs))
    except UnicodeDecodeError:
        raise DataError(f"{p}: not UTF-8 text") from None
