"""The upstream engine's tokenizers: the served model's own Hugging Face tokenizer (local
directory) or an OpenAI tiktoken encoding (files shipped by ``bpe-openai``); nothing is
downloaded. Each also names a token the way the server's ``top_logprobs`` keys it
(``token_text``) and lists the end-of-text ids (``eos_ids``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dp_decoding.engines.hf_tokenizer import HFTokenizerMixin

_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


class _HFTokenizer(HFTokenizerMixin):
    """A Hugging Face tokenizer (the served model's own, from a local directory)."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size or len(tokenizer))

    def eos_ids(self) -> frozenset[int]:
        vocab = self.tokenizer.get_vocab()
        ids = {vocab[t] for t in _END_TOKENS if t in vocab}
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(int(t) for t in ids)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


class _TiktokenTokenizer:
    """An OpenAI tiktoken encoding. Text is encoded as ordinary text: a record that contains
    ``<|endoftext|>`` does not turn into the special token."""

    def __init__(self, encoding: Any) -> None:
        self.encoding = encoding
        self.vocab_size = int(encoding.n_vocab)
        self._special = frozenset(
            int(encoding.encode_single_token(s)) for s in encoding.special_tokens_set
        )

    def tokenize(self, text: str) -> list[int]:
        return list(self.encoding.encode_ordinary(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.encoding.decode([int(t) for t in token_ids if int(t) not in self._special])

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        raise NotImplementedError("tiktoken encodings have no chat template")

    def eos_ids(self) -> frozenset[int]:
        return frozenset({int(self.encoding.eot_token)})

    def token_text(self, token_id: int) -> str:
        """The key OpenAI's legacy completions use for a token in ``top_logprobs``: its text,
        or ``bytes:\\xNN...`` for a token that is not valid UTF-8 on its own."""
        raw = self.encoding.decode_single_token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def load_tokenizer(
    tokenizer: str | Path | Any | None, model: str, vocab_size: int | None = None
) -> _HFTokenizer | _TiktokenTokenizer:
    """The served model's tokenizer.

    ``tokenizer`` is a local Hugging Face tokenizer directory, a tiktoken encoding name
    (``cl100k_base``, ``o200k_base``, optionally prefixed ``tiktoken:``), an already loaded
    tokenizer object, or None: then ``model`` must be an OpenAI model name tiktoken knows.
    Nothing is downloaded (HF: ``local_files_only``; tiktoken: the files ``bpe-openai`` ships).
    """
    from dp_decoding.engines import tiktoken_offline

    if tokenizer is None:
        try:
            return _TiktokenTokenizer(tiktoken_offline.encoding_for_model(model))
        except KeyError:
            raise ValueError(
                f"no tokenizer for model {model!r}: pass tokenizer=<local Hugging Face "
                "tokenizer directory> or a tiktoken encoding name (cl100k_base, o200k_base)"
            ) from None
    if isinstance(tokenizer, str | Path):
        name = str(tokenizer)
        if name.startswith("tiktoken:"):
            return _TiktokenTokenizer(tiktoken_offline.get_encoding(name.split(":", 1)[1]))
        if Path(name).exists():
            from transformers import AutoTokenizer

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            hf = AutoTokenizer.from_pretrained(name, local_files_only=True)
            return _HFTokenizer(hf, vocab_size or _config_vocab_size(Path(name)))
        import tiktoken

        if name in tiktoken.list_encoding_names():
            return _TiktokenTokenizer(tiktoken_offline.get_encoding(name))
        raise ValueError(
            f"tokenizer {name!r} is neither a local directory nor a tiktoken encoding name"
        )
    if hasattr(tokenizer, "encode_ordinary"):
        return _TiktokenTokenizer(tokenizer)
    return _HFTokenizer(tokenizer, vocab_size)


def _config_vocab_size(path: Path) -> int | None:
    """``vocab_size`` from a model directory's config.json (it may exceed the tokenizer's
    length when the embedding matrix is padded); None when there is none."""
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        return int(json.loads(config.read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
