"""Requests of the collection and search routes, each field bounded."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from gateway.search.config import IndexSpec

Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Vector = Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=1, max_length=8192)]
Scalar = str | int | float | bool | None


class CreateCollection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    dimensions: int | None = Field(None, ge=1, le=8192)  # omit to hold the gateway's CLIP vectors
    index: IndexSpec = Field(default_factory=IndexSpec)


class Content(BaseModel):
    """Exactly one of: a vector, a text or an image (URL or data URL) for the gateway to embed."""

    model_config = ConfigDict(extra="forbid")

    vector: Vector | None = None
    text: Annotated[str, StringConstraints(max_length=16_384)] | None = None
    image_url: Annotated[str, StringConstraints(max_length=64 * 1024 * 1024)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Content:
        if sum(x is not None for x in (self.vector, self.text, self.image_url)) != 1:
            raise ValueError("give exactly one of vector, text or image_url")
        return self


class Item(Content):
    id: ItemId
    metadata: dict[Annotated[str, StringConstraints(max_length=128)], Any] = Field(default_factory=dict)


class UpsertItems(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[Item] = Field(min_length=1, max_length=100_000)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    collection: Name
    query: Content
    top_k: int = Field(10, ge=1, le=100_000)
    # Equality on a metadata key, or {"in": [...]} for membership; all conditions must hold.
    filter: dict[Annotated[str, StringConstraints(max_length=128)], Scalar | dict[str, list[Scalar]]] | None = Field(
        None, max_length=32
    )
    include_vectors: bool = False
