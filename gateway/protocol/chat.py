"""Bounded request models for `/v1/chat/completions` and `/v1/completions`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gateway.protocol.sampling import MAX_TOKENS_CEILING, SamplingParams, ShortStr

MAX_MESSAGES = 4096
MAX_PARTS = 512
UrlStr = Annotated[str, StringConstraints(min_length=1, max_length=64 * 1024 * 1024)]


class MediaUrl(BaseModel):
    # Extra keys are refused: vLLM honours a client "uuid" as a multimodal cache key, which would let one
    # caller's prompt reuse another's image embedding.
    model_config = ConfigDict(extra="forbid")

    url: UrlStr
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: MediaUrl


class VideoPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["video_url"]
    video_url: MediaUrl


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: ShortStr
    arguments: str


class ToolCall(BaseModel):
    id: ShortStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None
    name: ShortStr | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    tool_call_id: ShortStr | None = None
    refusal: str | None = None
    reasoning_content: str | None = None


class FunctionSpec(BaseModel):
    name: ShortStr
    description: str | None = Field(None, max_length=64 * 1024)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CEILING)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[ShortStr, ShortStr] | None = Field(None, max_length=16)
    store: bool | None = None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def media_parts(self) -> list[tuple[int, int, ImagePart | VideoPart]]:
        """(message index, part index, part) for every image/video part, in order."""
        found: list[tuple[int, int, ImagePart | VideoPart]] = []
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if isinstance(part, ImagePart | VideoPart):
                        found.append((i, j, part))
        return found

    def text_chars(self) -> int:
        total = 0
        for message in self.messages:
            if isinstance(message.content, str):
                total += len(message.content)
            elif message.content:
                total += sum(len(p.text) for p in message.content if isinstance(p, TextPart))
        return total


TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=1 << 31)]], Field(max_length=MAX_TOKENS_CEILING)]


PromptList = Annotated[list[str], Field(min_length=1, max_length=1024)]
TokenIdBatch = Annotated[list[TokenIds], Field(min_length=1, max_length=1024)]


class CompletionRequest(SamplingParams):
    prompt: str | PromptList | TokenIds | TokenIdBatch
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = Field(None, max_length=64 * 1024)

    def text_chars(self) -> int:
        prompt = self.prompt
        if isinstance(prompt, str):
            return len(prompt)
        if prompt and isinstance(prompt[0], str):
            return sum(len(p) for p in prompt if isinstance(p, str))
        return 0

    def media_parts(self) -> list[tuple[int, int, ImagePart | VideoPart]]:
        return []

    def longest_token_prompt(self) -> int:
        """Length of the longest prompt given as token ids (0 when the prompt is text)."""
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], str):
            return 0
        if isinstance(prompt[0], int):
            return len(prompt)
        return max(len(p) for p in prompt if isinstance(p, list))
