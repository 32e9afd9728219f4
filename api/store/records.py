"""The store's typed rows and the round rules' vocabulary (facts in, a change out)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ktl.api.schemas import FederationSpec, JobSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederationRecord:
    id: str
    spec: FederationSpec
    etf_seed: int
    current_round: int
    created_at: float
    state: str = "active"  # 'active' | 'paused'


@dataclass(frozen=True)
class ClientRecord:
    id: str
    federation_id: str
    name: str | None
    active: bool
    created_at: float


@dataclass(frozen=True)
class RoundRecord:
    federation_id: str
    round: int
    state: str
    opened_at: float
    deadline_at: float
    closed_at: float | None
    published_at: float | None
    error: str | None
    stats: dict[str, Any] | None
    attempts: int = 0


@dataclass(frozen=True)
class UploadRecord:
    federation_id: str
    round: int
    client_id: str
    digest: str
    num_rows: int
    bytes: int
    received_at: float
    metrics: str | None = None  # the client's evaluation sent with it (`ktl.api.services.evaluation`)


@dataclass(frozen=True)
class MetricSums:
    """One metric of one round, summed over the uploads that reported it (see `Store.metric_sums`)."""

    round: int
    name: str
    clients: int
    n_samples: int
    weighted_sum: float  # Σ n·v over those uploads (n: the samples each client measured on)
    weighted_squares: float  # Σ n·v²
    min: float
    max: float


@dataclass(frozen=True)
class JobRecord:
    id: str
    spec: JobSpec
    state: str
    total: int
    done: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    restarts: int


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the data folder, with '/'
    sha256: str
    size: int
    written_at: float


@dataclass(frozen=True)
class UploadResult:
    duplicate: bool
    uploads: int
    state: str
    closed: bool  # this upload completed the quorum and closed the round


@dataclass(frozen=True)
class ClientRow:
    """A client as ``clients.json`` keeps it (its token as SHA-256 only), for `Store.restore_federation`."""

    id: str
    name: str | None
    token_hash: str
    active: bool
    created_at: float


@dataclass(frozen=True)
class RestoredUpload:
    client_id: str
    digest: str
    num_rows: int
    bytes: int
    received_at: float


@dataclass(frozen=True)
class RestoredRound:
    """A round as `ktl admin check --repair` rebuilds it from the files on disk."""

    round: int
    state: str
    opened_at: float
    deadline_at: float
    closed_at: float | None
    published_at: float | None
    error: str | None
    uploads: list[RestoredUpload]


@dataclass(frozen=True)
class RoundFacts:
    """What the round rules look at, read inside the transaction that applies their decision."""

    federation_id: str
    round: int
    state: str
    deadline_at: float
    uploads: int
    current_round: int


@dataclass(frozen=True)
class RoundChange:
    """A decision of the round rules (`ktl.api.services.rounds`), applied by the store in the transaction
    that read the facts: round ``close`` goes 'aligning' (closed at ``at``); round ``open`` opens at ``at``
    with its deadline and becomes the federation's current round."""

    at: float
    close: int | None = None
    open: int | None = None
    deadline_at: float | None = None


# The round rules, as the store calls them: the facts of a round → what changes (None: nothing).
RoundRule = Callable[[RoundFacts], RoundChange | None]
