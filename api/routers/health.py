"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ktl.api.deps import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready"}})
def readyz(service: ServiceDep) -> JSONResponse:
    """Generators loaded, store open, device worker running."""
    ready = service.alive
    body = {
        "status": "ready" if ready else "starting",
        "generators": sorted(service.generators),
        "device": str(service.device),
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(service: ServiceDep) -> Response:
    """Prometheus text format: uploads, rejects by reason, round and job durations, bytes, GPU memory."""
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
