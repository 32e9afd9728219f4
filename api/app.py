"""``create_app(settings)``: the FastAPI application (routers, error shape, lifespan)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

import ktl
from ktl.api.console import router as console
from ktl.api.errors import ApiError, http_error
from ktl.api.limits import BodyLimitMiddleware
from ktl.api.routers import federations, health, jobs, rounds
from ktl.api.service import KtlService
from ktl.api.settings import ServerSettings, load_settings
from ktl.errors import KtlError

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_HTTP_REASONS = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """Build the app. Raises `ConfigError` without an admin token: the server refuses to start.

    The generators load once, in the lifespan's start-up, before the first request is served.
    """
    settings = settings or load_settings()
    service = KtlService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(service.start)
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(
        title="ktl",
        version=ktl.__version__,
        summary="Generator-based knowledge transfer server for heterogeneous federated learning (FedKTL).",
        lifespan=lifespan,
        # FastAPI's /docs and /redoc load Swagger UI / ReDoc from a CDN (scripts without integrity, and a
        # server may reach nothing): off. The schema is at /openapi.json, for any OpenAPI viewer.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service

    def error_response(request: Request, exc: ApiError) -> JSONResponse:
        service.metrics.errors.labels(status=str(exc.status), reason=exc.reason).inc()
        if request.url.path.endswith("/prototypes") and request.method == "POST":
            service.metrics.rejects.labels(reason=exc.reason).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(KtlError)
    async def _ktl_error(request: Request, exc: KtlError) -> JSONResponse:
        return error_response(request, http_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {
                "loc": [str(x) for x in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        message = f"{'.'.join(first['loc'])}: {first['msg']}" if first["loc"] else str(first["msg"])
        return error_response(request, ApiError(422, "validation", message, details=details))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = _HTTP_REASONS.get(exc.status_code, "http_error")
        return error_response(
            request, ApiError(exc.status_code, reason, str(exc.detail), headers=exc.headers)
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        service.metrics.errors.labels(status="500", reason="internal").inc()
        return JSONResponse(
            {"error": {"reason": "internal", "message": "internal server error"}}, status_code=500
        )

    def count_refusal(scope: Scope, exc: ApiError) -> None:  # body limits answered before the app
        service.metrics.errors.labels(status=str(exc.status), reason=exc.reason).inc()
        if scope["path"].endswith("/prototypes") and scope["method"] == "POST":
            service.metrics.rejects.labels(reason=exc.reason).inc()

    def known_token(token: str) -> bool:  # a body is read only for a caller the server knows
        return service.is_admin(token) or service.federations.authenticate(token) is not None

    app.add_middleware(
        BodyLimitMiddleware, settings=settings, on_refusal=count_refusal, authenticate=known_token
    )

    for router in (health.router, federations.router, rounds.router, jobs.router, console.router):
        app.include_router(router)
    return app
