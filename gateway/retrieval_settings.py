"""The retrieval tier's settings: the CLIP encoder behind /v1/embeddings, and the vector index behind /v1/search
(FAISS in this process, or Milvus). Part of the one Settings object (gateway/config.py), kept apart by concern."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator


class EmbeddingsSettings(BaseModel):
    """The CLIP encoder behind /v1/embeddings (and /v1/search)."""

    enabled: bool = True
    # open_clip model name, or "tiny-random": a built-in random-weight CLIP that needs no download (tests, demos).
    clip_model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"  # open_clip tag; fetched from the hub unless checkpoint is set
    checkpoint: str | None = None  # local .safetensors (or a torch file, loaded weights_only)
    served_name: str | None = None  # the `model` clients send; default "<clip_model>/<pretrained>"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    max_batch: int = Field(64, ge=1, le=4096)
    max_wait_ms: float = Field(2.0, ge=0, le=1000)
    max_queue: int = Field(4096, ge=1, le=1_000_000)  # items waiting per modality; beyond it 429
    max_inputs: int = Field(2048, ge=1, le=100_000)  # per request, as OpenAI's API
    max_input_chars: int = Field(16_384, ge=1)  # per text input; CLIP reads 77 tokens of it anyway

    def model_name(self) -> str:
        if self.served_name:
            return self.served_name
        if self.clip_model == "tiny-random" or not self.pretrained:
            return f"clip-{self.clip_model}"
        return f"{self.clip_model}/{self.pretrained}"


# What one Milvus item can hold (gateway/search/milvus_backend.py): its metadata document is a VARCHAR, its
# filterable (key, value) digests an ARRAY, and a search's limit Milvus' topk cap.
MILVUS_MAX_DOCUMENT = 65_535
MILVUS_MAX_TOP_K = 16_384
MILVUS_MAX_DISPLAY = 40 * 1024  # as base64 in the item's dynamic JSON, which Milvus caps at 64 KiB


class SearchSettings(BaseModel):
    # "faiss": collections in this process under index_dir (one writer). "milvus": in Milvus at milvus_uri — a
    # file path starts Milvus Lite as this gateway's child process; http(s)://host:19530 is a server or cluster,
    # and then any number of retrieval replicas share it.
    backend: Literal["faiss", "milvus"] = "faiss"
    index_dir: Path = Field(default_factory=lambda: Path.home() / ".local" / "share" / "vlm-gateway" / "index")
    milvus_uri: str = Field("", max_length=2048)
    milvus_token: SecretStr | None = None  # "user:password" or an API key; from a Secret, never logged
    milvus_timeout: float = Field(10.0, gt=0, le=600)  # per call; past it the request is answered 503
    # Strong: a write acknowledged through any gateway replica is seen by the next search through any other
    # (Session would only promise that to the replica that wrote it). Costs a few ms per read on a cluster.
    milvus_consistency: Literal["Strong", "Session", "Bounded", "Eventually"] = "Strong"
    milvus_collection_prefix: str = Field("gw_", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
    milvus_threads: int = Field(8, ge=1, le=256)  # pymilvus calls block: they run on this many threads
    snapshot_every: int = Field(10_000, ge=1)  # WAL records (Milvus: writes) before a background snapshot (flush)
    max_top_k: int = Field(1000, ge=1, le=100_000)
    max_items_per_request: int = Field(1024, ge=1, le=100_000)
    max_metadata_bytes: int = Field(16 * 1024, ge=2, le=1024 * 1024)
    max_collections: int = Field(256, ge=1, le=100_000)
    # Each image item keeps a display copy (JPEG, longer side <= display_size px, <= display_max_bytes) that chat
    # grounding shows the model; it is stored with the item (FAISS: in memory, the WAL and snapshots; Milvus: a
    # field). 0 keeps none (grounding then injects captions only).
    display_size: int = Field(448, ge=0, le=4096)
    display_max_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024)

    @model_validator(mode="after")
    def _milvus_fits(self) -> SearchSettings:
        if self.backend != "milvus":
            return self
        if not self.milvus_uri:
            raise ValueError("search.backend milvus needs search.milvus_uri (a file path for Milvus Lite, or a URL)")
        if self.max_metadata_bytes > MILVUS_MAX_DOCUMENT:
            raise ValueError(f"with search.backend milvus, max_metadata_bytes is at most {MILVUS_MAX_DOCUMENT}")
        if self.max_top_k > MILVUS_MAX_TOP_K:
            raise ValueError(f"with search.backend milvus, max_top_k is at most {MILVUS_MAX_TOP_K}")
        if self.display_max_bytes > MILVUS_MAX_DISPLAY:
            raise ValueError(f"with search.backend milvus, display_max_bytes is at most {MILVUS_MAX_DISPLAY}")
        return self
