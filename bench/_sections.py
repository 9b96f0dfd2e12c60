"""The one writer of docs/benchmarks.md sections, shared by every benchmark script.

Each benchmark owns the text between its ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
markers; a run replaces only that block (or appends it), so the other benchmarks' results and
any notes outside the markers are kept.
"""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(path: Path, name: str, section: str) -> None:
    """Replace (or append) benchmark ``name``'s marked section of ``path``."""
    start, end = markers(name)
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        a, b = text.find(start), text.find(end)
        if a != -1 and b > a:
            text = text[:a] + block + text[b + len(end) :].lstrip("\n")
        else:
            text = text.rstrip("\n") + "\n\n" + block
    else:
        text = "# Benchmarks\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
