"""Requests of the collection and search routes, each field bounded."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from gateway.search.config import IndexSpec

Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


def addressable(item_id: str) -> str:
    """One id grammar, enforced where ids come in, so every id stored can be named in a route: printable (no
    control character, line or paragraph separator, no space but ASCII's, none around it), and its
    "/"-separated parts (ids from relative paths) neither empty nor `.` or `..`."""
    if item_id != item_id.strip(" ") or not all(c.isprintable() for c in item_id):
        raise ValueError("an item id holds printable characters only, with no space around it")
    if any(part in ("", ".", "..") for part in item_id.split("/")):
        raise ValueError("an item id's '/'-separated parts may not be empty, '.' or '..'")
    return item_id


ItemId = Annotated[str, StringConstraints(min_length=1, max_length=256), AfterValidator(addressable)]
FLOAT32_MAX = 3.4028234663852886e38
# Finite and within float32, as stored: a larger value would be kept as inf and make every score NaN.
Vector = Annotated[
    list[Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]],
    Field(min_length=1, max_length=8192),
]
Scalar = Annotated[str, StringConstraints(max_length=1024)] | int | float | bool | None
# Filters: at most 32 keys, each one value or {"in": [...]} of at most MAX_IN_VALUES; MAX_FILTER_VALUES in all.
MAX_IN_VALUES = 1024
MAX_FILTER_VALUES = 4096


# Equality on a metadata key, or {"in": [...]} for membership; all conditions must hold.
Filter = dict[
    Annotated[str, StringConstraints(max_length=128)],
    Scalar
    | dict[
        Annotated[str, StringConstraints(max_length=8)],
        Annotated[list[Scalar], Field(max_length=MAX_IN_VALUES)],
    ],
]


def filter_size(conditions: Filter | None) -> int:
    return sum(len(v.get("in", ())) if isinstance(v, dict) else 1 for v in (conditions or {}).values())


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
    filter: Filter | None = Field(None, max_length=32)
    include_vectors: bool = False
    include_images: bool = False  # each image hit's display copy as `image_url` (a JPEG data URL)

    @model_validator(mode="after")
    def _bounded_filter(self) -> SearchRequest:
        if filter_size(self.filter) > MAX_FILTER_VALUES:
            raise ValueError(f"a filter may hold at most {MAX_FILTER_VALUES} values in all")
        return self
