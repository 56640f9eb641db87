"""Decode, check and resize one image into the pool's pixel budget. Runs in a worker thread, never on the loop.

The pixel count is read from the header before any decoding, decoder formats are allow-listed, and every tile a
decoder would write must lie inside the declared canvas (a GIF frame larger than its screen is a bomb).
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gateway.errors import ImageRefused

PATCH = 28  # Qwen2.5-VL: 14-pixel patches merged 2x2 -> one visual token per 28x28 pixels
MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's processor refuses more extreme shapes
JPEG_QUALITY = 95


@dataclass(frozen=True, slots=True)
class PreparedMedia:
    data_url: str
    sha256: str
    width: int
    height: int
    visual_tokens: int
    source_bytes: int


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = PATCH) -> tuple[int, int]:
    """Qwen2.5-VL's own rule (qwen-vl-utils): sides to multiples of `factor`, area within [min, max] pixels."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _check_tiles(image: Image.Image, param: str) -> None:
    width, height = image.size
    for tile in getattr(image, "tile", None) or []:
        left, top, right, bottom = tile[1]
        if left < 0 or top < 0 or right > width or bottom > height:
            raise ImageRefused("The image declares a frame outside its canvas.", param=param)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


# EXIF orientations that turn the stored image a quarter turn: its displayed width is the stored height.
QUARTER_TURNS = {5, 6, 7, 8}
# From this shrink factor on (either side), pixels are area-averaged rather than bicubic-sampled: a cubic
# kernel that does not widen with the factor would alias.
AREA_FROM = 2.0
# One thread per resize: the decode pool is the parallelism, and OpenCV's own threads would oversubscribe it.
cv2.setNumThreads(1)


def open_image(data: bytes, *, max_decode_pixels: int, formats: tuple[str, ...], param: str) -> Image.Image:
    """The image's header, checked before any pixel is decoded: format allow-list, pixel count, aspect ratio and
    tiles inside the canvas."""
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError:
        raise ImageRefused(f"The image is not in an accepted format ({', '.join(formats)}).", param=param) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRefused(f"The image has more than {max_decode_pixels} pixels.", param=param) from None
    except (OSError, ValueError, SyntaxError):
        raise ImageRefused("The image could not be read.", param=param) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRefused("The image has no pixels.", param=param)
    if width * height > max_decode_pixels:
        raise ImageRefused(
            f"The image is {width}x{height}; at most {max_decode_pixels} pixels are decoded.", param=param
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageRefused(f"The image's aspect ratio exceeds {MAX_ASPECT_RATIO}:1.", param=param)
    _check_tiles(image, param)
    return image


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as shown, after the EXIF orientation, read without decoding."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112)
    except (OSError, ValueError, SyntaxError):
        orientation = None
    return (height, width) if orientation in QUARTER_TURNS else (width, height)


def load_rgb(image: Image.Image, param: str, *, shrink_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode an opened image to RGB, upright, alpha flattened on white.

    `shrink_to` (displayed width, height) lets a JPEG decode straight at a smaller scale (libjpeg's DCT scaling,
    Pillow's `draft`): never below that size, so the resize after it still only shrinks."""
    try:
        if shrink_to is not None and image.format == "JPEG":
            width, height = shrink_to
            stored = (height, width) if displayed_size(image) != (image.width, image.height) else (width, height)
            image.draft(None, stored)
        image.load()  # first frame only: animations are read as a still
        return _to_rgb(ImageOps.exif_transpose(image) or image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRefused("The image could not be decoded.", param=param) from None


def resize(rgb: Image.Image, width: int, height: int) -> Image.Image:
    """`rgb` at exactly width x height. OpenCV's vectorised resize: on a 1024x768 photo ~7x faster than Pillow's
    bicubic (1.2 against 7.9 ms on one core), which was most of the media path's time for ordinary photos."""
    factor = max(rgb.width / width, rgb.height / height)
    interpolation = cv2.INTER_AREA if factor >= AREA_FROM else cv2.INTER_CUBIC
    return Image.fromarray(cv2.resize(np.asarray(rgb), (width, height), interpolation=interpolation))


def decode_image(data: bytes, *, max_decode_pixels: int, formats: tuple[str, ...], param: str) -> Image.Image:
    """An RGB image from untrusted bytes: format allow-list, header pixel check, tile check, EXIF orientation."""
    return load_rgb(open_image(data, max_decode_pixels=max_decode_pixels, formats=formats, param=param), param)


def prepare_image(
    data: bytes,
    *,
    min_pixels: int,
    max_pixels: int,
    max_decode_pixels: int,
    formats: tuple[str, ...],
    param: str,
) -> PreparedMedia:
    """Check, then decode and resize into the pool's budget with Qwen2.5-VL's rule, as a JPEG data URL for vLLM.

    The target size comes from the header (as shown, after EXIF orientation), so a large JPEG decodes at the
    smallest DCT scale that still covers it; the output's size, hence its visual tokens, is exactly what
    decoding at full size and resizing would give."""
    image = open_image(data, max_decode_pixels=max_decode_pixels, formats=formats, param=param)
    width, height = displayed_size(image)
    new_height, new_width = smart_resize(height, width, min_pixels, max_pixels)
    shrinking = new_width < width and new_height < height
    rgb = load_rgb(image, param, shrink_to=(new_width, new_height) if shrinking else None)
    if rgb.size != (new_width, new_height):
        rgb = resize(rgb, new_width, new_height)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=JPEG_QUALITY)
    encoded = out.getvalue()
    return PreparedMedia(
        data_url="data:image/jpeg;base64," + base64.b64encode(encoded).decode(),
        sha256=hashlib.sha256(encoded).hexdigest(),
        width=new_width,
        height=new_height,
        visual_tokens=(new_height // PATCH) * (new_width // PATCH),
        source_bytes=len(data),
    )
