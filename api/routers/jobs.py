"""``/v1/jobs``: batch generation on the device, queued behind round alignments."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status
from fastapi.responses import FileResponse

from ktl.api.bodies import StrictJSONRoute
from ktl.api.deps import Admin, ServiceDep
from ktl.api.routers.paging import After, ListLimit, next_page
from ktl.api.schemas import ErrorBody, JobOut, JobSpec, file_responses
from ktl.api.store import JobRecord

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}},
    route_class=StrictJSONRoute,
)

JobId = Annotated[str, Path(min_length=1, max_length=64)]


def job_out(job: JobRecord) -> JobOut:
    eta = None
    if job.state == "running" and job.started_at is not None and job.done > 0:
        elapsed = time.time() - job.started_at
        eta = elapsed / job.done * (job.total - job.done)
    return JobOut(
        id=job.id,
        state=job.state,
        done=job.done,
        total=job.total,
        progress=job.done / job.total if job.total else 1.0,
        eta_s=eta,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
        restarts=job.restarts,
        spec=job.spec,
    )


@router.post(
    "", status_code=status.HTTP_202_ACCEPTED, responses={409: {"model": ErrorBody}, 422: {"model": ErrorBody}}
)
def create_job(spec: JobSpec, service: ServiceDep, _: Admin) -> JobOut:
    """Queue a batch generation job (admin): ``per_class`` images per class centroid of a published round,
    or per given latent; ``spread`` adds that much prior noise around each source."""
    return job_out(service.jobs.create(spec))


@router.get("")
def list_jobs(
    service: ServiceDep,
    _: Admin,
    request: Request,
    response: Response,
    limit: ListLimit = 100,
    after: After = None,
) -> list[JobOut]:
    """Every job, newest first (admin), a page at a time: the ``Link`` header names the next page."""
    page, more = service.jobs.page(limit, after)
    next_page(response, request, more, page[-1].id if page else None, limit)
    return [job_out(job) for job in page]


@router.get("/{job_id}")
def get_job(job_id: JobId, service: ServiceDep, _: Admin) -> JobOut:
    """Progress (done / total, ETA) and state."""
    return job_out(service.jobs.get(job_id))


@router.get(
    "/{job_id}/result",
    response_class=FileResponse,
    responses=file_responses(
        "application/octet-stream", "safetensors: images uint8 NCHW, latents, class_ids"
    ),
)
def get_job_result(job_id: JobId, service: ServiceDep, _: Admin) -> FileResponse:
    """The finished job's images, latents and class ids (class id -1 for given latents)."""
    path = service.jobs.result_path(job_id)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{job_id}.safetensors")


@router.delete("/{job_id}", responses={409: {"model": ErrorBody}})
def cancel_job(job_id: JobId, service: ServiceDep, _: Admin) -> JobOut:
    """Cancel a queued or running job (it stops before its next batch); delete a finished one (done,
    failed or cancelled) with its result file — it is then gone (404). Finished jobs are also deleted
    after ``job_retention_s``."""
    return job_out(service.jobs.cancel_or_delete(job_id))
