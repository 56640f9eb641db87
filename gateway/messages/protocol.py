"""Bounded request models for Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`).

The shapes are Anthropic's, as vLLM's `/v1/messages` takes them: a `system` prompt beside the turns, content
blocks (text, image with a base64 or URL source, tool_use, tool_result), tools with JSON `input_schema`s. Every
list, string and schema is bounded as chat's are; unknown top-level fields are refused unless the pool's
`allow_fields` lets them through.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, model_validator

from gateway.chat.protocol import MAX_MESSAGES, MAX_PARTS, Schema, Strict, schemas_size
from gateway.chat.sampling import MAX_TOKENS_CEILING, ShortStr
from gateway.media.parts import UrlStr

IMAGE_TYPES = Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
Base64 = Annotated[str, StringConstraints(min_length=1, max_length=64 * 1024 * 1024)]


class Base64Source(BaseModel):
    model_config = ConfigDict(extra="forbid")  # no str_max_length: the data has its own bound (a large image)

    type: Literal["base64"]
    media_type: IMAGE_TYPES
    data: Base64


class UrlSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["url"]
    url: UrlStr


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, str] | None = Field(None, max_length=4)


class ImageBlock(Strict):
    type: Literal["image"]
    source: Annotated[Base64Source | UrlSource, Field(discriminator="type")]
    cache_control: dict[str, str] | None = Field(None, max_length=4)


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: ShortStr
    name: ShortStr
    input: Schema = None  # the call's arguments: a JSON object, bounded like a schema


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: ShortStr
    # Text only: an image inside a tool result would reach the model without passing the media guard.
    content: str | Annotated[list[TextBlock], Field(max_length=MAX_PARTS)] | None = None
    is_error: bool | None = None


ContentBlock = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(Strict):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[ContentBlock], Field(min_length=1, max_length=MAX_PARTS)]

    def texts(self) -> Iterator[str]:
        """Every text of the turn the model reads: text blocks, tool calls' names and inputs, tool results."""
        if isinstance(self.content, str):
            yield self.content
            return
        for block in self.content:
            if isinstance(block, TextBlock):
                yield block.text
            elif isinstance(block, ToolUseBlock):
                yield block.name
                if block.input:
                    yield str(block.input)
            elif isinstance(block, ToolResultBlock):
                if isinstance(block.content, str):
                    yield block.content
                elif block.content:
                    yield from (part.text for part in block.content)


class Tool(Strict):
    name: ShortStr
    description: str | None = Field(None, max_length=64 * 1024)
    input_schema: Schema = None


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: ShortStr | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(Strict):
    user_id: ShortStr | None = None


StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _Prompt(BaseModel):
    """What both routes carry: the turns, the system prompt, the tools."""

    model_config = ConfigDict(extra="allow", str_max_length=8 * 1024 * 1024)
    PROMPT_FIELD: ClassVar[str] = "messages"
    TOKENS_FIELD: ClassVar[str] = "max_tokens"

    model: ShortStr
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    system: str | Annotated[list[TextBlock], Field(max_length=MAX_PARTS)] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    _schema_chars: int = PrivateAttr(default=0)

    @property
    def prompt_cache_key(self) -> None:
        return None  # Anthropic has none: a conversation is keyed by its session header or its leading turns

    @model_validator(mode="after")
    def _schemas_together(self) -> _Prompt:
        self._schema_chars = schemas_size(self.schemas())
        return self

    def schemas(self) -> list[Any]:
        return [tool.input_schema for tool in self.tools or () if tool.input_schema]

    def system_texts(self) -> list[str]:
        if self.system is None:
            return []
        return [self.system] if isinstance(self.system, str) else [block.text for block in self.system]

    def texts(self) -> Iterator[str]:
        yield from self.system_texts()
        for message in self.messages:
            yield from message.texts()
        for tool in self.tools or ():
            yield tool.name
            if tool.description:
                yield tool.description

    def text_chars(self) -> int:
        return sum(len(text) for text in self.texts()) + self._schema_chars

    def requested_tokens(self) -> int | None:
        return None

    def choice_count(self) -> int:
        return 1

    def image_blocks(self) -> Iterator[tuple[int, int, ImageBlock]]:
        for m, message in enumerate(self.messages):
            if isinstance(message.content, list):
                for b, block in enumerate(message.content):
                    if isinstance(block, ImageBlock):
                        yield m, b, block


class CountTokensRequest(_Prompt):
    """`/v1/messages/count_tokens`: the prompt alone."""

    @property
    def stream(self) -> bool:
        return False

    @property
    def service_tier(self) -> str | None:
        return None


class MessagesRequest(_Prompt):
    """`/v1/messages`."""

    max_tokens: int = Field(ge=1, le=MAX_TOKENS_CEILING)
    stop_sequences: list[StopSequence] | None = Field(None, max_length=16)
    stream: bool = False
    metadata: Metadata | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    # Anthropic's own tiers: "auto" runs in the key's default band, "standard_only" in `default`.
    service_tier: Literal["auto", "standard_only"] | None = None

    def requested_tokens(self) -> int | None:
        return self.max_tokens
