"""Limits on what one request may cost, enforced before authentication and before parsing.

`BodyLimitMiddleware` (pure ASGI, installed by `create_app`) bounds every request body by size and by
arrival time:

* ``Content-Length`` over the route's limit: 413 ``too_large`` at once, nothing read; not a number:
  400 ``bad_content_length``;
* while the body streams (chunked included), 413 as soon as the count passes the limit;
* a body that has not arrived in full ``body_timeout_s`` after the request's headers: 408
  ``body_timeout``.

No pool for strangers: every route that takes a body needs a token, so a request with a body and without
a token the server knows (the admin's, or an active client's) is answered 401 (``missing_token`` /
``bad_token``, ``Connection: close``) as soon as its head has arrived, before one byte of the body is
read. Slow or stalled bodies therefore hold nothing but a socket for an instant, whoever sends them, and
never the request slots (``limit_concurrency``) or the body timeout that authenticated callers need.
Only a body whose declared size is over the limit is told 413 first (it is refused either way).

The limit is ``max_upload_bytes`` for a safetensors upload (``POST …/rounds/{r}/prototypes``),
``max_json_upload_bytes`` for a JSON one and ``max_request_bytes`` on every other route. Refusals carry
``Connection: close``: the rest of the body is not worth reading.

On every route but the upload route, FastAPI reads (and parses) the whole body before the route's
dependencies check the token; the middleware therefore reads it first, under the limits, and hands it on.
The upload route reads its body only after authentication (`ktl.api.deps.upload_body`), so its body is
counted as it is read, and the refusal is raised there as a `TooLargeError` / `RequestTimeoutError`.

How many JSON uploads are parsed at once is bounded in the rounds service
(`ktl.api.services.jsonparse`).

Connections (half-sent headers, idle sockets) are bounded in `ktl.api.process`: ASGI never sees a request
before its headers are complete.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ktl.api.errors import ApiError, http_error
from ktl.api.settings import ServerSettings
from ktl.errors import (
    BadRequestError,
    RequestTimeoutError,
    ServiceError,
    TooLargeError,
    UnauthorizedError,
)

__all__ = [
    "BodyLimitMiddleware",
    "body_limit",
    "is_upload",
]

UPLOAD_PATH = re.compile(r"/v1/federations/[^/]+/rounds/[^/]+/prototypes/?$")  # after any root_path
CLOSE = {"Connection": "close"}

# -- the body ------------------------------------------------------------------------------------------


def is_upload(scope: Scope) -> bool:
    return scope["method"] == "POST" and UPLOAD_PATH.search(scope["path"]) is not None


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def body_limit(settings: ServerSettings, scope: Scope, content_type: str | None) -> int:
    """The most bytes this request's body may have."""
    if is_upload(scope):
        return settings.max_json_upload_bytes if _is_json(content_type) else settings.max_upload_bytes
    return settings.max_request_bytes


def _too_large(limit: int, declared: int | None = None) -> TooLargeError:
    what = f"body of {declared} bytes" if declared is not None else "body"
    return TooLargeError("too_large", f"{what} exceeds the limit of {limit} bytes", headers=dict(CLOSE))


def _timeout(seconds: float) -> RequestTimeoutError:
    return RequestTimeoutError(
        "body_timeout", f"the request body did not arrive within {seconds:g} s", headers=dict(CLOSE)
    )


OnRefusal = Callable[[Scope, ApiError], None]
Authenticate = Callable[[str], bool]


def _stranger(authorization: bytes | None, authenticate: Authenticate) -> UnauthorizedError | None:
    """Why a request with this ``Authorization`` header is a stranger's, or None: a token it knows."""
    headers = {"WWW-Authenticate": "Bearer", **CLOSE}
    scheme, _, token = (authorization or b"").decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return UnauthorizedError("missing_token", "send Authorization: Bearer <token>", headers=headers)
    if not authenticate(token):
        return UnauthorizedError("bad_token", "unknown or revoked token", headers=headers)
    return None


class BodyLimitMiddleware:
    """Bounds every request body by size (413) and arrival time (408), before authentication.

    Parameters
    ----------
    app
        The ASGI app inside.
    settings
        Where the limits come from (``max_upload_bytes``, ``max_json_upload_bytes``,
        ``max_request_bytes``, ``body_timeout_s``).
    on_refusal
        Called with each refusal the middleware answers itself (to count it in the metrics).
    authenticate
        Whether a bearer token is one the server knows; a request with a body and without such a token is
        refused 401 before its body is read. None: no such check (tests of the limits alone).
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: ServerSettings,
        on_refusal: OnRefusal | None = None,
        authenticate: Authenticate | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.on_refusal = on_refusal
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lengths: list[bytes] = []
        chunked = False
        content_type: str | None = None
        authorization: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                lengths.append(value.strip())
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value
        if not lengths and not chunked:  # HTTP/1.1: no body
            await self.app(scope, receive, send)
            return
        limit = body_limit(self.settings, scope, content_type)
        declared: int | None = None
        if lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit():
                error = BadRequestError(
                    "bad_content_length", "Content-Length must be one number of bytes", headers=dict(CLOSE)
                )
                await self._refuse(scope, send, error)
                return
            # More than 18 digits is over any limit (and int() refuses strings of over 4300 digits).
            declared = int(lengths[0]) if len(lengths[0]) <= 18 else limit + 1
            if declared > limit:
                await self._refuse(scope, send, _too_large(limit, declared))
                return
        if self.authenticate is not None and (chunked or declared):
            stranger = _stranger(authorization, self.authenticate)
            if stranger is not None:
                await self._refuse(scope, send, stranger)
                return
        deadline = anyio.current_time() + self.settings.body_timeout_s
        if is_upload(scope):
            await self.app(scope, self._counting(receive, limit, deadline), send)
        else:
            await self._read_then_call(scope, receive, send, limit, deadline)

    async def _receive_by(self, receive: Receive, deadline: float) -> Message:
        message: Message | None = None
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            message = await receive()
        if message is None:
            raise _timeout(self.settings.body_timeout_s)
        return message

    def _counting(self, receive: Receive, limit: int, deadline: float) -> Receive:
        """``receive`` that raises `TooLargeError` / `RequestTimeoutError` (for the app's error handlers)."""
        received = 0
        done = False

        async def limited() -> Message:
            nonlocal received, done
            if done:
                return await receive()
            message = await self._receive_by(receive, deadline)
            if message["type"] != "http.request":
                done = True
                return message
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit)
            done = not message.get("more_body", False)
            return message

        return limited

    async def _read_then_call(
        self, scope: Scope, receive: Receive, send: Send, limit: int, deadline: float
    ) -> None:
        """Read the whole body under the limits, then call the app with it (FastAPI would read it whole,
        before authentication, anyway)."""
        chunks: list[bytes] = []
        received = 0
        while True:
            try:
                message = await self._receive_by(receive, deadline)
            except RequestTimeoutError as exc:
                await self._refuse(scope, send, exc)
                return
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                await self._refuse(scope, send, _too_large(limit))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: bytes | None = b"".join(chunks)
        del chunks

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()
            message = {"type": "http.request", "body": body, "more_body": False}
            body = None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, exc: ServiceError) -> None:
        error = http_error(exc)
        if self.on_refusal is not None:
            self.on_refusal(scope, error)
        response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:  # a JSONResponse without a background task never calls it
    return {"type": "http.disconnect"}
