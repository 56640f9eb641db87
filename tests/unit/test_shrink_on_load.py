"""A large JPEG decodes at a smaller DCT scale and the resize is OpenCV's, yet the prepared image has exactly the
size (so the visual tokens) and, within JPEG noise, the pixels of a full decode and Pillow's bicubic resize:
orientation, modes, formats and both resize kernels included."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image, ImageChops, ImageOps, ImageStat

from gateway.media.images import PATCH, prepare_image, smart_resize

MIN_PIXELS, ONE_MEGAPIXEL = 4 * 28 * 28, 1280 * 28 * 28


def _photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    image = Image.effect_mandelbrot((width, height), (-2.0, -1.5, 1.0, 1.5), 60)
    return image.convert(mode)


def _encode(image: Image.Image, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(out, fmt, quality=92, exif=exif)
    else:
        image.save(out, fmt, quality=92) if fmt == "JPEG" else image.save(out, fmt)
    return out.getvalue()


def _reference(data: bytes, max_pixels: int) -> Image.Image:
    """The old path: decode at full size, orient, flatten, bicubic resize."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    height, width = smart_resize(image.height, image.width, MIN_PIXELS, max_pixels)
    return image.resize((width, height), Image.Resampling.BICUBIC)


def _prepared(data: bytes, max_pixels: int) -> tuple[Image.Image, int]:
    prepared = prepare_image(
        data,
        min_pixels=MIN_PIXELS,
        max_pixels=max_pixels,
        max_decode_pixels=10**8,
        formats=("JPEG", "PNG"),
        param="p",
    )
    raw = base64.b64decode(prepared.data_url.split(",", 1)[1])
    return Image.open(io.BytesIO(raw)).convert("RGB"), prepared.visual_tokens


@pytest.mark.parametrize(
    ("size", "mode", "fmt", "orientation", "max_pixels"),
    [
        ((4032, 3024), "RGB", "JPEG", None, ONE_MEGAPIXEL),  # a phone photo into ~1 MP: decoded at 1/2
        ((4032, 3024), "RGB", "JPEG", 6, ONE_MEGAPIXEL),  # stored landscape, shown portrait
        ((3024, 4032), "RGB", "JPEG", 8, ONE_MEGAPIXEL),
        ((4000, 1000), "L", "JPEG", None, 200 * 28 * 28),  # grayscale, small budget: 1/8 scale
        ((2400, 1800), "CMYK", "JPEG", None, ONE_MEGAPIXEL),
        ((2048, 1536), "RGB", "JPEG", None, 16384 * 28 * 28),  # within the default budget: no shrink at all
        ((1500, 1500), "RGB", "PNG", None, ONE_MEGAPIXEL),  # not a JPEG: full decode as before
        ((1024, 768), "RGB", "JPEG", None, 16384 * 28 * 28),  # to 1036x756: one side up, one down (cubic)
        ((3000, 2400), "RGB", "PNG", None, 200 * 28 * 28),  # shrunk ~7x in one resize: area-averaged
    ],
)
def test_the_prepared_image_matches_a_full_decode(
    size: tuple[int, int], mode: str, fmt: str, orientation: int | None, max_pixels: int
) -> None:
    data = _encode(_photo(*size, mode=mode), fmt, orientation)
    expected = _reference(data, max_pixels)
    got, tokens = _prepared(data, max_pixels)
    assert got.size == expected.size, "same size, so the same visual tokens for vLLM"
    assert tokens == (expected.height // PATCH) * (expected.width // PATCH)
    difference = ImageStat.Stat(ImageChops.difference(got, expected)).mean
    assert max(difference) < 6, difference  # of 255: JPEG noise, not a different or rotated picture
    flipped = ImageStat.Stat(ImageChops.difference(got, expected.transpose(Image.Transpose.ROTATE_180))).mean
    assert max(flipped) > max(difference) * 2, "the check can tell a wrong orientation apart"


@pytest.mark.parametrize(
    ("size", "max_pixels", "decoded_at"),
    [
        ((4032, 3024), ONE_MEGAPIXEL, (2016, 1512)),  # 1/2 scale: still above the 1148x840 target
        ((2048, 1536), ONE_MEGAPIXEL, (2048, 1536)),  # 1148x868 wanted: 1/2 is too small, 5/8 slower than full
        ((4000, 1000), 200 * 28 * 28, (1000, 250)),  # 1/4 for 784x196 (1/8 would be 500x125)
        ((4000, 1000), 40 * 28 * 28, (500, 125)),  # 1/8 for 336x84
    ],
)
def test_a_large_jpeg_is_decoded_at_the_smallest_simd_scale_that_covers_it(
    monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], max_pixels: int, decoded_at: tuple[int, int]
) -> None:
    from gateway.media import pixels

    decoded: list[tuple[int, int]] = []
    original = pixels.simplejpeg.decode_jpeg

    def recording_decode(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)
        decoded.append((result.shape[1], result.shape[0]))
        return result

    monkeypatch.setattr(pixels.simplejpeg, "decode_jpeg", recording_decode)
    _prepared(_encode(_photo(*size)), max_pixels)
    assert decoded == [decoded_at]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_shown_as_pillow_shows_it(orientation: int) -> None:
    """An asymmetric picture (a dark corner block on a gradient) in each of the eight EXIF orientations."""
    image = _photo(1200, 800)
    image.paste((20, 20, 20), (0, 0, 400, 200))
    data = _encode(image, orientation=orientation)
    expected = _reference(data, ONE_MEGAPIXEL // 2)
    got, _ = _prepared(data, ONE_MEGAPIXEL // 2)
    assert got.size == expected.size
    assert max(ImageStat.Stat(ImageChops.difference(got, expected)).mean) < 6


def test_transparency_is_flattened_on_white() -> None:
    image = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    image.paste((200, 0, 0, 255), (0, 0, 150, 200))
    got, _ = _prepared(_encode(image, "PNG"), ONE_MEGAPIXEL)
    assert got.getpixel((250, 100)) >= (250, 250, 250)  # the transparent half: white, not black
    red, green, _ = got.getpixel((50, 100))
    assert red > 190 and green < 15


def test_a_jpeg_whose_two_headers_disagree_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.errors import ImageRefused
    from gateway.media import pixels

    monkeypatch.setattr(pixels.simplejpeg, "decode_jpeg_header", lambda data: (16000, 16000, "YCbCr", "420"))
    with pytest.raises(ImageRefused, match="inconsistent"):
        _prepared(_encode(_photo(640, 480)), ONE_MEGAPIXEL)


def test_a_truncated_jpeg_is_refused_not_half_decoded() -> None:
    from gateway.errors import ImageRefused

    data = _encode(_photo(640, 480))
    with pytest.raises(ImageRefused, match="could not be decoded"):
        _prepared(data[: len(data) // 2], ONE_MEGAPIXEL)
