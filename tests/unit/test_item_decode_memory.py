"""Hardening round 3, class 7: an image item (embedding + display copy) is decoded at the size its uses need and
without full-size copies, so a large, highly compressible image cannot multiply the gateway's memory. Peak RSS is
read in a fresh interpreter (ru_maxrss is a high-water mark), for a PNG (no reduce on load: one decode, then only
small images) and a JPEG (decoded at a DCT scale that still covers the display copy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SIDE = 5000  # 25 MP: 72 MiB as RGB
RAW_MIB = SIDE * SIDE * 3 / 2**20
PROBE = """
import resource, sys
from gateway.embeddings.service import ENCODER_SIDE
from gateway.media.images import decode_image
from gateway.search.display import display_copy
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = decode_image(data, max_decode_pixels=64_000_000, formats=("PNG", "JPEG"), param="p", cover=ENCODER_SIDE)
clip_input = image.resize((224, 224))
display = display_copy(image, 448, 32 * 1024)
assert display is not None and clip_input.size == (224, 224)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.parametrize(
    ("name", "mode", "bound"), [("big.png", "RGB", 1.6), ("alpha.png", "RGBA", 3.2), ("big.jpg", "RGB", 0.3)]
)
def test_a_large_item_image_costs_at_most_its_own_decode(tmp_path: Path, name: str, mode: str, bound: float) -> None:
    path = tmp_path / name
    colour = (90, 140, 200, 128) if mode == "RGBA" else (90, 140, 200)
    image = Image.new(mode, (SIDE, SIDE), colour)
    if name.endswith(".jpg"):
        image.save(path, quality=90)
    else:
        image.save(path)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, cwd=root, check=True, timeout=120
    )
    peak_mib = float(done.stdout.strip().splitlines()[-1])
    # Before: a full-size copy for EXIF (even with none), one more for an RGBA conversion to itself, one more per
    # display-copy attempt — 2.7x the raw image for an RGB PNG, 5.7x with alpha, 2.7x for a JPEG.
    assert peak_mib <= bound * RAW_MIB, f"{name}: peak +{peak_mib:.0f} MiB for a {RAW_MIB:.0f} MiB image"
