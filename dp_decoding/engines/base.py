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
- Separate ``start`` calls are separate engine calls: in the step loop a public prompt is never
  batched together with private prompts (kernels are not batch-invariant; a shared batch would
  pad it to the private width, docs/ARCHITECTURE.md §7). Design 2 with public rows
  (:class:`InEnginePublicRows`) is the exception, argued in §7.

Beyond :class:`Engine` (what every engine has), each optional ability is its own small
runtime-checkable protocol, tested with ``isinstance`` (never ``getattr``):
:class:`ChatTemplating` (serving), :class:`PublicBatches` (the engine must be told which
batch holds only the public prompt), :class:`InEngineAggregation` (design 2),
:class:`Describable` (facts for the released output), :class:`Closable`, :class:`Locking`
(engine calls serialised by a lock a server may replace), :class:`ContextLimited` and
:class:`ContinuousBatching` (serving batches whose rows join and leave between decode steps).
:mod:`dp_decoding.engines.fake` ships a deterministic engine for tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

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


@runtime_checkable
class ChatTemplating(Protocol):
    """Chat messages → prompt token ids with the model's chat template (serving only)."""

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]: ...


@runtime_checkable
class PublicBatches(Protocol):
    """An engine that must be told which batch holds only the data-free public prompt
    (``start(..., public=True)``), e.g. because it refuses full-vocabulary reads of private
    batches. Used only when ``marks_public_batches`` is true."""

    marks_public_batches: bool

    def start(
        self, prompts: Sequence[Sequence[int]], *, public: bool = False, width: int | None = None
    ) -> Batch: ...


class AggregatedGroup(Protocol):
    """One group's result of in-engine aggregation: the released tokens, in order."""

    @property
    def tokens(self) -> list[int]: ...


@runtime_checkable
class InEngineAggregation(Protocol):
    """Design 2: aggregation inside the engine, one ``choose(scores)`` draw per (group,
    position) made by the caller's mechanism. Used only when ``supports_in_engine_aggregation``
    is true. A group whose rows lose lockstep stops without a draw and returns the tokens
    released so far (the caller continues it by the step loop)."""

    supports_in_engine_aggregation: bool

    def generate_aggregated(
        self,
        groups: Sequence[Sequence[Sequence[int]]],
        choose: Callable[[np.ndarray], int],
        *,
        candidates: Sequence[int] | np.ndarray | None,
        is_stop: Callable[[int], bool],
        max_tokens: int,
        width: int | None = None,
    ) -> Sequence[AggregatedGroup]: ...


@runtime_checkable
class InEnginePublicRows(Protocol):
    """Design 2 with a public row per group (``supports_public_rows``): ``publics`` holds each
    group's data-free public prompt, run as one more row of the group, and ``step`` (a
    :class:`~dp_decoding.engines.vllm_aggregate.PublicStep`) makes each position's one
    decision from the public row and the private rows, as the step loop does. So public top-k
    and top-k+ candidates, the public prior, the gate and the clipped mechanism run inside the
    engine too."""

    supports_public_rows: bool

    def generate_aggregated(
        self,
        groups: Sequence[Sequence[Sequence[int]]],
        choose: Callable[[np.ndarray], int],
        *,
        candidates: Sequence[int] | np.ndarray | None,
        is_stop: Callable[[int], bool],
        max_tokens: int,
        width: int | None = None,
        publics: Sequence[Sequence[int]] | None = None,
        step: Any = None,
    ) -> Sequence[AggregatedGroup]: ...


@runtime_checkable
class Describable(Protocol):
    """Public facts about how the engine computed its values (released with the output)."""

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class Closable(Protocol):
    """Holds resources (clients, processes) released by ``close()``."""

    def close(self) -> None: ...


@runtime_checkable
class Locking(Protocol):
    """Serialises its engine calls with ``with self.lock``. A server that interleaves serving
    and private steps hands its own lock over with :meth:`use_lock` before any engine call."""

    lock: AbstractContextManager[Any]

    def use_lock(self, lock: AbstractContextManager[Any]) -> None:
        """Serialise every later engine call with ``lock`` instead of the engine's own."""
        ...


@runtime_checkable
class ResizableBatch(Batch, Protocol):
    """A *serving* batch whose rows join and leave between decode steps (continuous batching).

    Only serving (public) rows: a private batch is never merged or resized, and a serving
    batch never holds a private row (the phase separation of docs/ARCHITECTURE.md §7)."""

    def merge(self, other: ResizableBatch) -> None:
        """Append ``other``'s rows (prefilled by their own engine call) after this batch's rows;
        ``other`` is consumed. Each row's next-token log-probabilities are kept."""
        ...

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices, in order), freeing the others' cached state."""
        ...


@runtime_checkable
class ContinuousBatching(Protocol):
    """Starts :class:`ResizableBatch` es for serving (used when ``supports_continuous_batching``
    is true): the serving scheduler (``proxy/batching.py``) merges newcomers into its running
    batch and drops finished or abandoned rows between decode steps."""

    supports_continuous_batching: bool

    def start_serving(self, prompts: Sequence[Sequence[int]]) -> ResizableBatch:
        """Prefill ``prompts`` (serving rows, unpadded) as one engine call."""
        ...


@runtime_checkable
class ContextLimited(Protocol):
    """Knows its context length in tokens (plans are checked against it before admission)."""

    max_context: int


def context_limit(engine: object) -> int | None:
    """The engine's context length, or None when it does not declare one."""
    return engine.max_context if isinstance(engine, ContextLimited) else None


def check_prompts(prompts: Sequence[Sequence[int]], width: int | None) -> None:
    """Refuse an empty batch, an empty row, or (with ``width``) a row longer than ``width``.

    The messages carry no length: a private row's length is private."""
    if not prompts:
        raise ValueError("start() needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if width is not None and any(len(p) > width for p in prompts):
        raise ValueError("a prompt is longer than the batch's declared width")


def left_pad(prompt: Sequence[int], width: int | None, pad_id: int) -> list[int]:
    """``prompt`` left-padded with ``pad_id`` to ``width`` tokens (unchanged for None).

    For engines with no attention mask for a prompt (vLLM, an upstream server) the padding is
    real context: the row's distribution then depends on its own length (its own records,
    nothing else), and every row of a private call has the same length, so shapes, waves and
    scheduling are declared. A longer prompt is refused (the message carries no length)."""
    if width is None:
        return list(prompt)
    if len(prompt) > width:
        raise ValueError("a prompt is longer than the batch's declared width")
    return [pad_id] * (width - len(prompt)) + list(prompt)
