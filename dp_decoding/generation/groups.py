"""The units of work of a generation job: demonstrations, their groups, public progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Demonstration:
    label: str
    text: str
    tokens: int

    def to_dict(self) -> dict[str, str]:
        return {"label": self.label, "text": self.text}


@dataclass
class Progress:
    """Public progress figures only (no count of private records)."""

    demonstrations_total: int
    demonstrations_done: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


ProgressCallback = Callable[[Progress], None]


@dataclass
class Group:
    """One demonstration being generated: its M private prompts and its public prompt.

    ``generated`` holds the released tokens only; ``gate_threshold`` and ``private_tokens``
    are the gate's state (never leave the generation package)."""

    label: str
    index: int
    prompts: list[list[int]]  # fixed regime: the M private prompts (token ids)
    public: list[int]
    generated: list[int] = field(default_factory=list)
    done: bool = False
    gate_threshold: float | None = None  # the open AboveThreshold instance's noisy threshold
    private_tokens: int = 0  # gate "above" answers so far (never leaves this package)


def columns(lp: np.ndarray, cand: np.ndarray | None, cols: np.ndarray | None) -> np.ndarray:
    """The group's candidate columns: from a union-of-candidates array (``cols``), or picked
    out of a full-vocabulary array (``cand``), or everything (full-vocabulary candidates)."""
    if cols is not None:
        return lp[:, cols]
    return lp if cand is None else lp[:, cand]
