"""Request and response bodies of the HTTP API (pydantic; they document themselves in OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ktl.aligner import AlignerSettings
from ktl.round import FedKTLSettings

__all__ = [
    "ClientCreated",
    "ClientOut",
    "ErrorBody",
    "FederationOut",
    "FederationSpec",
    "JobOut",
    "JobSpec",
    "PrototypesJSON",
    "RoundOut",
    "UploadOut",
]

RoundState = Literal["open", "aligning", "published", "failed"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]


class FederationSpec(BaseModel):
    """What an operator chooses when creating a federation."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    num_classes: int = Field(..., ge=2, le=1000)  # C
    proto_dim: int | None = Field(None, ge=2, le=4096)  # K; default C (FedKTL's choice)
    class_names: list[Annotated[str, Field(max_length=100)]] | None = None  # labels for the PNG grids
    generator: str = "default"  # one of the generators the server loaded at start-up
    fedktl: FedKTLSettings = Field(default_factory=FedKTLSettings)  # μ, pairs per class, upload dtype
    aligner: AlignerSettings = Field(default_factory=AlignerSettings)
    quorum: int = Field(1, ge=1, le=100_000)  # uploads that close a round
    round_deadline_s: float = Field(3600.0, gt=0, le=30 * 86400)  # a round also closes here with ≥ 1 upload
    etf_seed: int | None = Field(None, ge=0, lt=2**31)  # None: the server draws one
    seed: int = Field(0, ge=0, lt=2**62)  # the server's own draws (prior samples, pair choice)

    @model_validator(mode="after")
    def _consistent(self) -> FederationSpec:
        if self.proto_dim is not None and self.proto_dim < self.num_classes:
            raise ValueError(
                f"proto_dim ({self.proto_dim}) must be at least num_classes ({self.num_classes})"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.num_classes} classes")
        return self

    @property
    def dim(self) -> int:
        return self.proto_dim or self.num_classes


class GeneratorInfo(BaseModel):
    name: str
    latent_dim: int
    image_size: int
    description: str
    pretrained: bool


class FederationOut(BaseModel):
    id: str
    spec: FederationSpec
    proto_dim: int
    etf_seed: int
    etf: list[list[float]] | None = None  # (K, C), with ?include_etf=true
    current_round: int
    created_at: float
    generator: GeneratorInfo
    clients: int


class ClientCreated(BaseModel):
    client_id: str
    federation_id: str
    token: str  # shown once; the server keeps only its hash


class ClientOut(BaseModel):
    client_id: str
    federation_id: str
    name: str | None
    active: bool
    created_at: float


class RoundOut(BaseModel):
    federation_id: str
    round: int
    state: RoundState
    uploads: int
    bytes_received: int  # request bodies of the accepted uploads
    quorum: int
    clients: list[str]  # ids of the clients whose upload is in
    opened_at: float
    deadline_at: float
    closed_at: float | None
    published_at: float | None
    error: str | None
    current_round: int
    stats: dict[str, Any] | None = None


class UploadOut(BaseModel):
    federation_id: str
    round: int
    client_id: str
    duplicate: bool  # True when this exact upload had already been accepted (nothing changed)
    uploads: int
    quorum: int
    state: RoundState
    bytes: int


class PrototypesJSON(BaseModel):
    """The JSON form of an upload (the safetensors body is preferred: smaller, exact)."""

    model_config = ConfigDict(extra="forbid")

    prototypes: list[list[float]]  # (n, K), unit rows
    class_ids: list[Int64]  # (n,)
    counts: list[Int64]  # (n,)


class JobSpec(BaseModel):
    """A batch generation job: from a federation's aligned centroids, or from given latents."""

    model_config = ConfigDict(extra="forbid")

    federation_id: str | None = None  # centroids of this federation …
    round: int | None = Field(None, ge=1)  # … of this published round (default: the latest)
    class_ids: list[Annotated[int, Field(ge=0, lt=1000)]] | None = (
        None  # subset of classes (default: all present)
    )
    latents: list[list[float]] | None = Field(None, max_length=100_000)  # or explicit (m, W) latents …
    generator: str | None = None  # … for this generator (default: "default")
    per_class: int = Field(1, ge=1, le=100_000)  # images per class (or per given latent)
    spread: float = Field(0.0, ge=0, le=100)  # latent = centroid + spread · ε, ε a prior draw
    seed: int = Field(0, ge=0, lt=2**62)

    @model_validator(mode="after")
    def _one_source(self) -> JobSpec:
        if (self.federation_id is None) == (self.latents is None):
            raise ValueError("give exactly one of federation_id or latents")
        if self.latents is not None and (self.round is not None or self.class_ids is not None):
            raise ValueError("round and class_ids apply to federation jobs only")
        return self


class JobOut(BaseModel):
    id: str
    state: JobState
    done: int
    total: int
    progress: float
    eta_s: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    restarts: int
    spec: JobSpec


class ErrorBody(BaseModel):
    error: dict[str, Any]
