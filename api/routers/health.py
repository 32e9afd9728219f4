"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import shutil

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ktl.api.deps import ServiceDep

router = APIRouter(tags=["health"])


# The probes are ``async`` (on the event loop, no threadpool hop): they answer while every worker thread
# is busy with uploads. Their work is a few syscalls.


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready: starting, or low_disk"}})
async def readyz(service: ServiceDep) -> JSONResponse:
    """Generators loaded, store open, every device worker running (``devices``; rounds on the first,
    ``device``), and at least ``min_free_bytes`` free on the data folder's disk (``disk_free_bytes``;
    below it the status is ``low_disk`` and uploads get 507). ``set_aside``: the federations whose stored
    row cannot be read (id → why), left out of every listing until deleted or fixed."""
    try:
        free = int(shutil.disk_usage(service.settings.data_dir).free)
    except OSError:  # the data folder vanished: nothing can be stored
        free = 0
    status = (
        "starting" if not service.alive else "low_disk" if free < service.settings.min_free_bytes else "ready"
    )
    body = {
        "status": status,
        "generators": sorted(service.generators),
        "device": str(service.device),  # the first device: the rounds'
        "devices": [str(d) for d in service.devices],  # one worker each; batch jobs run on all
        "disk_free_bytes": free,
        "min_free_bytes": service.settings.min_free_bytes,
        # Federations whose stored row cannot be read, and why: left out of listings (fix or delete them).
        "set_aside": service.federations.set_aside(),
    }
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(service: ServiceDep) -> Response:
    """Prometheus text format: uploads, rejects by reason, round and job durations, bytes, GPU memory."""
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
