"""Bounded request model for `POST /v1/responses` (OpenAI's Responses API, as vLLM serves it).

The input is either one string or a list of items: messages (whose content is a string or `input_text`,
`input_image` and, for replayed assistant turns, `output_text` parts), function calls and their outputs. Like
chat's models, this one validates a parsed copy and the client's bytes are forwarded; an unknown top-level field
arrives as an "extra" and is refused unless the pool allows it (vLLM's engine-steering extensions, `request_id`
among them, which the gateway mints itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from gateway.chat.protocol import (
    MAX_MESSAGES,
    MAX_PARTS,
    Schema,
    Strict,
    schemas_size,
)
from gateway.chat.sampling import MAX_TOKENS_CEILING, CommonSampling, ShortStr
from gateway.media.parts import UrlStr

# vLLM mints `resp_<uuid hex>`; the gateway's own ids are longer. Anything past this is not an id of either.
MAX_RESPONSE_ID_CHARS = 128
ResponseId = Annotated[str, Field(min_length=1, max_length=MAX_RESPONSE_ID_CHARS)]


class InputText(Strict):
    type: Literal["input_text"]
    text: str


class InputImage(Strict):
    type: Literal["input_image"]
    # Files are not served by this gateway, so `file_id` is absent and refused; the image comes inline.
    image_url: UrlStr
    detail: Literal["auto", "low", "high"] | None = None


class Annotation(Strict):
    model_config = ConfigDict(extra="allow")  # replayed from an earlier response; never read by the model
    type: ShortStr


class OutputText(Strict):
    type: Literal["output_text"]
    text: str
    annotations: list[Annotation] = Field(default_factory=list, max_length=64)
    logprobs: list[Any] | None = Field(None, max_length=0)  # replayed output carries none worth sending back


class Refusal(Strict):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputText | InputImage | OutputText | Refusal, Field(discriminator="type")]


class InputMessage(Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)]
    id: ShortStr | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: ShortStr | None = None

    def texts(self) -> Iterator[str]:
        if isinstance(self.content, str):
            yield self.content
            return
        for part in self.content:
            if isinstance(part, InputText | OutputText):
                yield part.text
            elif isinstance(part, Refusal):
                yield part.refusal


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: ShortStr
    name: ShortStr
    arguments: str
    id: ShortStr | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def texts(self) -> Iterator[str]:
        yield self.name
        yield self.arguments


class FunctionCallOutput(Strict):
    type: Literal["function_call_output"]
    call_id: ShortStr
    output: str
    id: ShortStr | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def texts(self) -> Iterator[str]:
        yield self.output


InputItem = InputMessage | FunctionCallItem | FunctionCallOutput


class FunctionTool(Strict):
    type: Literal["function"]
    name: ShortStr
    description: str | None = Field(None, max_length=64 * 1024)
    parameters: Schema = None
    strict: bool | None = None


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: ShortStr | None = None
    description: str | None = Field(None, max_length=64 * 1024)
    schema_: Schema = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class Reasoning(Strict):
    effort: Literal["minimal", "low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class NamedTool(Strict):
    type: Literal["function"]
    name: ShortStr


class ResponsesRequest(CommonSampling):
    PROMPT_FIELD: ClassVar[str] = "input"
    TOKENS_FIELD: ClassVar[str] = "max_output_tokens"
    _schema_chars: int = PrivateAttr(0)
    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CEILING)
    previous_response_id: ResponseId | None = None
    store: bool | None = None
    background: bool | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(None, ge=0, le=1024)
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    metadata: dict[ShortStr, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[ShortStr] | None = Field(None, max_length=16)

    def requested_tokens(self) -> int | None:
        return self.max_output_tokens

    def items(self) -> list[InputItem]:
        return [] if isinstance(self.input, str) else self.input

    def media_parts(self) -> list[tuple[int, int, InputImage]]:
        """(item index, part index, part) for every image part, in order."""
        found: list[tuple[int, int, InputImage]] = []
        for i, item in enumerate(self.items()):
            if isinstance(item, InputMessage) and isinstance(item.content, list):
                found.extend((i, j, part) for j, part in enumerate(item.content) if isinstance(part, InputImage))
        return found

    @model_validator(mode="after")
    def _schemas_together(self) -> ResponsesRequest:
        self._schema_chars = schemas_size(self.schemas())
        return self

    def schemas(self) -> list[Any]:
        """The JSON schemas the model is shown: tool parameters and the text format's."""
        schemas = [tool.parameters for tool in self.tools or ()]
        if self.text is not None and self.text.format is not None:
            schemas.append(self.text.format.schema_)
        return [schema for schema in schemas if schema]

    def texts(self) -> Iterator[str]:
        """Every text the model reads: instructions, each input item's, the tools' names and descriptions."""
        if self.instructions:
            yield self.instructions
        if isinstance(self.input, str):
            yield self.input
        for item in self.items():
            yield from item.texts()
        for tool in self.tools or ():
            yield tool.name
            if tool.description:
                yield tool.description

    def text_chars(self) -> int:
        return sum(len(text) for text in self.texts()) + self._schema_chars

    def leading_texts(self) -> Iterator[str]:
        """The conversation's stable head, for the affinity key: instructions, then the items up to and
        including the first user message (a string input is its own head)."""
        if self.instructions:
            yield self.instructions
        if isinstance(self.input, str):
            yield self.input
            return
        for item in self.input:
            if isinstance(item, InputMessage):
                yield item.role
            yield from item.texts()
            if isinstance(item, InputMessage) and item.role == "user":
                return

    def leading_item(self) -> int:
        """Index of the first user message (or the last item): media up to it belongs to the head."""
        items = self.items()
        return next(
            (i for i, item in enumerate(items) if isinstance(item, InputMessage) and item.role == "user"),
            len(items) - 1,
        )
