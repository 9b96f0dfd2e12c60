"""Tokenizer methods shared by the engines that load SmolLM2's Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class HFTokenizerMixin:
    """``tokenize`` / ``decode`` / ``apply_chat_template`` over ``self.tokenizer``; both
    engines tokenise identically, which the vLLM agreement test relies on."""

    tokenizer: Any

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def _eos_ids(self) -> frozenset[int]:
        eos = {self.tokenizer.eos_token_id, 0}  # <|im_end|> and <|endoftext|>
        return frozenset(int(t) for t in eos if t is not None)
