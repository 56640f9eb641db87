"""`GET /v1/models` response: OpenAI's list shape plus what each model can take."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ReplicaCounts(BaseModel):
    healthy: int
    total: int


class Capabilities(BaseModel):
    vision: bool
    limit_mm_per_prompt: dict[str, int]
    max_model_len: int | None
    quantization: str | None
    replicas: ReplicaCounts


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlm-gateway"
    capabilities: Capabilities


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
