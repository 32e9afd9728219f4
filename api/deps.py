"""Shared route dependencies (FastAPI ``Annotated`` style): the service, who is calling, limited bodies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ktl.api.service import KtlService
from ktl.api.store import ClientRecord, FederationRecord
from ktl.errors import ForbiddenError, NotFoundError, UnauthorizedError

__all__ = [
    "Admin",
    "CallerDep",
    "ClientCaller",
    "FederationAccess",
    "FederationId",
    "RoundIndex",
    "ServiceDep",
    "UploadBody",
]

_bearer = HTTPBearer(auto_error=False, description="The admin token (KTL_ADMIN_TOKEN) or a client token")

FederationId = Annotated[str, Path(min_length=1, max_length=64, description="Federation id")]
RoundIndex = Annotated[int, Path(ge=1, le=2**31, description="Round number (1, 2, …)")]


# The cheap dependencies are ``async``: a sync one costs a threadpool hop per request. They only compare
# tokens and read SQLite rows (sub-millisecond); the routes' real work stays in sync endpoints.


async def get_service(request: Request) -> KtlService:
    service: KtlService = request.app.state.service
    return service


ServiceDep = Annotated[KtlService, Depends(get_service)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise UnauthorizedError(
            "missing_token", "send Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"}
        )
    return credentials.credentials


async def require_admin(service: ServiceDep, credentials: Credentials) -> None:
    if not service.is_admin(_token(credentials)):
        raise UnauthorizedError(
            "bad_token", "this route needs the admin token", headers={"WWW-Authenticate": "Bearer"}
        )


Admin = Annotated[None, Depends(require_admin)]


@dataclass(frozen=True)
class Caller:
    """The admin (client is None) or an authenticated, rate-limited client."""

    client: ClientRecord | None

    @property
    def is_admin(self) -> bool:
        return self.client is None


async def get_caller(service: ServiceDep, credentials: Credentials) -> Caller:
    token = _token(credentials)
    if service.is_admin(token):
        return Caller(client=None)
    client = service.federations.authenticate(token)
    if client is None:
        raise UnauthorizedError(
            "bad_token", "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"}
        )
    service.federations.check_rate(client)
    return Caller(client=client)


CallerDep = Annotated[Caller, Depends(get_caller)]


async def federation_access(fid: FederationId, service: ServiceDep, caller: CallerDep) -> FederationRecord:
    """The federation, if the caller is the admin or one of its clients; 404 ``unknown_federation``
    otherwise — the same answer for another federation's id as for one that does not exist, so a client
    cannot learn which ids exist."""
    if caller.client is not None and caller.client.federation_id != fid:
        raise NotFoundError("unknown_federation", f"no federation {fid!r}")
    return service.federations.get(fid)


FederationAccess = Annotated[FederationRecord, Depends(federation_access)]


async def client_caller(fed: FederationAccess, caller: CallerDep) -> ClientRecord:
    if caller.client is None:
        raise ForbiddenError(
            "client_token_required", "uploads are made with a client token, not the admin token"
        )
    return caller.client


ClientCaller = Annotated[ClientRecord, Depends(client_caller)]


async def upload_body(request: Request, client: ClientCaller) -> bytes:
    """The request body, read after authentication. Its size (413 ``too_large``: ``max_upload_bytes``,
    ``max_json_upload_bytes`` for JSON) and arrival time (408 ``body_timeout``) are bounded as it is read,
    by `ktl.api.limits.BodyLimitMiddleware`."""
    return await request.body()


UploadBody = Annotated[bytes, Depends(upload_body)]
