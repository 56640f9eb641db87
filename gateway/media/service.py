"""Turn every image/video part of a request into a checked, resized data URL, once.

Parts are prepared concurrently (fetches bounded by the fetcher, decoding by a small thread pool); the first
failure cancels the rest. Results are cached briefly by URL and by content hash, so a conversation that resends
the same image every turn pays for it once, and the hash goes to vLLM as the part's `uuid` so its multimodal cache
hits too. Concurrent requests for the same media share one fetch.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from gateway.config import MediaSettings, ModelPool
from gateway.errors import ContextLengthExceeded, GatewayError, InvalidRequest, MediaTooLarge, MediaUrlRefused
from gateway.media.fetch import MediaFetcher, decode_data_url
from gateway.media.images import PreparedMedia, decode_image, prepare_image
from gateway.media.video import VideoCaps, prepare_video
from gateway.metrics import GatewayMetrics
from gateway.tracing import OFF, Tracing, failed

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MediaPart:
    """One image or video of a request; `param` is where the caller's API names it, for errors."""

    modality: str  # "image" | "video"
    url: str
    param: str


class _TtlCache:
    """Prepared media by key, bounded in entries and in bytes, oldest first out.

    Entries live `ttl` seconds from when they were stored; the order of insertion is the order of expiry, so
    expired entries are dropped from the front on every use (and by `sweep`), not only when read again.
    """

    def __init__(self, entries: int, max_bytes: int, ttl: float) -> None:
        self._entries = entries
        self._max_bytes = max_bytes
        self._ttl = ttl
        self._items: OrderedDict[tuple[str, ...], tuple[float, PreparedMedia]] = OrderedDict()
        self.bytes = 0

    @staticmethod
    def _size(value: PreparedMedia) -> int:
        return len(value.data_url) + 256  # the data URL dominates; the rest is a small constant

    def _drop_first(self) -> None:
        _, (_, value) = self._items.popitem(last=False)
        self.bytes -= self._size(value)

    def sweep(self) -> None:
        now = time.monotonic()
        while self._items and next(iter(self._items.values()))[0] <= now:
            self._drop_first()

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def get(self, key: tuple[str, ...]) -> PreparedMedia | None:
        self.sweep()
        item = self._items.get(key)
        return item[1] if item is not None else None

    def put(self, key: tuple[str, ...], value: PreparedMedia) -> None:
        self.sweep()
        size = self._size(value)
        if self._entries == 0 or size > self._max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= self._size(old[1])
        self._items[key] = (time.monotonic() + self._ttl, value)
        self.bytes += size
        while len(self._items) > self._entries or self.bytes > self._max_bytes:
            self._drop_first()


class MediaPreparer:
    def __init__(self, settings: MediaSettings, metrics: GatewayMetrics, tracing: Tracing = OFF) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing
        self.fetcher = MediaFetcher(settings)
        self._executor = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="media-decode")
        self._cache = _TtlCache(settings.cache_entries, settings.cache_bytes, settings.cache_ttl)
        self._inflight: dict[tuple[str, ...], asyncio.Future[PreparedMedia]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._video_caps = VideoCaps(
            settings.video_max_seconds,
            settings.video_max_fps,
            settings.video_max_frames,
            settings.video_max_frame_pixels,
        )
        # Pillow's own bomb guard agrees with ours, and its warning is an error rather than a log line.
        Image.MAX_IMAGE_PIXELS = settings.max_decode_pixels
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        self._formats = tuple(f.upper() for f in settings.image_formats)

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="media-cache-sweep")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._cache.sweep()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.fetcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def prepare(self, parts: list[MediaPart], pool: ModelPool) -> list[PreparedMedia]:
        """Each part checked and resized for `pool`, in order; refuses the request if their visual tokens alone
        fill the pool's context."""
        budget = _RequestBudget(self.settings.max_request_bytes)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._prepare_one(part, pool, budget)) for part in parts]
        except* GatewayError as failed:
            first = failed.exceptions[0]
            assert isinstance(first, GatewayError)
            self.metrics.media_rejections.labels(first.code or "invalid").inc()
            raise first from None
        prepared = [task.result()[1] for task in tasks]
        visual_tokens = sum(item.visual_tokens for item in prepared)
        self.metrics.media_visual_tokens.observe(visual_tokens)
        if pool.max_model_len is not None and visual_tokens >= pool.max_model_len:
            raise ContextLengthExceeded(
                f"The request's images and videos need about {visual_tokens} visual tokens; the model's context "
                f"length is {pool.max_model_len}.",
                param="messages",
            )
        # Cached only now: a request refused by its own checks leaves nothing behind in memory.
        for task in tasks:
            key, item = task.result()
            self._cache.put(key, item)
        return prepared

    def release_memory(self) -> None:
        """Under memory pressure: drop every cached item."""
        self._cache.clear()

    async def _prepare_one(
        self, part: MediaPart, pool: ModelPool, budget: _RequestBudget
    ) -> tuple[tuple[str, ...], PreparedMedia]:
        remote = not part.url.startswith("data:")
        identity = part.url if remote else hashlib.sha256(part.url.encode()).hexdigest()
        key = (part.modality, "url" if remote else "data", identity, str(pool.min_pixels), str(pool.max_pixels))
        cached = self._cache.get(key)
        if cached is not None:
            self.metrics.media_cache_hits.labels(part.modality).inc()
            budget.spend(cached.source_bytes, part.param)
            return key, cached
        pending = self._inflight.get(key)
        if pending is not None:
            try:
                prepared = await asyncio.shield(pending)
            except GatewayError as shared:  # the first requester's error, told in this request's own terms
                raise type(shared)(shared.message, param=part.param, code=shared.code, headers=shared.headers) from None
            budget.spend(prepared.source_bytes, part.param)
            return key, prepared
        future: asyncio.Future[PreparedMedia] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            prepared = await self._load(part, pool, budget)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so a future nobody else awaited does not warn
            raise
        finally:
            del self._inflight[key]
        future.set_result(prepared)
        return key, prepared

    async def _read(self, url: str, modality: str, param: str, budget: _RequestBudget) -> tuple[bytes, str]:
        """(bytes, source) of one item, within the per-item and per-request byte caps. A data URL's label is not
        kept: the decoders decide what the bytes are."""
        settings = self.settings
        cap = settings.max_image_bytes if modality == "image" else settings.max_video_bytes
        if url.startswith("data:"):
            if not settings.allow_data_urls:
                raise MediaUrlRefused("data: URLs are disabled on this gateway.", param=param)
            _label, data = decode_data_url(url, cap, param)
            source = "data"
        else:
            with self.tracing.span("gateway.media.fetch", attributes={"gateway.media.modality": modality}) as span:
                try:
                    data, source = await self.fetcher.fetch(url, cap, param), "remote"
                except GatewayError as error:
                    failed(span, error.code or error.type)
                    raise
                if span is not None:
                    span.set_attribute("gateway.media.bytes", len(data))
        budget.spend(len(data), param)
        self.metrics.media_bytes.labels(modality, source).inc(len(data))
        return data, source

    async def _load(self, part: MediaPart, pool: ModelPool, budget: _RequestBudget) -> PreparedMedia:
        started = time.perf_counter()
        data, source = await self._read(part.url, part.modality, part.param, budget)
        with self.tracing.span("gateway.media.decode", attributes={"gateway.media.modality": part.modality}) as span:
            try:
                prepared = await self._decode(part, pool, data)
            except GatewayError as error:
                failed(span, error.code or error.type)
                raise
            if span is not None:
                span.set_attribute("gateway.media.visual_tokens", prepared.visual_tokens)
        self.metrics.media_items.labels(part.modality, source).inc()
        self.metrics.media_prepare_seconds.labels(part.modality, source).observe(time.perf_counter() - started)
        return prepared

    async def _decode(self, part: MediaPart, pool: ModelPool, data: bytes) -> PreparedMedia:
        settings = self.settings
        loop = asyncio.get_running_loop()
        if part.modality == "image":
            formats = self._formats
            prepared = await loop.run_in_executor(
                self._executor,
                lambda: prepare_image(
                    data,
                    min_pixels=pool.min_pixels,
                    max_pixels=pool.max_pixels,
                    max_decode_pixels=settings.max_decode_pixels,
                    formats=formats,
                    param=part.param,
                ),
            )
        else:
            prepared = await loop.run_in_executor(self._executor, prepare_video, data, self._video_caps, part.param)
        return prepared

    async def load_images(
        self, urls: list[tuple[str, str]], transform: Callable[[Image.Image], T], cover: int | None = None
    ) -> list[T]:
        """Fetch and decode (url, param) images under the same rules, then `transform` each in the decode pool.

        For encoders that bring their own resizing (CLIP's preprocess), so no Qwen budget applies. `cover`: the
        longest side any use of the image needs (a JPEG is decoded no larger than that, reduce on load).
        """
        budget = _RequestBudget(self.settings.max_request_bytes)
        formats, max_pixels = self._formats, self.settings.max_decode_pixels
        remote = [param for url, param in urls if not url.startswith("data:")]
        cap = self.settings.max_remote_images_per_request
        if len(remote) > cap:  # counted before any fetch, as chat's limit_mm_per_prompt is
            raise InvalidRequest(f"At most {cap} remote image URLs per request.", param=remote[cap])
        loop = asyncio.get_running_loop()

        async def one(url: str, param: str) -> T:
            started = time.perf_counter()
            data, source = await self._read(url, "image", param, budget)
            result = await loop.run_in_executor(
                self._executor,
                lambda: transform(
                    decode_image(data, max_decode_pixels=max_pixels, formats=formats, param=param, cover=cover)
                ),
            )
            self.metrics.media_items.labels("image", source).inc()
            self.metrics.media_prepare_seconds.labels("image", source).observe(time.perf_counter() - started)
            return result

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(url, param)) for url, param in urls]
        except* GatewayError as failed:
            first = failed.exceptions[0]
            assert isinstance(first, GatewayError)
            self.metrics.media_rejections.labels(first.code or "invalid").inc()
            raise first from None
        return [task.result() for task in tasks]


class _RequestBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spent = 0

    def spend(self, nbytes: int, param: str) -> None:
        self.spent += nbytes
        if self.spent > self.limit:
            raise MediaTooLarge(f"The request's media exceed the limit of {self.limit} bytes in all.", param=param)
