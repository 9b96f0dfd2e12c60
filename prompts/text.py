"""Plain-text helpers shared by every prompt builder.

Invariants:
- ``one_line`` output never contains a line break, so a record can never break the line-based
  prompt layout or hit the generation stop string early.
- ``clean_demonstration`` output never contains a line break and has no surrounding whitespace.
- ``truncate_words(text, n)`` keeps at most ``n`` whitespace-separated words and returns ``text``
  unchanged when it already has ``n`` words or fewer.
"""

from __future__ import annotations

import re

STOP_STRINGS: tuple[str, ...] = ("\n",)
"""Generation of one demonstration stops once the generated text contains one of these."""

_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")
_QUOTE_PAIRS: tuple[tuple[str, str], ...] = (
    ('"', '"'),
    ("'", "'"),
    ("\u201c", "\u201d"),
    ("\u2018", "\u2019"),
    ("`", "`"),
)
_LONE_OK = frozenset({'"', "\u201c"})
_WORD = re.compile(r"\S+")


def one_line(text: str) -> str:
    """Replace every run of line breaks with one space and strip surrounding whitespace."""
    return _LINE_BREAKS.sub(" ", text).strip()


def _strip_quotes(text: str) -> str:
    """Remove quotes around ``text`` until none are left.

    A matched pair is removed when neither quote character occurs inside. A lone double quote at
    one end is removed when it occurs nowhere else (a continuation cut at the newline often keeps
    only the opening one); lone apostrophes are kept (``players'``).
    """
    changed = True
    while changed and text:
        changed = False
        for left, right in _QUOTE_PAIRS:
            inner = text[len(left) : -len(right)]
            if (
                len(text) >= len(left) + len(right)
                and text.startswith(left)
                and text.endswith(right)
                and left not in inner
                and right not in inner
            ):
                text, changed = inner.strip(), True
                break
            if left not in _LONE_OK:
                continue
            if text.startswith(left) and left not in text[1:] and right not in text[1:]:
                text, changed = text[1:].strip(), True
                break
            if text.endswith(right) and left not in text[:-1] and right not in text[:-1]:
                text, changed = text[:-1].strip(), True
                break
    return text


def clean_demonstration(text: str) -> str:
    """Turn a raw generated continuation into a demonstration text.

    Cuts at the first line break, strips whitespace and surrounding quotes. Idempotent.
    """
    first = _LINE_BREAKS.split(text, maxsplit=1)[0]
    return _strip_quotes(first.strip())


def truncate_words(text: str, max_words: int) -> str:
    """Keep the first ``max_words`` whitespace-separated words of ``text``.

    Spacing inside the kept part is preserved; trailing whitespace after the last kept word is
    dropped. Raises ``ValueError`` when ``max_words`` is negative.
    """
    if max_words < 0:
        raise ValueError(f"max_words must be >= 0, got {max_words}")
    end = 0
    for i, match in enumerate(_WORD.finditer(text)):
        if i == max_words:
            return text[:end]
        end = match.end()
    return text
