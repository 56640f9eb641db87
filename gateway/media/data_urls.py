"""`data:` URLs, built in one place: the form in which prepared media reach vLLM and stored images reach clients."""

from __future__ import annotations

import base64


def data_url(data: bytes, media_type: str = "image/jpeg") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()
