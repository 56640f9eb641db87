"""One image's pixels as a numpy array, from decode to JPEG: DCT-scaled decode, resize, orientation, encode.

The media path keeps an image in one array instead of passing Pillow images along: each Pillow step (orient,
convert, the hand-off to OpenCV) copied the full-size image. libjpeg-turbo does the JPEG work on both ends
(simplejpeg ships it), OpenCV the resize. Runs in a worker thread, never on the loop.
"""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from gateway.errors import ImageRefused

JPEG_QUALITY = 95
# From this shrink factor on (either side), pixels are area-averaged rather than bicubic-sampled: a cubic
# kernel that does not widen with the factor would alias.
AREA_FROM = 2.0
# libjpeg-turbo decodes at M/8 scales, but only 1/2, 1/4 and 1/8 have SIMD inverse DCTs: 5/8 of a 2048x1536 JPEG
# took 10.4 ms against 6.0 ms for the full image (one core), so only those and a full decode are used.
DCT_SHRINKS = (8, 4, 2)
# Pillow's JPEG modes that libjpeg-turbo converts to RGB itself (YCbCr, RGB, grayscale); CMYK/YCCK go via Pillow.
DIRECT_JPEG_MODES = ("RGB", "L")
# One thread per resize: the decode pool is the parallelism, and OpenCV's own threads would oversubscribe it.
cv2.setNumThreads(1)


def flatten_to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (what a viewer shows), never a black background."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")  # converting RGBA to itself copies it
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _dct_shrink(stored: tuple[int, int], cover: tuple[int, int]) -> int:
    """The largest SIMD DCT scale-down whose output (libjpeg rounds sizes up) still covers `cover`, else 1."""
    (width, height), (want_width, want_height) = stored, cover
    for shrink in DCT_SHRINKS:
        if -(-width // shrink) >= want_width and -(-height // shrink) >= want_height:
            return shrink
    return 1


def decode_pixels(image: Image.Image, data: bytes, param: str, *, cover: tuple[int, int]) -> np.ndarray:
    """The opened (header-checked) `image` as an RGB uint8 array in its stored orientation, alpha flattened.

    A JPEG decodes straight from `data` at the smallest DCT scale still at least `cover` (stored width, height),
    so the resize after it only shrinks; other formats (and CMYK JPEGs) decode through Pillow, first frame only.
    """
    try:
        if image.format == "JPEG" and image.mode in DIRECT_JPEG_MODES:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            if (width, height) != image.size:  # two parsers must agree on what the pixel check was about
                raise ImageRefused("The image's header is inconsistent.", param=param)
            shrink = _dct_shrink((width, height), cover)
            decoded: np.ndarray = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_width=-(-width // shrink), min_height=-(-height // shrink)
            )
            return decoded
        if image.format == "JPEG":
            image.draft(None, cover)  # CMYK: Pillow's DCT scaling, never below `cover`
        image.load()
        return np.asarray(flatten_to_rgb(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRefused("The image could not be decoded.", param=param) from None


def resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """`pixels` at exactly width x height. OpenCV's vectorised resize: on a 1024x768 photo ~7x faster than
    Pillow's bicubic (1.2 against 7.9 ms on one core)."""
    factor = max(pixels.shape[1] / width, pixels.shape[0] / height)
    interpolation = cv2.INTER_AREA if factor >= AREA_FROM else cv2.INTER_CUBIC
    resized: np.ndarray = cv2.resize(pixels, (width, height), interpolation=interpolation)
    return resized


def orient(pixels: np.ndarray, orientation: int | None) -> np.ndarray:
    """`pixels` as an EXIF `orientation` says to show them (the same turns and flips as Pillow's exif_transpose)."""
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(pixels, -1)
    if orientation == 7:
        return pixels[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(pixels, 1)
    return pixels


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """Baseline JPEG, 4:2:0, quality 95, accurate DCT: what Pillow's default save wrote, ~30% sooner."""
    encoded: bytes = simplejpeg.encode_jpeg(
        np.ascontiguousarray(pixels), quality=JPEG_QUALITY, colorspace="RGB", colorsubsampling="420", fastdct=False
    )
    return encoded
