"""The engine protocol: what the private generation core needs from an LLM engine.

An engine turns token ids into next-token log-probabilities for a *batch* of sequences and
extends all of them by one token per step. The protocol is deliberately small so the core
runs unchanged on the embedded transformers engine, on vLLM and on an upstream HTTP server.

Invariants every implementation keeps:
- ``Batch.logprobs`` returns one float array of shape ``[rows, V]`` (or ``[rows, K]`` when a
  candidate id list is given) holding log-probabilities normalised over the *full* vocabulary,
  for the next token of every live row, from one engine call for the whole batch.
- ``Batch.append`` extends every row by exactly one token and reuses the rows' cached state
  (a step costs one batched decode, not a re-prefill).
- Separate ``start`` calls are separate engine calls: a public prompt is never batched together
  with private prompts (kernels are not batch-invariant, docs/ARCHITECTURE.md §7).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Batch(Protocol):
    """A set of sequences advanced in lockstep by one engine."""

    @property
    def rows(self) -> int: ...

    def logprobs(self, candidates: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Next-token log-probabilities of every row (full-vocabulary normalised)."""
        ...

    def append(self, tokens: Sequence[int]) -> None:
        """Extend row ``i`` by ``tokens[i]`` (one token per row)."""
        ...

    def close(self) -> None:
        """Release cached state (KV cache); the batch is unusable afterwards."""
        ...


@runtime_checkable
class Engine(Protocol):
    """A loaded model plus its tokenizer."""

    name: str
    vocab_size: int
    eos_token_ids: frozenset[int]

    def tokenize(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def start(self, prompts: Sequence[Sequence[int]], *, width: int | None = None) -> Batch:
        """Prefill ``prompts`` (token ids, no padding) as one batch.

        ``width`` (private batches): every row is padded to exactly ``width`` tokens before
        the engine sees it, so the shapes, the scheduling and the kernels of the call depend on
        the declared width only, never on the prompts' own lengths (row independence, see
        :func:`check_prompts`)."""
        ...


def check_prompts(prompts: Sequence[Sequence[int]], width: int | None) -> None:
    """Refuse an empty batch, an empty row, or (with ``width``) a row longer than ``width``.

    The messages carry no length: a private row's length is private."""
    if not prompts:
        raise ValueError("start() needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if width is not None and any(len(p) > width for p in prompts):
        raise ValueError("a prompt is longer than the batch's declared width")
