"""Check a video against the operator's caps and forward it whole (vLLM samples the frames).

Sampling at the gateway would duplicate vLLM's own Qwen2.5-VL frame sampler and its timing metadata (M-RoPE
uses absolute time); forwarding within caps keeps answers identical to a direct call. The container is probed
(header and stream metadata only) in a worker thread; nothing is decoded.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import av

from gateway.errors import VideoRefused
from gateway.media.data_urls import data_url
from gateway.media.images import PATCH, PreparedMedia, smart_resize

SAMPLED_FPS = 2.0  # Qwen2.5-VL's default sampling rate
TEMPORAL_PATCH = 2
MAX_SAMPLED_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28


# The container the probe found decides the media type sent on, never the client's label: vLLM then decodes
# by the same path the gateway checked. Containers outside this list are refused.
CONTAINER_TYPES = {"mp4": "video/mp4", "mov": "video/mp4", "matroska": "video/webm", "webm": "video/webm"}


def _sniffed_type(format_name: str) -> str | None:
    for name in format_name.split(","):
        if name in CONTAINER_TYPES:
            return CONTAINER_TYPES[name]
    return None


@dataclass(frozen=True, slots=True)
class VideoCaps:
    max_seconds: float
    max_fps: float
    max_frames: int
    max_frame_pixels: int


def prepare_video(data: bytes, caps: VideoCaps, param: str) -> PreparedMedia:
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            media_type = _sniffed_type(container.format.name)
            if media_type is None:
                raise VideoRefused("The video's container is not accepted (MP4, MOV, WebM, Matroska).", param=param)
            if not container.streams.video:
                raise VideoRefused("The video has no video stream.", param=param)
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = (container.duration or 0) / av.time_base
            frames = stream.frames or math.ceil(seconds * fps)
    except av.FFmpegError:
        raise VideoRefused("The video could not be read.", param=param) from None
    if width <= 0 or height <= 0 or seconds <= 0 or fps <= 0:
        raise VideoRefused("The video's size, duration or frame rate is missing.", param=param)
    for value, cap, what in (
        (seconds, caps.max_seconds, "seconds long"),
        (fps, caps.max_fps, "frames per second"),
        (frames, caps.max_frames, "frames"),
        (width * height, caps.max_frame_pixels, "pixels per frame"),
    ):
        if value > cap:
            raise VideoRefused(f"The video has {value:g} {what}; the limit is {cap:g}.", param=param)
    sampled = min(MAX_SAMPLED_FRAMES, max(TEMPORAL_PATCH, math.ceil(seconds * SAMPLED_FPS)))
    frame_h, frame_w = smart_resize(height, width, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
    tokens = math.ceil(sampled / TEMPORAL_PATCH) * (frame_h // PATCH) * (frame_w // PATCH)
    return PreparedMedia(
        data_url=data_url(data, media_type),
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        visual_tokens=tokens,
        source_bytes=len(data),
    )
