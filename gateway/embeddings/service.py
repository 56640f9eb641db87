"""`/v1/embeddings`: validate inputs, prepare them off the loop, batch them across callers, answer in order.

The encoder loads in the background at start-up, so the chat path is serving while CLIP weights load; until it is
ready the route answers 503 and readiness says so.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
from PIL import Image

from gateway.embeddings.batcher import Batcher
from gateway.embeddings.encoder import Encoder, OpenClipEncoder, Vectors
from gateway.embeddings.protocol import EmbeddingRequest, TextInput
from gateway.errors import InvalidRequest, ModelNotFound, ServiceUnavailable
from gateway.media.parts import ImagePart
from gateway.media.service import MediaPreparer
from gateway.metrics import GatewayMetrics
from gateway.retrieval_settings import EmbeddingsSettings
from gateway.tracing import OFF, Tracing

log = logging.getLogger("gateway.embeddings")

# CLIP reads 77 tokens (75 of text). Every whitespace-separated word is at least one token and no token spans
# more than 32 characters, so the first 76 words, and of them the first 77 x 32 x 2 characters (room for HTML
# entities, which CLIP's cleaning shortens), hold everything CLIP reads: the rest is cut before tokenising.
CLIP_WORDS = 76
CLIP_CHARS = 77 * 32 * 2
# Texts tokenised per job; one request's jobs go one at a time, so another caller's text waits for one job at most.
TOKENIZE_CHUNK = 32


# The longest side CLIP's preprocessing reads (its models take 224-448 px inputs): a JPEG decodes no larger.
ENCODER_SIDE = 448


def clip_prefix(text: str) -> str:
    return " ".join(text.split(maxsplit=CLIP_WORDS)[:CLIP_WORDS])[:CLIP_CHARS]


class EmbeddingsService:
    def __init__(
        self,
        settings: EmbeddingsSettings,
        media: MediaPreparer,
        metrics: GatewayMetrics,
        *,
        enabled: bool,
        tracing: Tracing = OFF,
    ) -> None:
        self.settings = settings
        self._tracing = tracing
        self.enabled = enabled and settings.enabled
        self._media = media
        self._metrics = metrics
        self.encoder: Encoder | None = None
        self.load_error: str | None = None
        # One thread owns the device: torch work is serialised there, never on the event loop.
        self._device = ThreadPoolExecutor(1, thread_name_prefix="clip-device")
        self._prep = ThreadPoolExecutor(2, thread_name_prefix="clip-prep")
        self._batchers: dict[str, Batcher] = {}
        self._loader: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.enabled:
            self._loader = asyncio.create_task(self._load(), name="clip-load")

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            encoder: Encoder = await loop.run_in_executor(self._device, OpenClipEncoder, self.settings)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("CLIP encoder %s failed to load: %s", self.settings.model_name(), self.load_error)
            return
        s = self.settings
        for modality, encode in (("text", encoder.encode_text), ("image", encoder.encode_image)):
            batcher = Batcher(
                modality,
                encode,
                self._device,
                self._metrics,
                max_batch=s.max_batch,
                max_wait=s.max_wait_ms / 1000,
                max_queue=s.max_queue,
                tracing=self._tracing,
            )
            batcher.start()
            self._batchers[modality] = batcher
        self.encoder = encoder

    async def wait_ready(self) -> None:
        if self._loader is not None:
            await asyncio.shield(self._loader)

    async def close(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
        for batcher in self._batchers.values():
            await batcher.close()
        self._device.shutdown(wait=False, cancel_futures=True)
        self._prep.shutdown(wait=False, cancel_futures=True)

    def status(self) -> dict[str, Any]:
        state = "ready" if self.encoder else ("failed" if self.load_error else "loading")
        if not self.enabled:
            state = "disabled"
        return {"model": self.settings.model_name(), "state": state}

    def _require_encoder(self, model: str) -> Encoder:
        if not self.enabled or model != self.settings.model_name():
            raise ModelNotFound(f"The embedding model '{model}' does not exist.", param="model")
        if self.encoder is None:
            reason = "failed to load" if self.load_error else "is still loading"
            raise ServiceUnavailable(f"The embedding model {reason}.", headers={"Retry-After": "5"})
        return self.encoder

    async def embed(self, request: EmbeddingRequest) -> bytes:
        encoder = self._require_encoder(request.model)
        items = request.items()
        if len(items) > self.settings.max_inputs:
            raise InvalidRequest(f"At most {self.settings.max_inputs} inputs per request.", param="input")
        if request.dimensions is not None and request.dimensions > encoder.dim:
            raise InvalidRequest(f"dimensions must be at most {encoder.dim} for this model.", param="dimensions")
        vectors, tokens, _ = await self._encode(encoder, items, [f"input[{i}]" for i in range(len(items))])
        if request.dimensions is not None and request.dimensions < encoder.dim:
            vectors = vectors[:, : request.dimensions]
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return _response(vectors, request, encoder.model_id, tokens)

    async def embed_items(
        self,
        encoder: Encoder,
        items: list[Any],
        params: list[str],
        keep: Callable[[Image.Image], bytes | None] | None = None,
        keep_side: int = 0,
    ) -> tuple[Vectors, list[bytes | None]]:
        """Vectors for texts / image parts on behalf of another service (search), same rules and batching;
        `params[i]` names item i in that service's request, for errors. `keep`, if given, also makes something of
        each decoded image (its display copy, `keep_side` pixels at most) in the same decode, returned per item
        (None for texts)."""
        vectors, _, kept = await self._encode(encoder, items, params, keep, keep_side)
        return vectors, kept

    async def _encode(
        self,
        encoder: Encoder,
        items: list[Any],
        params: list[str],
        keep: Callable[[Image.Image], bytes | None] | None = None,
        keep_side: int = 0,
    ) -> tuple[Vectors, int, list[bytes | None]]:
        texts: list[tuple[int, str]] = []
        token_ids: list[tuple[int, list[int]]] = []
        images: list[tuple[int, str]] = []
        for i, item in enumerate(items):
            if isinstance(item, ImagePart | dict):
                url = item.image_url.url if isinstance(item, ImagePart) else item["image_url"]["url"]
                images.append((i, url))
                continue
            text = item.text if isinstance(item, TextInput) else item
            if isinstance(text, str):
                if len(text) > self.settings.max_input_chars:
                    raise InvalidRequest(
                        f"Input is longer than {self.settings.max_input_chars} characters.", param=params[i]
                    )
                texts.append((i, text))
            else:
                vocab = getattr(encoder, "vocab_size", 1 << 31)
                if any(token >= vocab for token in text):
                    raise InvalidRequest(f"Token ids must be below {vocab}.", param=params[i])
                token_ids.append((i, text))
        loop = asyncio.get_running_loop()
        text_rows: list[Any] = []
        prefixes = [clip_prefix(t) for _, t in texts]
        for start in range(0, len(prefixes), TOKENIZE_CHUNK):
            chunk = prefixes[start : start + TOKENIZE_CHUNK]
            text_rows += await loop.run_in_executor(self._prep, encoder.tokenize, chunk)
        text_rows += [encoder.tokens_from_ids(ids) for _, ids in token_ids]
        text_positions = [i for i, _ in texts] + [i for i, _ in token_ids]
        urls = [(url, f"{params[i]}.image_url") for i, url in images]
        kept: list[bytes | None] = [None] * len(items)
        # Decoded no larger than its uses need (a JPEG, reduce on load): CLIP's input and the display copy.
        cover = max(ENCODER_SIDE, keep_side)
        if keep is None:
            pixel_rows = await self._media.load_images(urls, encoder.preprocess, cover)
        else:
            both = await self._media.load_images(urls, lambda image: (encoder.preprocess(image), keep(image)), cover)
            pixel_rows = [pixels for pixels, _ in both]
            for (i, _), (_, made) in zip(images, both, strict=True):
                kept[i] = made
        vectors = np.zeros((len(items), encoder.dim), np.float32)
        jobs = []
        if text_rows:
            jobs.append((text_positions, self._batchers["text"].submit(text_rows)))
        if pixel_rows:
            jobs.append(([i for i, _ in images], self._batchers["image"].submit(pixel_rows)))
        results = await asyncio.gather(*[job for _, job in jobs])
        for (positions, _), rows in zip(jobs, results, strict=True):
            vectors[positions] = rows
        tokens = sum(int((row != 0).sum()) for row in text_rows) + encoder.image_tokens * len(images)
        return vectors, tokens, kept


def _response(vectors: Vectors, request: EmbeddingRequest, model: str, tokens: int) -> bytes:
    data: list[dict[str, Any]] = []
    for index, vector in enumerate(vectors):
        if request.encoding_format == "base64":
            value: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode()
        else:
            value = vector
        data.append({"object": "embedding", "index": index, "embedding": value})
    body = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
