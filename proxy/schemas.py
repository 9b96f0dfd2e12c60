"""Request and response bodies in OpenAI's shapes (plus dpicl's `/v1/private` extensions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from dp_decoding.mechanisms import registry as mechanisms
from dp_decoding.plan_spec import api_field
from proxy.limits import CEILINGS

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DemonstrationJobRequest",
    "KeyRequest",
    "MechanismField",
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
    max_tokens: int | None = Field(default=None, ge=1, le=CEILINGS["max_tokens"])
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=CEILINGS["n"])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > CEILINGS["stop_sequences"]:
                raise PydanticCustomError(
                    "limit_exceeded",
                    "at most {limit} stop sequences",
                    {"limit": CEILINGS["stop_sequences"]},
                )
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=CEILINGS["max_tokens"])
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=CEILINGS["top_logprobs"])


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=CEILINGS["completion_logprobs"])
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


if TYPE_CHECKING:
    MechanismField = str
else:
    MechanismField = Literal[mechanisms.names()]
"""The registered mechanism names (:mod:`dp_decoding.mechanisms.registry`) as a ``Literal``,
read when this module is imported: a mechanism registered later is not admitted by the API
(the schema lists the names as an enum)."""


class DemonstrationJobRequest(_Body):
    """Starts a DP demonstration-generation job. Only declared parameters; see the core's
    plan for defaults."""

    # The plan fields' defaults and bounds come from dp_decoding.plan_spec.PARAMS (one row
    # per declared parameter); tests check that these fields cover exactly its API rows.
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    epsilon: float = api_field("epsilon")
    delta: float | None = api_field("delta")
    shots: int = api_field("shots")
    max_tokens: int = api_field("max_tokens")
    labels: list[str] | None = None
    regime: Literal["fixed", "resampled"] = api_field("regime")
    mechanism: MechanismField = api_field("mechanism")
    q: float | None = api_field("q")
    prompts: int | None = api_field("prompts")
    examples_per_prompt: int | None = api_field("examples_per_prompt")
    candidates: Literal["public-topk", "all"] = api_field("candidates")
    top_k: int | None = api_field("top_k")
    public_prior: float | None = api_field("public_prior")
    gate_cutoff: int | None = api_field("gate_cutoff")
    gate_threshold: float | None = api_field("gate_threshold")
    task: Literal["generic", "agnews", "dbpedia", "trec"] = "generic"
    # the generic task's declaration (public, shown in every prompt; checked by make_plan)
    description: str | None = api_field("description")
    label_words: dict[str, str] | None = api_field("label_words")
    label_descriptions: dict[str, str] | None = api_field("label_descriptions")
    instruction: str | None = api_field("instruction")
    privacy_unit: Literal["record", "user"] = api_field("privacy_unit")


class PlanRequest(DemonstrationJobRequest):
    # pydantic overrides a field by redeclaring it; mypy reads that as a class-attribute type
    # change (the plan preview takes the job's fields with the dataset optional).
    dataset: str | None = None  # type: ignore[assignment]
    name: str = "plan"


class KeyRequest(_Body):
    model_config = ConfigDict(extra="forbid")

    scope: Literal["serving", "admin"] = "serving"
    name: str | None = Field(default=None, max_length=64)
    epsilon_cap: float | None = Field(default=None, gt=0)
