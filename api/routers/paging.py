"""Pages of a listing: the ``Link`` header that names the next one (RFC 8288)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, Request, Response

__all__ = ["After", "ListLimit", "next_page"]

ListLimit = Annotated[int, Query(ge=1, le=1000, description="at most this many (a page)")]
After = Annotated[
    str | None, Query(min_length=1, max_length=64, description="the last id of the page before")
]


def next_page(response: Response, request: Request, more: bool, last: str | int | None, limit: int) -> None:
    """``Link: <…?after=LAST&limit=N>; rel="next"`` when another page follows."""
    if more and last is not None:
        url = request.url.include_query_params(after=last, limit=limit)
        response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
