"""The embedded CPU engine: transformers + torch on SmolLM2-135M-Instruct (bf16 where the CPU
computes bf16, float32 elsewhere: see :mod:`dp_decoding.engines.dtype`).

Rows are left-padded so every row's next token sits in the last column; the KV cache of the
prefill is kept and each ``append`` runs a single batched decode step over it.

Serving batches (``start_serving``) are also resizable, for continuous batching: ``merge`` appends
a separately prefilled batch's rows (both left-padded, with their masks and KV caches, to the
longer of the two widths; the padding stays masked, positions are per row) and ``keep`` drops
rows and then the leading columns no remaining row attends to. Private batches never do either.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dp_decoding.engines.base import ResizableBatch, check_prompts
from dp_decoding.engines.dtype import default_dtype
from dp_decoding.engines.heap import bound_heap_retention
from dp_decoding.engines.hf_tokenizer import HFTokenizerMixin
from dp_decoding.engines.model_files import MODEL_NAME, ensure_model_dir

if TYPE_CHECKING:  # torch is imported lazily, by the engine
    from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class EmbeddedEngine(HFTokenizerMixin):
    """A transformers causal LM behind the engine protocol.

    Thread-safety: one lock serialises forward passes, so several batches may be interleaved
    by different threads (serving and a generation job) without corrupting each other.

    Memory: ``bound_heap=True`` (what ``dpicl generate`` asks for) fixes glibc's mmap threshold
    for the whole process (:mod:`dp_decoding.engines.heap`), so the prefill's freed activations
    are not kept resident; it costs system CPU time in page faults, so a server (throughput
    first) leaves it off unless ``MALLOC_MMAP_THRESHOLD_`` is set by the operator.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        bound_heap: bool = False,
    ) -> None:
        # before the weights are loaded: freed tensors leave the process (dp_decoding.engines.heap)
        self.heap_bounded = bound_heap_retention() if bound_heap else False
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads or os.cpu_count() or 1)
        path = Path(model_dir) if model_dir else ensure_model_dir()
        self._torch = torch
        self.dtype = getattr(torch, dtype or default_dtype())
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype)
        self.model.eval()
        self.name = MODEL_NAME
        self.model_dir = path
        self.vocab_size = int(self.model.config.vocab_size)
        self.eos_token_ids = self._eos_ids()
        self.pad_token_id = int(self.tokenizer.pad_token_id or 0)
        self.max_context = int(self.model.config.max_position_embeddings)
        """The most tokens a row may hold (plans are checked against it before admission)."""
        self.threads = torch.get_num_threads()
        """Fixed at load: every job on this engine runs with the same thread count and dtype."""
        self.lock: AbstractContextManager[Any] = threading.Lock()
        from transformers import DynamicCache

        self.supports_continuous_batching = hasattr(DynamicCache(), "layers")
        """Serving batches can merge and keep rows (needs the per-layer cache of transformers 5)."""

    def use_lock(self, lock: AbstractContextManager[Any]) -> None:
        """Serialise every later engine call with ``lock`` (a server's shared lock) instead of
        this engine's own; call it before any engine call (see :class:`engines.base.Locking`)."""
        self.lock = lock

    # -- batches ---------------------------------------------------------------------------
    def start(self, prompts: Sequence[Sequence[int]], *, width: int | None = None) -> EmbeddedBatch:
        """Prefill ``prompts`` as one batch. With ``width`` every row is left-padded (masked)
        to exactly ``width`` tokens, so the batch's shape is ``[rows, width]`` whatever the
        prompts' own lengths; a longer prompt is refused."""
        check_prompts(prompts, width)
        return EmbeddedBatch(self, prompts, width)

    def start_serving(self, prompts: Sequence[Sequence[int]]) -> EmbeddedBatch:
        """Prefill serving rows (unpadded: each masked to its own length) as one engine call;
        the batch can then ``merge`` and ``keep`` (:class:`engines.base.ResizableBatch`)."""
        check_prompts(prompts, None)
        return EmbeddedBatch(self, prompts, None)


class EmbeddedBatch:
    """Rows of one engine call, advanced together; holds their KV cache."""

    def __init__(
        self, engine: EmbeddedEngine, prompts: Sequence[Sequence[int]], width: int | None = None
    ) -> None:
        torch = engine._torch
        self._engine = engine
        width = width if width is not None else max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), engine.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        self._mask = mask
        self._positions = mask.sum(dim=1) - 1  # position of each row's last real token
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        self._cache: Any = None  # the model's KV cache (a transformers Cache)
        self._last_logits: Tensor | None = self._forward(ids, mask, position_ids)

    @property
    def rows(self) -> int:
        return int(self._mask.shape[0])

    def _forward(self, ids: Tensor, mask: Tensor, position_ids: Tensor) -> Tensor:
        torch = self._engine._torch
        with self._engine.lock, torch.inference_mode():
            out = self._engine.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self._cache = out.past_key_values
        return out.logits[:, -1, :]

    def logprobs(self, candidates: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        if self._last_logits is None:
            raise RuntimeError("batch is closed")
        torch = self._engine._torch
        lp = torch.log_softmax(self._last_logits.float(), dim=-1)
        if candidates is not None:
            lp = lp[:, torch.as_tensor(np.asarray(candidates, dtype=np.int64))]
        return lp.numpy()

    def append(self, tokens: Sequence[int]) -> None:
        torch = self._engine._torch
        if len(tokens) != self.rows:
            raise ValueError(f"append() needs one token per row ({self.rows}), got {len(tokens)}")
        ids = torch.tensor([[int(t)] for t in tokens], dtype=torch.long)
        self._mask = torch.cat([self._mask, torch.ones((self.rows, 1), dtype=torch.long)], dim=1)
        self._positions = self._positions + 1
        self._last_logits = self._forward(ids, self._mask, self._positions.unsqueeze(1))

    def merge(self, other: ResizableBatch) -> None:
        """Append ``other``'s rows (a serving batch of this engine) after this batch's rows."""
        if not isinstance(other, EmbeddedBatch) or other._engine is not self._engine:
            raise TypeError("merge() takes a serving batch of the same engine")
        if self._last_logits is None or other._last_logits is None:
            raise RuntimeError("batch is closed")
        torch = self._engine._torch
        pad = torch.nn.functional.pad
        a, b = int(self._mask.shape[1]), int(other._mask.shape[1])
        width = max(a, b)
        self._mask = torch.cat([pad(self._mask, (width - a, 0)), pad(other._mask, (width - b, 0))])
        self._positions = torch.cat([self._positions, other._positions])
        self._last_logits = torch.cat([self._last_logits, other._last_logits])
        for mine, theirs in zip(_kv_layers(self._cache), _kv_layers(other._cache), strict=True):
            for name in ("keys", "values"):
                x, y = getattr(mine, name), getattr(theirs, name)  # [rows, heads, width, dim]
                setattr(
                    mine,
                    name,
                    torch.cat([pad(x, (0, 0, width - a, 0)), pad(y, (0, 0, width - b, 0))]),
                )
        other.close()

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows``; then drop the leading columns that every kept row masks."""
        if self._last_logits is None:
            raise RuntimeError("batch is closed")
        torch = self._engine._torch
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        mask = self._mask[idx]
        seen = mask.any(dim=0)
        lead = int(torch.argmax(seen.to(torch.int8))) if bool(seen.any()) else 0
        self._mask = mask[:, lead:]
        self._positions = self._positions[idx]
        self._last_logits = self._last_logits[idx]
        for layer in _kv_layers(self._cache):
            for name in ("keys", "values"):
                setattr(layer, name, getattr(layer, name)[idx, :, lead:, :])

    def kv_bytes(self) -> int:
        """Bytes held by this batch's KV cache (for sizing M)."""
        total = 0
        for layer in _kv_layers(self._cache):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def close(self) -> None:
        self._cache = None
        self._last_logits = None


def _kv_layers(cache: Any) -> list[Any]:
    """The layers of a transformers cache (``keys``/``values``: ``[rows, heads, length, dim]``)."""
    return list(getattr(cache, "layers", None) or [])
