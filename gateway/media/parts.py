"""The content parts that carry an image or a video, as OpenAI's chat shapes them.

They live below every endpoint that takes one — chat, the Responses and Messages conversions, embeddings' inputs —
so that those packages share one definition without importing each other."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints

UrlStr = Annotated[str, StringConstraints(min_length=1, max_length=64 * 1024 * 1024)]


class MediaUrl(BaseModel):
    # Extra keys are refused: vLLM honours a client "uuid" as a multimodal cache key, which would let one
    # caller's prompt reuse another's image embedding.
    model_config = ConfigDict(extra="forbid")  # no str_max_length: the URL has its own (data URLs are large)

    url: UrlStr
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: MediaUrl


class VideoPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["video_url"]
    video_url: MediaUrl
