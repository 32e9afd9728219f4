"""Request and response bodies of the HTTP API (pydantic; they document themselves in OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ModelWrapValidatorHandler,
    ValidationInfo,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from ktl.config import with_sections
from ktl.errors import ConfigError
from ktl.generator.base import DEFAULT_SPREAD
from ktl.methods import (
    METHODS,
    SECTIONS,
    Method,
    MethodSettings,
    PrivacySettings,
    available_methods,
    validate_sections,
)

__all__ = [
    "ClientCreated",
    "ClientOut",
    "ErrorBody",
    "FederationMetricsOut",
    "FederationOut",
    "FederationSpec",
    "JobOut",
    "JobSpec",
    "MetricSummary",
    "PrivacyOut",
    "PrototypesJSON",
    "RoundMetricsOut",
    "RoundOut",
    "UploadOut",
]

RoundState = Literal["open", "aligning", "published", "failed"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]


class FederationSpec(BaseModel):
    """What an operator chooses when creating a federation: the method, its settings sections, the round
    rules. Its settings sections are the registered method sections (`ktl.methods.SECTIONS`: ``fedktl``,
    ``aligner``, ``baseline``, ``privacy``, a plugin's own, …), each optional: sections the method does not
    read are refused; those it reads are filled with their defaults.
    Every number is finite and in its documented range (each section's model refuses ``inf``/``NaN``
    too), and a request body must hold the JSON type itself: ``"1"`` or ``true`` for a number is refused
    (`ktl.api.bodies`)."""

    # Extra keys are allowed only as the registered sections (checked in `_method_sections`).
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str | None = Field(None, max_length=200, description="A label for people.")
    method: str = Field(
        "fedktl",
        description="The federated method (a registered one that exchanges payloads): fedktl, fedproto, "
        "fedtgp, fd or fedktl-latents.",
    )
    num_classes: int = Field(..., ge=2, le=1000, description="C, the number of classes.")
    proto_dim: int | None = Field(
        None, ge=2, le=4096, description="K, the prototype dimension; none = C (FedKTL's choice)."
    )
    class_names: list[Annotated[str, Field(max_length=100)]] | None = Field(
        None, description="Class labels, for the PNG grids."
    )
    generator: str = Field(
        "default", description="One of the generators the server loaded at start-up (methods that use one)."
    )
    quorum: int = Field(1, ge=1, le=100_000, description="Uploads that close a round.")
    max_samples_per_class: int = Field(
        1_000_000,
        ge=1,
        le=2**40,
        description="The most local samples one client may report behind one class (an upload's counts, "
        "which weigh its rows in the aggregate); more is refused with 422 counts: one client claiming "
        "2^62 samples would make a class's global prototype its own vector.",
    )
    round_deadline_s: float = Field(
        3600.0, gt=0, le=30 * 86400, description="Seconds after which a round also closes with ≥ 1 upload."
    )
    etf_seed: int | None = Field(
        None, ge=0, lt=2**31, description="Seed of the shared ETF classifier; none = the server draws one."
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**62,
        description="The method's own draws (prior samples, pair choice, server models, privacy noise).",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _method_sections(
        cls, data: Any, handler: ModelWrapValidatorHandler[FederationSpec], info: ValidationInfo[Any]
    ) -> FederationSpec:
        """Each registered section given is validated into its model (strictly when the body is JSON, as
        `ktl.api.bodies` reads it); any other key that is not a field is refused."""
        if not isinstance(data, dict):
            return handler(data)
        spec: FederationSpec = validate_sections(
            data, handler, fixed=cls.model_fields, fill=False, strict_json=info.mode == "json"
        )
        return spec

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return with_sections(handler(core_schema), handler, optional=True)

    @model_validator(mode="after")
    def _consistent(self) -> FederationSpec:
        if self.proto_dim is not None and self.proto_dim < self.num_classes:
            raise ValueError(
                f"proto_dim ({self.proto_dim}) must be at least num_classes ({self.num_classes})"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.num_classes} classes")
        cls = METHODS.get(self.method)
        if cls is None:
            raise ValueError(f"unknown method {self.method!r}; available: {', '.join(available_methods())}")
        if not cls.exchanges:
            raise ValueError(f"method {self.method!r} exchanges nothing; run it with ktl simulate")
        if cls.aggregation == "sum":
            raise ValueError(
                f"method {self.method!r} needs secure aggregation, which this server cannot give (it would "
                "see every upload); run it on Flower (ktl flower simulate, or flwr run: docs/flower.md)"
            )
        reads = cls.settings_model.sections()
        given = self.__pydantic_extra__ or {}
        foreign = [s for s in SECTIONS if given.get(s) is not None and s not in reads]
        if foreign:
            raise ValueError(
                f"section(s) {', '.join(foreign)} do not apply to method {self.method!r} "
                f"(it reads {', '.join(reads) or 'none'})"
            )
        try:
            settings = cls.settings_from(self)
            cls.check_shape(settings, self.num_classes, self.dim)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        for section in reads:  # show the settings in force, defaults included
            setattr(self, section, getattr(settings, section))
        privacy = getattr(settings, "privacy", None)
        if isinstance(privacy, PrivacySettings) and privacy.enabled and privacy.rounds is None:
            raise ValueError("privacy.rounds is required with privacy.epsilon: the rounds the budget covers")
        return self

    @property
    def dim(self) -> int:
        return self.proto_dim or self.num_classes

    @property
    def method_class(self) -> type[Method]:
        return METHODS[self.method]

    def method_settings(self) -> MethodSettings:
        """The settings of this federation's method (the sections it reads)."""
        return self.method_class.settings_from(self)


class GeneratorInfo(BaseModel):
    name: str
    latent_dim: int
    image_size: int
    description: str
    pretrained: bool


class PrivacyOut(BaseModel):
    """A federation's DP budget and what its clients have spent of it (each upload is one release)."""

    epsilon: float
    delta: float
    rounds: int
    noise_std: float
    releases: int = Field(description="The most rounds any one client has uploaded to.")
    epsilon_spent: float = Field(description="ε accounted for that client after its releases (zCDP).")


class CostOut(BaseModel):
    """The server's estimate of one round's server step on its device (admission control)."""

    memory_bytes: int
    seconds: float


class FederationOut(BaseModel):
    id: str
    method: str
    state: Literal["active", "paused"] = "active"  # paused: uploads refused, rounds wait (…/pause, …/resume)
    # The round whose server step is due or running, if any: deleting the federation waits for it.
    aligning_round: int | None = None
    spec: FederationSpec
    proto_dim: int
    etf_seed: int
    etf: list[list[float]] | None = None  # (K, C), with ?include_etf=true
    current_round: int
    created_at: float
    generator: GeneratorInfo | None  # None for methods without a generator
    broadcast_file: str  # what each published round's broadcast is called (GET …/rounds/{r}/broadcast)
    privacy: PrivacyOut | None  # None without differential privacy
    cost: CostOut | None = None  # the estimate it was admitted with
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


class MetricSummary(BaseModel):
    """One metric of one round over the clients that sent it with their upload."""

    mean: float = Field(description="Sample-weighted mean: Σ n·v / Σ n (accuracy: Σ correct / Σ tested).")
    std: float = Field(description="Sample-weighted standard deviation across those clients.")
    min: float
    max: float
    clients: int = Field(description="How many clients reported it.")
    n_samples: int = Field(description="The samples behind it, summed over those clients.")


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
    # The round's alignment quality report (``ktl.quality``: MMD to the prior, centroid distances, class
    # spread, KID, verdict) once published; None for methods without one (all but fedktl) and before.
    quality: dict[str, Any] | None = None
    # The clients' own evaluation sent with their uploads (``Ktl-Metrics``), per metric name: the
    # sample-weighted mean and spread across the clients that reported it; {} when none did.
    metrics: dict[str, MetricSummary] = Field(default_factory=dict)


class RoundMetricsOut(BaseModel):
    round: int
    state: RoundState
    metrics: dict[str, MetricSummary]


class FederationMetricsOut(BaseModel):
    """The clients' metrics round by round (``GET /v1/federations/{fid}/metrics``), for a learning curve."""

    federation_id: str
    current_round: int
    rounds: list[RoundMetricsOut]


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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prototypes: list[list[float]]  # (n, K), unit rows
    class_ids: list[Int64]  # (n,)
    counts: list[Int64]  # (n,)


class JobSpec(BaseModel):
    """A batch generation job: from a federation's aligned centroids, or from given latents. Every number
    is finite and in range."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    federation_id: str | None = None  # centroids of this federation …
    round: int | None = Field(None, ge=1, le=2**31)  # … of this published round (default: the latest)
    class_ids: list[Annotated[int, Field(ge=0, lt=1000)]] | None = (
        None  # subset of classes (default: all present)
    )
    # … or explicit (m, W) latents, each value in [−1e4, 1e4] (a prior draw is within ±10) …
    latents: list[list[Annotated[float, Field(ge=-1e4, le=1e4)]]] | None = Field(None, max_length=100_000)
    generator: str | None = None  # … for this generator (default: "default")
    per_class: int = Field(1, ge=1, le=100_000)  # images per class (or per given latent)
    # latent = centroid + spread · ε, ε a prior draw; the default gives distinct images (DEFAULT_SPREAD, docs/generate.md)
    spread: float = Field(DEFAULT_SPREAD, ge=0, le=100)
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


def file_responses(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that serves a file once it exists: 200 with ``media_type``,
    else 409 with the reason (a round not published, a job not done)."""
    return {200: {"content": {media_type: {}}, "description": description}, 409: {"model": ErrorBody}}
