"""Request and response bodies in OpenAI's shapes (plus dpicl's `/v1/private` extensions)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DemonstrationJobRequest",
    "KeyRequest",
    "PlanRequest",
    "StreamOptions",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=8)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class DemonstrationJobRequest(_Body):
    """Starts a DP demonstration-generation job. Only declared parameters; see the core's
    plan for defaults."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    epsilon: float = Field(gt=0)
    delta: float | None = Field(default=None, gt=0, lt=1)
    shots: int = Field(default=1, ge=1, le=256)
    max_tokens: int = Field(default=64, ge=1, le=512)
    labels: list[str] | None = None
    regime: Literal["fixed", "resampled"] = "fixed"
    mechanism: Literal["gaussian", "exponential"] = "gaussian"
    q: float | None = Field(default=None, gt=0, le=1)
    prompts: int | None = Field(default=None, ge=1, le=1024)
    examples_per_prompt: int | None = Field(default=None, ge=1, le=64)
    candidates: Literal["public-topk", "all"] = "public-topk"
    top_k: int | None = Field(default=None, ge=1, le=1000)
    public_prior: float = Field(default=0.0, ge=0, le=16)
    gate_cutoff: int | None = Field(default=None, ge=1, le=512)
    gate_threshold: float | None = Field(default=None, gt=0, le=1)
    task: Literal["generic", "agnews", "dbpedia", "trec"] = "generic"
    privacy_unit: Literal["record", "user"] = "record"


class PlanRequest(DemonstrationJobRequest):
    dataset: str | None = None  # type: ignore[assignment]
    name: str = "plan"


class KeyRequest(_Body):
    model_config = ConfigDict(extra="forbid")

    scope: Literal["serving", "admin"] = "serving"
    name: str | None = Field(default=None, max_length=64)
    epsilon_cap: float | None = Field(default=None, gt=0)
