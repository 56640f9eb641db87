"""Bounded request models for `/v1/chat/completions` and `/v1/completions`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, model_validator

from gateway.chat.sampling import MAX_STRING_CHARS, MAX_TOKENS_CEILING, SamplingParams, ShortStr
from gateway.media.parts import ImagePart, VideoPart
from gateway.search.protocol import MAX_FILTER_VALUES, Filter, Name, filter_size

MAX_MESSAGES = 4096
MAX_PARTS = 512
# JSON schemas (tool parameters, response formats) steer the engine's grammar compiler, whose cost grows with
# them: each is bounded in size, depth and nodes, and all of one request's together in size.
MAX_SCHEMA_CHARS = 64 * 1024
MAX_SCHEMA_DEPTH = 24
MAX_SCHEMA_NODES = 2048
MAX_REQUEST_SCHEMA_CHARS = 256 * 1024


def json_size(value: Any) -> int:
    """About the characters of `value` as JSON, walking at most MAX_SCHEMA_NODES nodes and MAX_SCHEMA_DEPTH
    levels (ValueError beyond either, or beyond MAX_SCHEMA_CHARS)."""
    size, nodes = 0, 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise ValueError(f"a schema may hold at most {MAX_SCHEMA_NODES} values")
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"a schema may nest at most {MAX_SCHEMA_DEPTH} levels")
        if isinstance(item, dict):
            size += 2
            for key, child in item.items():
                size += len(str(key)) + 4
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            size += 2
            stack.extend((child, depth + 1) for child in item)
        else:
            size += len(item) + 2 if isinstance(item, str) else 8
        if size > MAX_SCHEMA_CHARS:
            raise ValueError(f"a schema may be at most {MAX_SCHEMA_CHARS} characters")
    return size


def schemas_size(schemas: list[Any]) -> int:
    """The size of all the JSON schemas one request shows the model (walked once, at validation; the context
    check and the token estimate read it), refused past MAX_REQUEST_SCHEMA_CHARS in all."""
    size = sum(json_size(schema) for schema in schemas)
    if size > MAX_REQUEST_SCHEMA_CHARS:
        raise ValueError(f"the request's tool and response schemas may be {MAX_REQUEST_SCHEMA_CHARS} characters in all")
    return size


def _bounded_schema(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None:
        json_size(value)
    return value


Schema = Annotated[dict[str, Any] | None, AfterValidator(_bounded_schema)]


class Strict(BaseModel):
    """Nested request parts: unknown keys refused, every string bounded."""

    model_config = ConfigDict(extra="forbid", str_max_length=MAX_STRING_CHARS)


class TextPart(Strict):
    type: Literal["text"]
    text: str


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCall(Strict):
    name: ShortStr
    arguments: str


class ToolCall(Strict):
    id: ShortStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None
    name: ShortStr | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    tool_call_id: ShortStr | None = None
    refusal: str | None = None
    reasoning_content: str | None = None

    def texts(self) -> Iterator[str]:
        """Every text of the message the model reads (content, names, tool calls, reasoning, refusal)."""
        if isinstance(self.content, str):
            yield self.content
        elif self.content:
            yield from (part.text for part in self.content if isinstance(part, TextPart))
        for text in (self.name, self.reasoning_content, self.refusal, self.tool_call_id):
            if text:
                yield text
        for call in self.tool_calls or ():
            yield call.function.name
            yield call.function.arguments


class FunctionSpec(Strict):
    name: ShortStr
    description: str | None = Field(None, max_length=64 * 1024)
    parameters: Schema = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionSpec


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Schema = None


MAX_RETRIEVAL_TOP_K = 16


class Retrieval(Strict):
    """Ground the answer in the caller's collection (gateway/chat/retrieval.py); never forwarded."""

    collection: Name
    top_k: int = Field(4, ge=1, le=MAX_RETRIEVAL_TOP_K)
    kind: Annotated[str, StringConstraints(max_length=128)] | None = None  # shorthand for filter {"kind": kind}
    filter: Filter | None = Field(None, max_length=32)

    @model_validator(mode="after")
    def _bounded_filter(self) -> Retrieval:
        if filter_size(self.filter) > MAX_FILTER_VALUES:
            raise ValueError(f"a filter may hold at most {MAX_FILTER_VALUES} values in all")
        return self


class ChatCompletionRequest(SamplingParams):
    PROMPT_FIELD: ClassVar[str] = "messages"
    TOKENS_FIELD: ClassVar[str] = "max_tokens"
    _schema_chars: int = PrivateAttr(0)
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
    retrieval: Retrieval | None = None

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

    @model_validator(mode="after")
    def _schemas_together(self) -> ChatCompletionRequest:
        self._schema_chars = schemas_size(self.schemas())
        return self

    def schema_chars(self) -> int:
        return self._schema_chars

    def schemas(self) -> list[Any]:
        """The JSON schemas the model is shown: tool parameters and the response format's."""
        schemas = [tool.function.parameters for tool in self.tools or ()]
        if self.response_format is not None:
            schemas.append(self.response_format.json_schema)
        return [schema for schema in schemas if schema]

    def texts(self) -> Iterator[str]:
        """Every text the model reads: each message's, and the tools' names and descriptions."""
        for message in self.messages:
            yield from message.texts()
        for tool in self.tools or ():
            yield tool.function.name
            if tool.function.description:
                yield tool.function.description

    def text_chars(self) -> int:
        """What budgets and the context check count: every text the model reads, plus the schemas it is shown."""
        return sum(len(text) for text in self.texts()) + self.schema_chars()


TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=1 << 31)]], Field(max_length=MAX_TOKENS_CEILING)]


PromptList = Annotated[list[str], Field(min_length=1, max_length=1024)]
TokenIdBatch = Annotated[list[TokenIds], Field(min_length=1, max_length=1024)]


class CompletionRequest(SamplingParams):
    PROMPT_FIELD: ClassVar[str] = "prompt"
    TOKENS_FIELD: ClassVar[str] = "max_tokens"
    prompt: str | PromptList | TokenIds | TokenIdBatch
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = Field(None, max_length=64 * 1024)

    def schemas(self) -> list[Any]:
        return []

    def texts(self) -> Iterator[str]:
        prompt = self.prompt
        if isinstance(prompt, str):
            yield prompt
        elif prompt and isinstance(prompt[0], str):
            yield from (p for p in prompt if isinstance(p, str))
        if self.suffix:
            yield self.suffix

    def text_chars(self) -> int:
        return sum(len(text) for text in self.texts())

    def token_prompts(self) -> list[list[int]]:
        """The prompts given as token ids (none when the prompt is text)."""
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], str):
            return []
        if isinstance(prompt[0], int):
            return [prompt]
        return [p for p in prompt if isinstance(p, list)]

    def media_parts(self) -> list[tuple[int, int, ImagePart | VideoPart]]:
        return []

    def longest_token_prompt(self) -> int:
        """Length of the longest prompt given as token ids (0 when the prompt is text)."""
        return max((len(p) for p in self.token_prompts()), default=0)
