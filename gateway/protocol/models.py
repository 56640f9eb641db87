"""`GET /v1/models` response: OpenAI's list shape plus what each model can take."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ReplicaCounts(BaseModel):
    healthy: int
    total: int


class Capabilities(BaseModel):
    vision: bool
    limit_mm_per_prompt: dict[str, int] | None = None
    max_model_len: int | None = None
    quantization: str | None = None
    replicas: ReplicaCounts | None = None
    embeddings: bool = False
    dimensions: int | None = None
    input_modalities: list[str] | None = None
    state: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlm-gateway"
    capabilities: Capabilities


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
