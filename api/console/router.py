"""``/console``: the operator's console, static files shipped in the package.

The files are public; every data call the page makes goes through the JSON API and its bearer-token auth.
Each answer carries a strict Content-Security-Policy (scripts, styles and connections from this origin
only, images from it and ``blob:``; no inline script, style or event handler) and ``nosniff``.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import RedirectResponse, Response

from ktl.errors import NotFoundError

__all__ = ["CONTENT_SECURITY_POLICY", "STATIC_FILES", "router"]

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

# Every file the console serves, with its media type: nothing else under /console is answered.
STATIC_FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "views.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["console"], include_in_schema=False)

StaticName = Annotated[str, Path(min_length=1, max_length=64)]


@cache
def static_file(name: str) -> bytes:
    """The bytes of one of the console's files (read once from the installed package)."""
    return resources.files("ktl.api.console").joinpath("static", name).read_bytes()


def console_file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise NotFoundError("not_found", f"the console has no file {name!r}")
    return Response(static_file(name), media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
async def root() -> RedirectResponse:
    """The server's root leads to the console."""
    return RedirectResponse("/console", status_code=307, headers=SECURITY_HEADERS)


@router.get("/console")
@router.get("/console/")
async def console_index() -> Response:
    """The console's single page (its scripts and stylesheet are named by absolute paths)."""
    return console_file("index.html")


@router.get("/console/{name}")
async def console_static(name: StaticName) -> Response:
    """One of the console's scripts or its stylesheet."""
    return console_file(name)
