"""Decode, check and resize one image into the pool's pixel budget. Runs in a worker thread, never on the loop.

The pixel count is read from the header before any decoding, decoder formats are allow-listed, and every tile a
decoder would write must lie inside the declared canvas (a GIF frame larger than its screen is a bomb).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from gateway.errors import ImageRefused
from gateway.media.data_urls import data_url
from gateway.media.pixels import decode_pixels, encode_jpeg, flatten_to_rgb, orient, resize

PATCH = 28  # Qwen2.5-VL: 14-pixel patches merged 2x2 -> one visual token per 28x28 pixels
MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's processor refuses more extreme shapes


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


# EXIF orientations that turn the stored image a quarter turn: its displayed width is the stored height.
QUARTER_TURNS = {5, 6, 7, 8}


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


def exif_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag (1-8) of an opened image, read without decoding; None when absent or unreadable."""
    try:
        orientation = image.getexif().get(0x0112)
    except (OSError, ValueError, SyntaxError):
        return None
    return orientation if isinstance(orientation, int) else None


def load_rgb(image: Image.Image, param: str, cover: int | None = None) -> Image.Image:
    """Decode an opened image to RGB, upright, alpha flattened on white (first frame only: an animation is read
    as a still). For callers that want a Pillow image (CLIP's preprocess, display copies). With `cover`, a JPEG
    is decoded at the smallest DCT scale whose sides are still at least `cover` pixels (reduce on load); the
    image is turned upright only when its EXIF says so (Pillow's transpose copies the whole image otherwise)."""
    try:
        if cover is not None and image.format == "JPEG":
            image.draft("RGB", (cover, cover))
        orientation = exif_orientation(image)
        image.load()
        if orientation not in (None, 1):
            image = ImageOps.exif_transpose(image) or image
        return flatten_to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRefused("The image could not be decoded.", param=param) from None


def decode_image(
    data: bytes, *, max_decode_pixels: int, formats: tuple[str, ...], param: str, cover: int | None = None
) -> Image.Image:
    """An RGB image from untrusted bytes: format allow-list, header pixel check, tile check, EXIF orientation;
    a JPEG no larger than `cover` needs (see load_rgb)."""
    image = open_image(data, max_decode_pixels=max_decode_pixels, formats=formats, param=param)
    return load_rgb(image, param, cover)


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
    decoding at full size and resizing would give. Pixels stay in one numpy array from decode to encode, in the
    stored orientation until the (smaller) resized image is turned upright: Pillow's orient, convert and
    array hand-off each copied the full-size image, ~60% of the time for a 3 MP photo."""
    image = open_image(data, max_decode_pixels=max_decode_pixels, formats=formats, param=param)
    orientation = exif_orientation(image)
    width, height = image.size  # as stored
    turned = orientation in QUARTER_TURNS
    new_height, new_width = smart_resize(*((width, height) if turned else (height, width)), min_pixels, max_pixels)
    stored_target = (new_height, new_width) if turned else (new_width, new_height)
    pixels = decode_pixels(image, data, param, cover=stored_target)
    if (pixels.shape[1], pixels.shape[0]) != stored_target:
        pixels = resize(pixels, *stored_target)
    encoded = encode_jpeg(orient(pixels, orientation))
    return PreparedMedia(
        data_url=data_url(encoded),
        sha256=hashlib.sha256(encoded).hexdigest(),
        width=new_width,
        height=new_height,
        visual_tokens=(new_height // PATCH) * (new_width // PATCH),
        source_bytes=len(data),
    )
