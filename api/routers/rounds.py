"""``/v1/federations/{fid}/rounds/{r}``: uploads, round state, the broadcast (and FedKTL's pairs)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response, status

from ktl.api.bodies import StrictJSONRoute
from ktl.api.deps import Admin, ClientCaller, FederationAccess, RoundIndex, ServiceDep, UploadBody
from ktl.api.schemas import ErrorBody, MetricSummary, RoundOut, UploadOut, file_responses
from ktl.api.services.evaluation import MAX_METRICS_HEADER, METRICS_HEADER
from ktl.quality import QUALITY_PNG

router = APIRouter(
    route_class=StrictJSONRoute,
    prefix="/v1/federations/{fid}/rounds/{r}",
    tags=["rounds"],
    responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "example": "safetensors with prototypes (n, K) float16|float32, class_ids (n,) int64, counts (n,) int64",
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/PrototypesJSON"}},
        },
    }
}


@router.post(
    "/prototypes",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"model": UploadOut, "description": "the same upload again: nothing changed"},
        400: {"model": ErrorBody},
        409: {"model": ErrorBody},
        413: {"model": ErrorBody},
        415: {"model": ErrorBody},
        422: {"model": ErrorBody},
        429: {"model": ErrorBody},
    },
)
def upload_prototypes(
    r: RoundIndex,
    request: Request,
    response: Response,
    fed: FederationAccess,
    client: ClientCaller,
    body: UploadBody,
    service: ServiceDep,
    metrics: Annotated[
        str | None,
        Header(
            alias=METRICS_HEADER,
            max_length=MAX_METRICS_HEADER,
            description='The client\'s own evaluation this round, as a JSON object: {"n_samples": 120, '
            '"accuracy": 0.81, "loss": 0.52} — n_samples (the test samples, an integer ≥ 1) and at most 8 '
            "named finite numbers; summarised per round in the round's metrics.",
        ),
    ] = None,
) -> UploadOut:
    """Upload this client's payload for round ``r`` (client token), checked by the federation's method.

    Body: safetensors (``application/octet-stream``) with ``prototypes`` (n × K, float16 or float32),
    ``class_ids`` (n, int64, distinct, < C) and ``counts`` (n, int64, > 0); or the same as JSON. fedktl,
    fedproto and fedtgp send unit rows (prototypes), fd its per-class mean ETF cosines (n × C, in [−1, 1]).
    The identical upload again answers 200 and changes nothing; a different one answers 409. The
    ``Ktl-Metrics`` header may carry the client's evaluation (422 ``bad_metrics`` when it is not valid).
    """
    result = service.rounds.submit_upload(fed, r, client, body, request.headers.get("content-type"), metrics)
    if result.duplicate:
        response.status_code = status.HTTP_200_OK
    return UploadOut(
        federation_id=fed.id,
        round=r,
        client_id=client.id,
        duplicate=result.duplicate,
        uploads=result.uploads,
        quorum=fed.spec.quorum,
        state=result.state,
        bytes=len(body),
    )


@router.post("/cancel", responses={409: {"model": ErrorBody}})
def cancel_round(r: RoundIndex, fed: FederationAccess, service: ServiceDep, _: Admin) -> RoundOut:
    """End an open or aligning round as failed, "cancelled by the operator" (admin): a server step under
    way stops at its next slice; cancelling the open round opens the next one."""
    service.rounds.cancel(fed.id, r)
    return get_round(r, fed, service)


@router.get("")
def get_round(r: RoundIndex, fed: FederationAccess, service: ServiceDep) -> RoundOut:
    """Round state (open / aligning / published / failed), the uploads so far, the clients' metrics
    (sample-weighted mean and spread of what they sent) and, once published, the method's round stats and
    (fedktl) its alignment quality report."""
    rnd = service.rounds.get(fed.id, r)
    uploads = service.rounds.uploads(fed.id, r)
    current = service.federations.get(fed.id).current_round
    return RoundOut(
        federation_id=fed.id,
        round=r,
        state=rnd.state,
        uploads=len(uploads),
        bytes_received=sum(u.bytes for u in uploads),
        quorum=fed.spec.quorum,
        clients=[u.client_id for u in uploads],
        opened_at=rnd.opened_at,
        deadline_at=rnd.deadline_at,
        closed_at=rnd.closed_at,
        published_at=rnd.published_at,
        error=rnd.error,
        current_round=current,
        stats=rnd.stats,
        quality=service.rounds.quality(fed, rnd),
        metrics={k: MetricSummary(**v) for k, v in service.rounds.client_metrics(fed.id, r).items()},
    )


@router.get(
    "/pairs",
    response_class=Response,
    responses=file_responses(
        "application/octet-stream", "safetensors: images uint8 NCHW, latents, class_ids"
    ),
)
def get_pairs(r: RoundIndex, fed: FederationAccess, service: ServiceDep) -> Response:
    """The round's image-vector pairs as safetensors (once published)."""
    data = service.rounds.send_file(fed, r, "pairs.safetensors")
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{fed.id}-round-{r}-pairs.safetensors"'},
    )


@router.get(
    "/pairs.png",
    response_class=Response,
    responses=file_responses("image/png", "labelled grid"),
)
def get_pairs_png(r: RoundIndex, fed: FederationAccess, service: ServiceDep) -> Response:
    """The round's generated images as a labelled PNG grid (once published)."""
    return Response(service.rounds.send_file(fed, r, "pairs.png"), media_type="image/png")


@router.get(
    "/quality.png",
    response_class=Response,
    responses=file_responses("image/png", "2-D PCA of F(prototypes), centroids, prior draws"),
)
def get_quality_png(r: RoundIndex, fed: FederationAccess, service: ServiceDep) -> Response:
    """The round's alignment quality picture (fedktl, once published): F(prototypes), the class centroids
    and prior draws on their top two principal axes; its numbers are the round state's ``quality``."""
    return Response(service.rounds.send_file(fed, r, QUALITY_PNG), media_type="image/png")


@router.get(
    "/align-history",
    response_class=Response,
    responses=file_responses(
        "application/json",
        "the aligner's loss, MMD² and MSE at every step: {loss: [...], mmd: [...], mse: [...]}",
    ),
)
def get_align_history(r: RoundIndex, fed: FederationAccess, service: ServiceDep) -> Response:
    """The round's alignment, step by step (fedktl, once published), for a loss curve."""
    return Response(service.rounds.send_file(fed, r, "align-history.json"), media_type="application/json")


@router.get(
    "/broadcast",
    response_class=Response,
    responses=file_responses(
        "application/octet-stream",
        "safetensors: the method's broadcast (fedktl: the pairs; fedproto, fedtgp, fd: "
        "the global table as prototypes, class_ids, counts)",
    ),
)
def get_broadcast(r: RoundIndex, fed: FederationAccess, service: ServiceDep) -> Response:
    """What every client of round ``r`` downloads, whatever the method (once published)."""
    name = fed.spec.method_class.broadcast_file
    return Response(
        service.rounds.broadcast(fed, r),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{fed.id}-round-{r}-{name}"'},
    )
