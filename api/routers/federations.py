"""``/v1/federations``: create and read federations; register and remove their clients."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from ktl.api.bodies import StrictJSONRoute
from ktl.api.deps import Admin, FederationAccess, FederationId, ServiceDep
from ktl.api.routers.paging import After, ListLimit, next_page
from ktl.api.schemas import (
    ClientCreated,
    ClientOut,
    CostOut,
    ErrorBody,
    FederationMetricsOut,
    FederationOut,
    FederationSpec,
    GeneratorInfo,
    MetricSummary,
    PrivacyOut,
    RoundMetricsOut,
)
from ktl.api.service import KtlService
from ktl.api.store import ClientRecord, FederationRecord

router = APIRouter(
    prefix="/v1/federations",
    tags=["federations"],
    responses={401: {"model": ErrorBody}},
    route_class=StrictJSONRoute,
)


class ClientRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)


def federation_out(service: KtlService, fed: FederationRecord, include_etf: bool = False) -> FederationOut:
    federations = service.federations
    gen = federations.generator_of(fed)
    generator = None
    if gen is not None:
        generator = GeneratorInfo(
            name=fed.spec.generator,
            latent_dim=gen.latent_dim,
            image_size=gen.image_size,
            description=gen.description,
            pretrained=gen.pretrained,
        )
    privacy = federations.privacy(fed)
    privacy_out = None
    if privacy is not None and privacy.epsilon is not None and privacy.rounds is not None:
        releases = federations.privacy_releases(fed)
        privacy_out = PrivacyOut(
            epsilon=privacy.epsilon,
            delta=privacy.delta,
            rounds=privacy.rounds,
            noise_std=privacy.noise_std(),
            releases=releases,
            epsilon_spent=privacy.spent(releases),
        )
    cost = federations.cost(fed)
    return FederationOut(
        id=fed.id,
        method=fed.spec.method,
        state=fed.state,
        aligning_round=service.federations.aligning_round(fed.id),
        spec=fed.spec,
        proto_dim=fed.spec.dim,
        etf_seed=fed.etf_seed,
        etf=federations.etf_json(fed) if include_etf else None,
        current_round=fed.current_round,
        created_at=fed.created_at,
        generator=generator,
        broadcast_file=fed.spec.method_class.broadcast_file,
        privacy=privacy_out,
        cost=CostOut(memory_bytes=cost.memory_bytes, seconds=cost.seconds) if cost is not None else None,
        clients=federations.active_clients(fed.id),
    )


def client_out(c: ClientRecord, active: bool | None = None) -> ClientOut:
    return ClientOut(
        client_id=c.id,
        federation_id=c.federation_id,
        name=c.name,
        active=c.active if active is None else active,
        created_at=c.created_at,
    )


@router.post("", status_code=status.HTTP_201_CREATED, responses={422: {"model": ErrorBody}})
def create_federation(spec: FederationSpec, service: ServiceDep, _: Admin) -> FederationOut:
    """Create a federation (admin) running ``spec.method`` with its settings sections. Round 1 opens at
    once."""
    return federation_out(service, service.federations.create(spec))


@router.get("")
def list_federations(
    service: ServiceDep,
    _: Admin,
    request: Request,
    response: Response,
    limit: ListLimit = 100,
    after: After = None,
) -> list[FederationOut]:
    """Federations in creation order (admin), a page at a time: the ``Link`` header names the next page."""
    page, more = service.federations.page(limit, after)
    next_page(response, request, more, page[-1].id if page else None, limit)
    return [federation_out(service, f) for f in page]


@router.post("/{fid}/pause", responses={404: {"model": ErrorBody}})
def pause_federation(fid: FederationId, service: ServiceDep, _: Admin) -> FederationOut:
    """Pause a federation (admin): uploads are refused (409 ``federation_paused``), its rounds neither close
    nor run; a server step under way finishes its round."""
    return federation_out(service, service.federations.set_paused(fid, True))


@router.post("/{fid}/resume", responses={404: {"model": ErrorBody}})
def resume_federation(fid: FederationId, service: ServiceDep, _: Admin) -> FederationOut:
    """Resume a paused federation (admin): rounds that waited are closed or computed."""
    fed = service.federations.set_paused(fid, False)
    service.rounds.resume(fid)
    return federation_out(service, fed)


@router.delete(
    "/{fid}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def delete_federation(fid: FederationId, service: ServiceDep, _: Admin) -> Response:
    """Delete a federation with its clients, rounds and files (admin); 409 ``round_aligning`` while one of
    its rounds is being computed (cancel it first: ``POST …/rounds/{r}/cancel``)."""
    service.federations.delete(fid)
    service.rounds.forget(fid)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{fid}", responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}})
def get_federation(
    fed: FederationAccess,
    service: ServiceDep,
    include_etf: Annotated[
        bool,
        Query(description="also return the (K, C) ETF matrix (up to 65 536 values; larger: GET …/etf)"),
    ] = False,
) -> FederationOut:
    """A federation's method and settings, current round, generator, privacy budget and ETF seed (admin
    or its clients)."""
    return federation_out(service, fed, include_etf)


@router.get("/{fid}/metrics", responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}})
def get_metrics(
    fed: FederationAccess,
    service: ServiceDep,
    request: Request,
    response: Response,
    after: Annotated[int, Query(ge=0, le=2**31, description="the last round of the page before")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many rounds (a page)")] = 100,
) -> FederationMetricsOut:
    """How the federation learns (admin or its clients): round by round from ``after`` + 1, what its
    clients reported with their uploads (``Ktl-Metrics``), per metric the sample-weighted mean and spread;
    the ``Link`` header names the next page."""
    curve = service.rounds.learning_curve(fed.id, after, limit)
    current = service.federations.get(fed.id).current_round
    last = curve[-1][0].round if curve else None
    next_page(response, request, last is not None and last < current, last, limit)
    return FederationMetricsOut(
        federation_id=fed.id,
        current_round=current,
        rounds=[
            RoundMetricsOut(
                round=rnd.round,
                state=rnd.state,
                metrics={k: MetricSummary(**v) for k, v in values.items()},
            )
            for rnd, values in curve
        ],
    )


@router.get(
    "/{fid}/etf",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "safetensors: etf (K, C) float32"},
        403: {"model": ErrorBody},
        404: {"model": ErrorBody},
    },
)
def get_etf(fed: FederationAccess, service: ServiceDep) -> Response:
    """The fixed simplex-ETF classifier every client trains against, as safetensors (any size)."""
    data = service.federations.etf_bytes(fed)
    service.metrics.bytes_out.inc(len(data))
    return Response(data, media_type="application/octet-stream")


@router.post("/{fid}/clients", status_code=status.HTTP_201_CREATED, responses={404: {"model": ErrorBody}})
def register_client(
    fid: FederationId,
    service: ServiceDep,
    _: Admin,
    registration: Annotated[ClientRegistration | None, Body()] = None,
) -> ClientCreated:
    """Register a client (admin); the token is shown once and stored only as a hash."""
    client, token = service.federations.add_client(fid, registration.name if registration else None)
    return ClientCreated(client_id=client.id, federation_id=client.federation_id, token=token)


@router.get("/{fid}/clients", responses={404: {"model": ErrorBody}})
def list_clients(
    fid: FederationId,
    service: ServiceDep,
    _: Admin,
    request: Request,
    response: Response,
    limit: ListLimit = 100,
    after: After = None,
) -> list[ClientOut]:
    """A federation's clients in registration order (admin), a page at a time (``Link`` header)."""
    page, more = service.federations.clients(fid, limit, after)
    next_page(response, request, more, page[-1].id if page else None, limit)
    return [client_out(c) for c in page]


@router.delete("/{fid}/clients/{client_id}", responses={404: {"model": ErrorBody}})
def remove_client(
    fid: FederationId,
    client_id: Annotated[str, Path(min_length=1, max_length=64)],
    service: ServiceDep,
    _: Admin,
) -> ClientOut:
    """Remove a client (admin): its token stops working; its uploads so far stay."""
    return client_out(service.federations.remove_client(fid, client_id), active=False)
