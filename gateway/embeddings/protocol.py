"""`/v1/embeddings` request model: OpenAI's shape, plus image content parts (our extension)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gateway.media.parts import ImagePart

TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=1 << 31)]], Field(min_length=1, max_length=4096)]


class TextInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


EmbeddingItem = Annotated[TextInput | ImagePart, Field(discriminator="type")]
InputItem = str | TokenIds | EmbeddingItem


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    input: str | TokenIds | Annotated[list[InputItem], Field(min_length=1, max_length=100_000)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65536)
    user: Annotated[str, StringConstraints(max_length=256)] | None = None

    def items(self) -> list[str | list[int] | TextInput | ImagePart]:
        """The inputs as a list: a lone string or a lone token array is one input."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [value]
        return list(value)  # type: ignore[arg-type]
