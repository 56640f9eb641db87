"""An image item's display copy: the picture chat grounding shows the model (and the chat page shows the user).

Made from the same decoded image the encoder embeds (the media guard's checks, EXIF orientation applied, alpha
flattened), as a JPEG whose longer side is at most `size` pixels and whose bytes are at most `max_bytes`: the
quality steps down, then the size, until it fits. The 128 px thumbnail the ingest CLI keeps in metadata is for
result lists; this one is large enough for the vision model to read.
"""

from __future__ import annotations

import io

from PIL import Image

QUALITIES = (85, 75, 60, 45)
SMALLEST = 64  # below this a display copy is no use to the model: none is kept


def display_copy(image: Image.Image, size: int, max_bytes: int) -> bytes | None:
    """The JPEG display copy of an RGB image, or None when even SMALLEST px cannot fit in max_bytes."""
    side = min(size, max(image.size))
    while side >= SMALLEST:
        scaled = _fit(image, side)
        for quality in QUALITIES:
            out = io.BytesIO()
            scaled.save(out, "JPEG", quality=quality, optimize=True)
            if out.tell() <= max_bytes:
                return out.getvalue()
        side = side * 3 // 4
    return None


def _fit(image: Image.Image, side: int) -> Image.Image:
    """A new image whose longer side is at most `side`, made without a full-size copy of a large original."""
    width, height = image.size
    scale = side / max(width, height)
    if scale >= 1:
        return image.copy()
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
