"""A deterministic in-memory engine, shipped for tests the way httpx ships ``MockTransport``.

Runs the whole generation core without a model: tokens are characters (mod the vocabulary),
and a row's next-token log-probabilities are a pseudo-random function of the row's own token
ids (SHA-256 of the sequence seeds them). So each row depends on its own prompt alone (row
independence holds by construction) and a run is reproducible for a fixed noise source.
It records what it was asked: every batch's rows (``started``), declared widths (``widths``),
the batches themselves and the number of ``logprobs`` calls. Serving batches
(``start_serving``, continuous batching) are recorded apart, in ``serving_started``, and each
of their decode steps' rows in ``serving_steps``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from dp_decoding.engines.base import ResizableBatch

VOCAB = 64
NEWLINE = 10
EOS = 0


def _row_logprobs(seq: Sequence[int]) -> np.ndarray:
    h = hashlib.sha256(np.asarray(seq, dtype=np.int64).tobytes()).digest()
    g = np.random.default_rng(int.from_bytes(h[:8], "big"))
    logits = g.normal(0.0, 2.0, size=VOCAB)
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


class FakeBatch:
    """The rows of one ``start`` call; ``logprobs`` reads every row, ``append`` extends them."""

    def __init__(self, engine: FakeEngine, prompts: Sequence[Sequence[int]]) -> None:
        self.engine = engine
        self.seqs = [list(p) for p in prompts]
        self.calls = 0
        self.closed = False

    @property
    def rows(self) -> int:
        return len(self.seqs)

    def logprobs(self, candidates: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
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


class FakeServingBatch(FakeBatch):
    """A serving batch: rows join (``merge``) and leave (``keep``) between steps."""

    def __init__(self, engine: FakeEngine, prompts: Sequence[Sequence[int]]) -> None:
        super().__init__(engine, prompts)
        self.prompts = [tuple(p) for p in prompts]  # which prompt each row started from

    def merge(self, other: ResizableBatch) -> None:
        assert isinstance(other, FakeServingBatch) and not self.closed and not other.closed
        self.seqs += other.seqs
        self.prompts += other.prompts
        other.close()

    def keep(self, rows: Sequence[int]) -> None:
        assert not self.closed
        self.seqs = [self.seqs[i] for i in rows]
        self.prompts = [self.prompts[i] for i in rows]

    def append(self, tokens: Sequence[int]) -> None:
        super().append(tokens)
        self.engine.serving_steps.append(list(self.prompts))


class FakeEngine:
    """Tokenizes by characters (mod the vocabulary); records every batch it starts."""

    name = "fake"
    vocab_size = VOCAB
    eos_token_ids = frozenset({EOS})
    supports_continuous_batching = True

    def __init__(self) -> None:
        self.started: list[list[list[int]]] = []
        self.widths: list[int | None] = []
        self.batches: list[FakeBatch] = []
        self.logprob_calls = 0
        self.serving_started: list[list[list[int]]] = []
        self.serving_steps: list[list[tuple[int, ...]]] = []

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

    def start_serving(self, prompts: Sequence[Sequence[int]]) -> FakeServingBatch:
        """A serving batch (recorded in ``serving_started``, never in ``started``)."""
        self.serving_started.append([list(p) for p in prompts])
        return FakeServingBatch(self, prompts)
