"""Federations and their clients: creation, lookup, tokens, the shared ETF, the method's context."""

from __future__ import annotations

import hashlib
import secrets
import threading
from functools import lru_cache

import torch
from safetensors.torch import save as st_save

from ktl.api.admission import CostEstimate, DeviceBudget
from ktl.api.ratelimit import RateLimiter
from ktl.api.schemas import FederationSpec
from ktl.api.services.base import ServerParts, Service
from ktl.api.store import ClientRecord, FederationRecord
from ktl.clients import simplex_etf
from ktl.errors import ConflictError, InvalidRequestError, NotFoundError, RateLimitedError
from ktl.generator import Generator
from ktl.methods import Method, MethodContext, PrivacySettings
from ktl.runner import method_context

__all__ = ["FederationService", "hash_token"]


def hash_token(token: str) -> str:
    """Tokens are 256-bit random strings, so a plain SHA-256 is a safe way to keep only a fingerprint."""
    return hashlib.sha256(token.encode()).hexdigest()


# The ETF as JSON costs ~20 bytes a value and its Python floats far more while built: above this many
# values it is served only as safetensors (``GET /v1/federations/{fid}/etf``).
MAX_ETF_JSON_VALUES = 65_536


@lru_cache(maxsize=8)  # ≤ 8 × K × C × 4 bytes held (16 MiB each at C = 1000, K = 4096)
def _etf(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    return simplex_etf(num_classes, dim, seed=seed).float().contiguous()


@lru_cache(maxsize=8)
def _etf_bytes(num_classes: int, dim: int, seed: int) -> bytes:
    return st_save({"etf": _etf(num_classes, dim, seed)})


# One build at a time: a cold burst of GET …/etf at C = 1000, K = 4096 built the ETF once per request at
# once (~1 GB); under the lock the first builds it and the others read the cache.
_etf_lock = threading.Lock()


class FederationService(Service):
    """What the routes under ``/v1/federations`` do, and what the other services ask of a federation."""

    def __init__(self, parts: ServerParts) -> None:
        super().__init__(parts)
        self.generators = parts.generators  # filled at start-up
        self.budget: DeviceBudget | None = None  # measured at start-up
        self.limiter = RateLimiter(self.settings.rate_limit_per_minute, self.settings.rate_limit_burst)
        self._validators: dict[str, Method] = {}
        self._costs: dict[str, CostEstimate] = {}

    # -- federations ------------------------------------------------------------------------------------

    def generator(self, name: str) -> Generator:
        """A generator loaded at start-up, or ``unknown_generator``."""
        if name not in self.generators:
            raise InvalidRequestError(
                "unknown_generator", f"generator {name!r} is not loaded; loaded: {sorted(self.generators)}"
            )
        return self.generators[name]

    def generator_of(self, fed: FederationRecord) -> Generator | None:
        """The federation's generator, for methods that use one."""
        return self.generators[fed.spec.generator] if fed.spec.method_class.uses_generator else None

    def cost(self, fed: FederationRecord) -> CostEstimate | None:
        """The estimated cost of one of its rounds' server step (None before the device is measured);
        computed once per federation (its spec does not change)."""
        if self.budget is None:
            return None
        if fed.id not in self._costs:
            self._costs[fed.id] = self.budget.estimate(fed.spec, self.generator_of(fed))
        return self._costs[fed.id]

    def create(self, spec: FederationSpec) -> FederationRecord:
        """Admit ``spec`` by its cost on this device (422 ``too_costly`` beyond the limits), then store it."""
        generator = self.generator(spec.generator) if spec.method_class.uses_generator else None
        if self.budget is not None:
            self.budget.admit(spec, generator)
        etf_seed = spec.etf_seed if spec.etf_seed is not None else secrets.randbelow(2**31)
        return self.store.create_federation(spec, etf_seed, self.clock())

    def get(self, fid: str) -> FederationRecord:
        fed = self.store.get_federation(fid)
        if fed is None and fid in self.store.set_aside:
            raise ConflictError(
                "unreadable_federation",
                f"federation {fid} is set aside: its stored spec cannot be read "
                f"({self.store.set_aside[fid]}); delete it, or fix its row and restart",
            )
        if fed is None:
            raise NotFoundError("unknown_federation", f"no federation {fid!r}")
        return fed

    def page(self, limit: int, after: str | None = None) -> tuple[list[FederationRecord], bool]:
        """Up to ``limit`` federations in creation order after the federation ``after``, and whether more
        follow."""
        rows = self.store.list_federations(limit + 1, after)
        return rows[:limit], len(rows) > limit

    def set_paused(self, fid: str, paused: bool) -> FederationRecord:
        """Pause (uploads refused with ``federation_paused``, rounds neither close nor run) or resume."""
        self.get(fid)
        self.store.set_federation_state(fid, "paused" if paused else "active")
        return self.get(fid)

    def set_aside(self) -> dict[str, str]:
        """The federations whose stored row cannot be read, and why (left out of listings)."""
        return dict(self.store.set_aside)

    def aligning_round(self, fid: str) -> int | None:
        """Its round whose server step is due or running, if any (deletion is refused until it ends)."""
        return self.store.aligning_round(fid)

    def delete(self, fid: str) -> None:
        """Delete a federation, its clients, rounds and files (refused while a round is aligning: pause it
        and cancel that round first). A federation set aside (its row cannot be read) may be deleted."""
        if fid not in self.store.set_aside:
            self.get(fid)
        self.store.delete_federation(fid)
        self._validators.pop(fid, None)
        self._costs.pop(fid, None)

    def etf(self, fed: FederationRecord) -> torch.Tensor:
        """The ``(K, C)`` simplex ETF every client of ``fed`` trains against."""
        with _etf_lock:
            return _etf(fed.spec.num_classes, fed.spec.dim, fed.etf_seed)

    def etf_json(self, fed: FederationRecord) -> list[list[float]]:
        """The ETF as nested lists, for small federations (``etf_too_large`` beyond `MAX_ETF_JSON_VALUES`)."""
        values = fed.spec.num_classes * fed.spec.dim
        if values > MAX_ETF_JSON_VALUES:
            raise InvalidRequestError(
                "etf_too_large",
                f"the ETF has {values} values (K × C); as JSON only up to {MAX_ETF_JSON_VALUES}: "
                f"GET /v1/federations/{fed.id}/etf returns it as safetensors",
            )
        return self.etf(fed).tolist()

    def etf_bytes(self, fed: FederationRecord) -> bytes:
        """The ETF as safetensors (``etf``: K × C float32), built once per federation shape and seed."""
        with _etf_lock:
            return _etf_bytes(fed.spec.num_classes, fed.spec.dim, fed.etf_seed)

    def method_context(self, fed: FederationRecord, *, with_generator: bool = True) -> MethodContext:
        """What the federation's method may know, on this server's device."""
        return method_context(
            num_classes=fed.spec.num_classes,
            proto_dim=fed.spec.dim,
            class_names=fed.spec.class_names,
            device=self.parts.device,
            seed=fed.spec.seed,
            generator=self.generator_of(fed) if with_generator else None,
        )

    def validator(self, fed: FederationRecord) -> Method:
        """An instance of the federation's method for checking uploads (no generator, no training)."""
        method = self._validators.get(fed.id)
        if method is None:
            cls = fed.spec.method_class
            method = cls(fed.spec.method_settings(), self.method_context(fed, with_generator=False))
            self._validators[fed.id] = method
        return method

    @staticmethod
    def privacy(fed: FederationRecord) -> PrivacySettings | None:
        """The federation's DP budget (None: no DP)."""
        privacy = getattr(fed.spec.method_settings(), "privacy", None)
        return privacy if isinstance(privacy, PrivacySettings) and privacy.enabled else None

    def privacy_releases(self, fed: FederationRecord) -> int:
        """The most rounds any one client of ``fed`` has uploaded to: the releases its ε is spent on."""
        return self.store.most_uploads_by_one_client(fed.id)

    # -- clients ----------------------------------------------------------------------------------------

    def add_client(self, fid: str, name: str | None) -> tuple[ClientRecord, str]:
        """Register a client; returns it and its token (shown once, stored only as a hash)."""
        self.get(fid)
        # A fixed prefix: a token never starts with "-", which command lines would take for an option
        # (`ktl client run --token -x…` failed in one run of 64), and it is recognisable in a leaked log.
        token = "ktl_" + secrets.token_urlsafe(32)
        return self.store.add_client(fid, name, hash_token(token), self.clock()), token

    def clients(
        self, fid: str, limit: int | None = None, after: str | None = None
    ) -> tuple[list[ClientRecord], bool]:
        """The federation's clients in registration order: up to ``limit`` after the client ``after``, and
        whether more follow."""
        self.get(fid)
        rows = self.store.list_clients(fid)
        if after is not None:
            ids = [c.id for c in rows]
            if after not in ids:
                raise NotFoundError(
                    "unknown_client", f"no client {after!r} in federation {fid!r} to list after"
                )
            rows = rows[ids.index(after) + 1 :]
        if limit is None:
            return rows, False
        return rows[:limit], len(rows) > limit

    def active_clients(self, fid: str) -> int:
        return self.store.count_active_clients(fid)

    def remove_client(self, fid: str, client_id: str) -> ClientRecord:
        client = self.store.get_client(client_id)
        if client is None or client.federation_id != fid:
            raise NotFoundError("unknown_client", f"no client {client_id!r} in federation {fid!r}")
        self.store.deactivate_client(client_id)
        return client

    def authenticate(self, token: str) -> ClientRecord | None:
        return self.store.client_by_token_hash(hash_token(token))

    def check_rate(self, client: ClientRecord) -> None:
        wait = self.limiter.acquire(client.id)
        if wait > 0:
            raise RateLimitedError(
                "rate_limited",
                f"client {client.id} is over {self.settings.rate_limit_per_minute:g} requests per minute",
                headers={"Retry-After": str(max(1, round(wait + 0.5)))},
                retry_after_s=round(wait, 3),
            )
