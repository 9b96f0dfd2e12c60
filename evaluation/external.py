"""Demonstrations made outside dpicl (a published peer), scored exactly like dpicl's own.

A *demos file* (``dpicl eval --methods invink --demos-file F``) is JSON:

    {"format": "dpicl-external-demos/1", "method": "invink", "source": "invink==0.1.0",
     "task": "dbpedia", "shots": 4,
     "cells": [{"epsilon": "4", "seed": 0, "demonstrations": [["text", "Company"], ...],
                "info": {...}}]}

Invariants:
- an external row goes through the same scoring call as every other row
  (:func:`evaluation.scoring.score` on the same test rows), after the same
  :func:`prompts.clean_demonstration` dpicl applies to its own demonstrations;
- a cell's cache key carries the SHA-256 of its demonstrations (:func:`digest`), so a new file
  with other texts makes new cells and never reuses a score;
- this module reads a file and nothing else: it imports no peer package (bench/peer_invink.py
  runs the peer in its own venv and writes the file).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prompts import clean_demonstration

__all__ = ["FORMAT", "DemosFile", "ExternalCell", "digest", "load_demos_file"]

FORMAT = "dpicl-external-demos/1"


@dataclass(frozen=True)
class ExternalCell:
    """One (ε, seed) of a demos file: its demonstrations as ``(text, label)`` pairs."""

    epsilon: str
    seed: int
    demonstrations: tuple[tuple[str, str], ...]
    info: dict[str, Any]

    @property
    def digest(self) -> str:
        return digest(self.demonstrations)


@dataclass(frozen=True)
class DemosFile:
    method: str
    source: str
    task: str
    shots: int
    cells: tuple[ExternalCell, ...]

    def find(self, epsilon: str | None, seed: int) -> ExternalCell | None:
        for c in self.cells:
            if c.epsilon == epsilon and c.seed == seed:
                return c
        return None

    def by_digest(self, sha: str) -> ExternalCell:
        for c in self.cells:
            if c.digest == sha:
                return c
        raise KeyError(f"no cell of the demos file has demonstrations {sha[:12]}…")


def digest(demos: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> str:
    """SHA-256 of the demonstrations' canonical JSON (order kept)."""
    blob = json.dumps([list(d) for d in demos], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _eps(value: Any) -> str:
    x = float(value)
    if not x > 0:
        raise ValueError(f"epsilon must be > 0, got {value!r}")
    return "inf" if math.isinf(x) else f"{x:g}"


def load_demos_file(path: Path, labels: tuple[str, ...] | None = None) -> DemosFile:
    """Read and check a demos file. ``labels``: the task's declared demonstration labels (a
    demonstration with another label is refused). Texts are cleaned as dpicl cleans its own.
    Raises ValueError on a malformed file."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a demos file (format {FORMAT!r} expected)")
    try:
        method, source, task = str(raw["method"]), str(raw["source"]), str(raw["task"])
        shots = int(raw["shots"])
        cells: list[ExternalCell] = []
        seen: set[tuple[str, int]] = set()
        for c in raw["cells"]:
            eps, seed = _eps(c["epsilon"]), int(c["seed"])
            if (eps, seed) in seen:
                raise ValueError(f"two cells for ε = {eps}, seed {seed}")
            seen.add((eps, seed))
            demos = tuple((clean_demonstration(str(t)), str(lab)) for t, lab in c["demonstrations"])
            if labels is not None and any(lab not in labels for _, lab in demos):
                raise ValueError(f"ε = {eps}, seed {seed}: a label outside {list(labels)}")
            if len(demos) != shots:
                raise ValueError(
                    f"ε = {eps}, seed {seed}: {len(demos)} demonstrations, the file declares {shots}"
                )
            cells.append(ExternalCell(eps, seed, demos, dict(c.get("info") or {})))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed demos file ({exc!r})") from None
    return DemosFile(method, source, task, shots, tuple(cells))
