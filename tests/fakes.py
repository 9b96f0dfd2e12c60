"""A deterministic in-memory engine for tests of the generation loop (no model needed), and
the small fixtures those tests share: a draw-counting generator, a two-label pool and a tiny
evaluation grid."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dp_decoding.records import Record, record_unit

VOCAB = 64
NEWLINE = 10
EOS = 0


def _row_logprobs(seq: Sequence[int]) -> np.ndarray:
    h = hashlib.sha256(np.asarray(seq, dtype=np.int64).tobytes()).digest()
    g = np.random.default_rng(int.from_bytes(h[:8], "big"))
    logits = g.normal(0.0, 2.0, size=VOCAB)
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


class FakeBatch:
    def __init__(self, engine: FakeEngine, prompts: Sequence[Sequence[int]]) -> None:
        self.engine = engine
        self.seqs = [list(p) for p in prompts]
        self.calls = 0
        self.closed = False

    @property
    def rows(self) -> int:
        return len(self.seqs)

    def logprobs(self, candidates=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        assert not self.closed
        self.engine.logprob_calls += 1
        self.calls += 1
        lp = np.stack([_row_logprobs(s) for s in self.seqs])
        return lp if candidates is None else lp[:, np.asarray(candidates)]

    def append(self, tokens: Sequence[int]) -> None:
        assert not self.closed and len(tokens) == self.rows
        for s, t in zip(self.seqs, tokens, strict=True):
            s.append(int(t))

    def close(self) -> None:
        self.closed = True


class FakeEngine:
    """Tokenizes by characters (mod the vocabulary); records every batch it starts."""

    name = "fake"
    vocab_size = VOCAB
    eos_token_ids = frozenset({EOS})

    def __init__(self) -> None:
        self.started: list[list[list[int]]] = []
        self.widths: list[int | None] = []
        self.batches: list[FakeBatch] = []
        self.logprob_calls = 0

    def tokenize(self, text: str) -> list[int]:
        return [NEWLINE if c == "\n" else 1 + (ord(c) % (VOCAB - 1)) for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join("\n" if t == NEWLINE else chr(ord("a") + t % 26) for t in token_ids)

    def start(self, prompts: Sequence[Sequence[int]], *, width: int | None = None) -> FakeBatch:
        """Records the rows; with ``width`` (private batches) every row must fit in it."""
        assert width is None or all(len(p) <= width for p in prompts), "row over its width"
        self.widths.append(width)
        self.started.append([list(p) for p in prompts])
        self.batches.append(FakeBatch(self, prompts))
        return self.batches[-1]


class CountingRng:
    """A seeded ``numpy`` Generator that counts every draw by method name (``draws["gumbel"]``,
    ``draws["normal"]``, ``draws["geometric"]``, ...): the noise a generation loop consumed."""

    def __init__(self, seed: int = 3) -> None:
        self.inner = np.random.default_rng(seed)
        self.draws: Counter[str] = Counter()

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        method = getattr(self.inner, name)

        def counted(*a, **k):  # type: ignore[no-untyped-def]
            self.draws[name] += 1
            return method(*a, **k)

        return counted


def two_label_records(n: int) -> list[Record]:
    """``n`` one-record units, labels alternating A and B."""
    return [
        Record(f"text {i}", "AB"[i % 2], record_unit(f"text {i}", "AB"[i % 2], None))
        for i in range(n)
    ]


def tiny_eval_config(data_dir: Path, out: Path, **kw: Any) -> Any:
    """A TREC grid of ε ∈ {1, ∞} on 5 test rows at 4 shots (quiet); ``kw`` sets the rest."""
    from dp_decoding.evaluation.runner import EvalConfig

    base: dict[str, Any] = {"seeds": 1, "test_rows": 5, "shots": [4], "quiet": True}
    return EvalConfig(
        tasks=["trec"], data_dir=data_dir, epsilons=[1.0, math.inf], out=out, **{**base, **kw}
    )
