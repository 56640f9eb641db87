"""Sampling fields shared by chat and text completions, each with a bound.

A field that steers the engine rather than the sampling (chat templates, processor kwargs, prompt embeddings,
decoding backends) is deliberately absent: it arrives as an "extra" and is refused unless the pool allows it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MAX_TOKENS_CEILING = 1 << 20
MAX_STRING_CHARS = 8 * 1024 * 1024  # any one string of a request; the body cap bounds them all together
ShortStr = Annotated[str, StringConstraints(max_length=256)]
StopStr = Annotated[str, StringConstraints(max_length=1024)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class CommonSampling(BaseModel):
    """The sampling fields chat, text completions and responses share. Validation only: the gateway forwards the
    client's own bytes, so defaults here never reach vLLM."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, str_max_length=MAX_STRING_CHARS)

    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=100_000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: StopStr | list[StopStr] | None = Field(None, max_length=16)
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=1 << 31)]] | None = Field(None, max_length=64)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    logit_bias: (
        dict[Annotated[str, StringConstraints(max_length=16)], Annotated[float, Field(ge=-100, le=100)]] | None
    ) = Field(None, max_length=300)
    user: ShortStr | None = None
    prompt_cache_key: ShortStr | None = None  # OpenAI's: names the conversation for cache-affinity routing
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None

    def choice_count(self) -> int:
        return 1

    def requested_tokens(self) -> int | None:
        return None


class SamplingParams(CommonSampling):
    """Chat's and text completions' own: several choices, max_tokens, usage in streams."""

    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CEILING)
    min_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_CEILING)
    spaces_between_special_tokens: bool | None = None

    def choice_count(self) -> int:
        return self.n

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    @model_validator(mode="after")
    def _min_not_above_max(self) -> SamplingParams:
        limit = self.requested_tokens()
        if self.min_tokens is not None and limit is not None and self.min_tokens > limit:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self
