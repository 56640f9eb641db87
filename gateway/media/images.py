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


def decode_image(data: bytes, *, max_decode_pixels: int, formats: tuple[str, ...], param: str) -> Image.Image:
    """An RGB image from untrusted bytes: format allow-list, header pixel check, tile check, EXIF orientation."""
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
    try:
        image.load()  # first frame only: animations are read as a still
        return _to_rgb(ImageOps.exif_transpose(image) or image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRefused("The image could not be decoded.", param=param) from None


def prepare_image(
    data: bytes,
    *,
    min_pixels: int,
    max_pixels: int,
    max_decode_pixels: int,
    formats: tuple[str, ...],
    param: str,
) -> PreparedMedia:
    """Decode, then resize into the pool's budget with Qwen2.5-VL's rule, as a JPEG data URL for vLLM."""
    rgb = decode_image(data, max_decode_pixels=max_decode_pixels, formats=formats, param=param)
    height, width = rgb.height, rgb.width
    new_height, new_width = smart_resize(height, width, min_pixels, max_pixels)
    if (new_height, new_width) != (height, width):
        rgb = rgb.resize((new_width, new_height), Image.Resampling.BICUBIC)
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
