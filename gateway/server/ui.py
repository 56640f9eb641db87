"""The browser pages: search (`/ui`) and chat (`/ui/chat`), static files from the package, no build step, no CDN.

The pages call the API with the key the user types, so they need no auth of their own. Every response carries a
Content-Security-Policy that admits scripts, styles and requests from the gateway's own origin only, and images
from it or data URLs (a thumbnail or an attachment can never pull from elsewhere), and may not be framed.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from gateway.errors import NotFound

router = APIRouter(include_in_schema=False)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "media-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
ASSETS = {name: "text/javascript" for name in ("common.js", "search.js", "chat.js")} | {"ui.css": "text/css"}


@cache
def _read(name: str) -> bytes:
    return resources.files("gateway.ui").joinpath(name).read_bytes()


def _page(name: str, media_type: str) -> Response:
    return Response(_read(name), media_type=f"{media_type}; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/ui")
async def search_page() -> Response:
    return _page("search.html", "text/html")


@router.get("/ui/chat")
async def chat_page() -> Response:
    return _page("chat.html", "text/html")


@router.get("/ui/assets/{name}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)  # an allow-list: no path from the request reaches the file system
    if media_type is None:
        raise NotFound("No such file.")
    return _page(name, media_type)
