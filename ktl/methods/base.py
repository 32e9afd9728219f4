"""The one `Method` protocol every transport drives, and the registry of methods.

A federated method is written once, as small steps that know nothing about transport:

- client side: `Method.client_update` (train locally, return the payload bytes to upload, privacy noise
  included) and `Method.client_receive` (take the bytes of a round's broadcast);
- server side: `Method.validate_upload` (the one place that says what a valid upload is) and
  `Method.server_update` (a round's uploads → the broadcast bytes, the files worth publishing beside it,
  and metrics);
- state: `Method.save_pretrained` / `Method.from_pretrained` (config.json + safetensors), so a server
  restarts warm.

``ktl simulate`` drives these steps in one loop, the HTTP server (``ktl serve``) behind its store, rounds
and quorum, and a participant (``ktl client run``, ``ktl demo``) over the SDK. A method owns its
settings: `Method.settings_model` is a pydantic model whose fields are the configuration *sections* it
reads (``fedktl``, ``aligner``, ``baseline``, ``privacy``, …), the same sections ``ktl simulate``'s
config and an HTTP federation spec carry. A method never sees any other section.

New methods register with ``@register_method("name")``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

from ktl.clients import LocalClient, TrainStats
from ktl.errors import ConfigError, PayloadError
from ktl.generator import Generator
from ktl.records import Prototypes
from ktl.work import Work, run_to_end

__all__ = [
    "METHODS",
    "SECTIONS",
    "SUM_UPLOAD",
    "ClientUpdate",
    "Method",
    "MethodContext",
    "MethodSettings",
    "ServerUpdate",
    "UPLOAD_DTYPES",
    "available_methods",
    "get_method",
    "load_method",
    "register_method",
    "register_sections",
    "Section",
    "sum_summands",
    "validate_sections",
]

# Uploaded prototypes travel as float16 (half the bytes) or float32; anything else is refused.
UPLOAD_DTYPES = (torch.float16, torch.float32)
_CONFIG_FILE = "config.json"
_STATE_FILE = "state.safetensors"


class MethodSettings(BaseModel):
    """A method's settings: each field is one configuration section the method reads."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def sections(cls) -> tuple[str, ...]:
        return tuple(cls.model_fields)


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the federation, whatever the transport.

    Attributes
    ----------
    num_classes
        C.
    proto_dim
        K, the dimension of the head's output (= C in FedKTL).
    class_names
        Labels for images and logs (None: ``class <c>``).
    device
        Where the method's server-side work runs.
    seed
        Seeds the method's own draws: the server's (prior samples, pair choice, its models' init) and
        the clients' privacy noise.
    generator
        The frozen generator, given by the transport to methods whose `Method.uses_generator` is true
        (None on a client, which never runs one).
    """

    num_classes: int
    proto_dim: int
    class_names: list[str] | None
    device: torch.device = torch.device("cpu")
    seed: int = 0
    generator: Generator | None = None


@dataclass(frozen=True)
class CostShape:
    """The sizes a server step's cost depends on: C, K, the uploaded rows one round can hold (≤ C per
    upload × the uploads that close it), and the generator's latent dim and image (0 without one)."""

    num_classes: int
    proto_dim: int
    rows: int
    latent_dim: int = 0
    image_values: int = 0  # channels × height × width of one generated image


@dataclass(frozen=True)
class ServerCost:
    """What one round's server step needs: peak memory on the device (the frozen generator aside), the
    number of optimisation steps and the arithmetic of each (for a time estimate on a measured device)."""

    memory_bytes: int
    steps: int = 1
    flops_per_step: float = 0.0


@dataclass(frozen=True)
class ClientUpdate:
    stats: TrainStats
    payload: bytes | None  # what the client uploads this round (None: nothing)


@dataclass(frozen=True)
class ServerUpdate:
    payload: bytes | None  # what every client downloads (None: nothing)
    metrics: dict[str, float] = field(default_factory=dict)
    # Files worth publishing beside the broadcast (name → bytes), e.g. FedKTL's pairs grid and centroids.
    files: dict[str, bytes] = field(default_factory=dict)


class Method(ABC):
    """One federated method; subclasses override the steps they need.

    Class attributes
    ----------------
    name
        The registry name (set by `register_method`).
    settings_model
        The sections this method reads (a `MethodSettings` subclass).
    uses_generator
        True when the server step needs `MethodContext.generator`.
    exchanges
        False for a method that sends nothing (``local``): transports that only move payloads refuse it.
    broadcast_file
        The name under which a server publishes the broadcast bytes.
    aggregation
        ``"each"``: the server step reads every client's upload. ``"sum"``: each upload is a *summand* (named
        fixed-shape tensors, `summand_layout`) and the server step reads only the element-wise sum of the
        round's summands (`server_input`), which a transport may compute under secure aggregation
        (Flower's SecAgg+, `ktl.flower`) so that no single summand ever reaches the server.
    """

    name: ClassVar[str]
    settings_model: ClassVar[type[MethodSettings]] = MethodSettings
    uses_generator: ClassVar[bool] = False
    exchanges: ClassVar[bool] = True
    broadcast_file: ClassVar[str] = "broadcast.safetensors"
    aggregation: ClassVar[str] = "each"

    def __init__(self, settings: MethodSettings, ctx: MethodContext) -> None:
        if not isinstance(settings, self.settings_model):
            raise TypeError(
                f"{self.name} takes {self.settings_model.__name__}, got {type(settings).__name__}"
            )
        self.settings = settings
        self.ctx = ctx
        self.check_shape(settings, ctx.num_classes, ctx.proto_dim)

    @classmethod
    def check_shape(cls, settings: MethodSettings, num_classes: int, proto_dim: int) -> None:
        """Refuse settings that do not fit C = ``num_classes`` classes and K = ``proto_dim`` dims with a
        `ConfigError` (one line), before anything runs: a method's constructor and a federation spec call it.
        Default: any settings fit."""
        return None

    @classmethod
    def settings_from(cls, sections: Mapping[str, Any] | BaseModel) -> MethodSettings:
        """This method's settings from whatever carries the sections — a ``SimulateConfig``, a federation
        spec, or its JSON — taking only the sections the method reads. Raises `ConfigError` (one line)."""
        source = sections.model_dump() if isinstance(sections, BaseModel) else dict(sections)
        picked = {k: source[k] for k in cls.settings_model.sections() if source.get(k) is not None}
        try:
            return cls.settings_model.model_validate(picked)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ConfigError(f"invalid {cls.name} setting {where}: {first['msg']}") from None

    # -- client side -------------------------------------------------------------------------------

    @abstractmethod
    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        """Train locally and return what to upload."""

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        """Take the server's broadcast into the client's state (default: ignore it)."""
        return None

    def client_state(self, client: LocalClient) -> dict[str, torch.Tensor]:
        """What this method object itself keeps for ``client`` between rounds (beyond
        `LocalClient.state_tensors`), as flat-named CPU tensors safetensors can save; default: nothing.
        A transport whose client processes do not live between rounds saves it after each step and gives
        it to `load_client_state` on a fresh method object built with the same settings."""
        return {}

    def load_client_state(self, client: LocalClient, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what `client_state` returned for ``client`` (default: nothing to restore)."""
        return None

    # -- server side -------------------------------------------------------------------------------

    def summand_layout(self) -> dict[str, tuple[int, ...]]:
        """For ``aggregation = "sum"``: the summand's tensor names and shapes, in the order a secure-sum
        transport carries them (all float; every value in [−1, 1], the range SecAgg+ quantizes)."""
        raise NotImplementedError(f"method {self.name!r} does not upload summands")

    def server_input(self, uploads: Mapping[str, bytes]) -> Mapping[str, bytes]:
        """What the server step is given for the round's ``uploads``: the uploads themselves, or, for a
        ``"sum"`` method, their sum alone (``{"sum": bytes}``) — the transport-side aggregation of a run
        with no adversary (``ktl simulate``); a secure transport computes the same sum masked."""
        if self.aggregation != "sum":
            return uploads
        return {SUM_UPLOAD: sum_summands(uploads.values(), self.summand_layout())}

    def validate_upload(self, payload: bytes) -> Prototypes:
        """Decode one client's upload and check it against the federation; raise `PayloadError` with a
        reason code. The default is a table of unit-norm prototypes of dimension K."""
        prototypes = decode_prototypes(payload)
        prototypes.validate(num_classes=self.ctx.num_classes, dim=self.ctx.proto_dim)
        return prototypes

    def server_update(self, uploads: Mapping[str, bytes], round_index: int) -> ServerUpdate:
        """Turn the round's uploads (client id → bytes, in a canonical client order) into a broadcast:
        `server_steps` run to the end."""
        return run_to_end(self.server_steps(uploads, round_index))

    def server_steps(self, uploads: Mapping[str, bytes], round_index: int) -> Work[ServerUpdate]:
        """The server step as resumable work (`ktl.work`): a method whose step is long (an optimisation
        loop) yields between its steps, so a server can run it in slices beside other federations and
        stop it between two. The default sends nothing, in one slice."""
        return ServerUpdate(payload=None)
        yield  # a generator: the slice ends here

    @classmethod
    def server_cost(cls, settings: MethodSettings, shape: CostShape) -> ServerCost:
        """An estimate of one round's server step, for admission control before a federation exists.
        The default: the uploads themselves, held a few times over (a table method's mean)."""
        return ServerCost(
            memory_bytes=4 * 4 * shape.rows * shape.proto_dim, flops_per_step=shape.rows * shape.proto_dim
        )

    def decode_uploads(self, uploads: Mapping[str, bytes]) -> dict[str, Prototypes]:
        """Every upload through `validate_upload`, in the given order (none → `PayloadError`)."""
        if not uploads:
            raise PayloadError("no_uploads", "a round needs at least one upload to close")
        return {cid: self.validate_upload(data) for cid, data in uploads.items()}

    # -- state ---------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The server state that must survive a restart, as named tensors (default: none)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned."""
        return None

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` (method, settings, shapes) and the server state (safetensors)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "method": self.name,
            "settings": self.settings.model_dump(mode="json"),
            "num_classes": self.ctx.num_classes,
            "proto_dim": self.ctx.proto_dim,
            "seed": self.ctx.seed,
        }
        (path / _CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
        if tensors:
            save_file(tensors, str(path / _STATE_FILE))
        self.save_extra_state(path)

    def save_extra_state(self, path: Path) -> None:
        """Hook for state kept in its own HF-style folder (FedKTL's aligner)."""
        return None

    def load_extra_state(self, path: Path) -> None:
        return None

    @classmethod
    def from_pretrained(cls, path: str | Path, ctx: MethodContext) -> Method:
        """Rebuild a method saved by `save_pretrained`; ``ctx`` supplies the device and generator."""
        path = Path(path)
        config = read_method_config(path)
        if config.get("method") != cls.name:
            raise ConfigError(f"{path} holds method {config.get('method')!r}, not {cls.name!r}")
        if (config.get("num_classes"), config.get("proto_dim")) != (ctx.num_classes, ctx.proto_dim):
            raise ConfigError(
                f"{path} was saved for C={config.get('num_classes')}, K={config.get('proto_dim')}, "
                f"not C={ctx.num_classes}, K={ctx.proto_dim}"
            )
        method = cls(cls.settings_model.model_validate(config["settings"]), ctx)
        state = path / _STATE_FILE
        if state.is_file():
            method.load_state_tensors(load_file(str(state)))
        method.load_extra_state(path)
        return method

    # -- for a run folder (ktl simulate) ------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Facts for ``summary.json`` (e.g. which generator ran, the privacy budget)."""
        return {}

    def save_round(self, run_dir: Path, round_index: int, uploads: Mapping[str, bytes]) -> None:
        """Write what a round produced that is worth inspecting later (default: nothing)."""
        return None

    def save_artifacts(self, run_dir: Path) -> dict[str, str]:
        """Write the method's final state into the run folder; returns name → relative path."""
        return {}


def decode_prototypes(payload: bytes) -> Prototypes:
    """Safetensors bytes → `Prototypes` whose vectors are float16 or float32 (`PayloadError` otherwise)."""
    prototypes = Prototypes.from_bytes(payload)
    if prototypes.vectors.dtype not in UPLOAD_DTYPES:
        raise PayloadError("dtype", f"prototypes must be float16 or float32, got {prototypes.vectors.dtype}")
    return prototypes


SUM_UPLOAD = "sum"  # the one "upload" a sum method's server step reads


def sum_summands(payloads: Iterable[bytes], layout: Mapping[str, tuple[int, ...]]) -> bytes:
    """The element-wise float64 sum of summand payloads (safetensors bytes) laid out as ``layout``;
    `PayloadError` for a payload of another layout or with non-finite values."""
    total = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in layout.items()}
    n = 0
    for payload in payloads:
        try:
            tensors = st_load(payload)
        except (SafetensorError, ValueError) as exc:
            raise PayloadError("format", f"not a safetensors summand: {exc}") from None
        if set(tensors) != set(layout):
            raise PayloadError("layout", f"a summand holds {sorted(tensors)}, expected {sorted(layout)}")
        for name, shape in layout.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(shape) or not t.is_floating_point():
                raise PayloadError(
                    "layout", f"summand tensor {name} is {t.dtype} {tuple(t.shape)}, expected {shape}"
                )
            if not bool(torch.isfinite(t).all()):
                raise PayloadError("not_finite", f"summand tensor {name} holds NaN or inf")
            total[name] += t.double()
        n += 1
    if n == 0:
        raise PayloadError("no_uploads", "a round needs at least one upload to close")
    return st_save(total)


def read_method_config(path: Path) -> dict[str, Any]:
    file = Path(path) / _CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read method state {file}: {exc}") from None
    if not isinstance(config, dict) or "settings" not in config:
        raise ConfigError(f"{file} is not a saved method")
    return config


METHODS: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class Section:
    """One configuration section a method reads (``fedktl``, ``privacy``, a plugin's own …): its settings
    model (defaults and a ``Field(description=...)`` per setting), what the section is for, and the
    method that registered it first."""

    name: str
    model: type[BaseModel]
    description: str
    owner: type[Method]

    @property
    def builtin(self) -> bool:
        """Registered by one of ktl's own methods (the sections docs/configuration.md documents)."""
        return self.owner.__module__.startswith("ktl.")


# Every section some registered method reads, in registration order. A method declares its sections as the
# fields of its `Method.settings_model`; `register_method` registers them here, and the run configuration
# (`ktl.config.SimulateConfig`), a federation spec (`ktl.api.schemas.FederationSpec`), the CLI's flags,
# Flower's run-config keys and docs/configuration.md all read this one registry.
SECTIONS: dict[str, Section] = {}
# Names the run configuration uses for itself: no method section may take them.
RESERVED_SECTIONS = frozenset(
    {"preset", "method", "seed", "rounds", "num_clients", "models", "etf_seed", "device", "out", "data",
     "client", "generator", "study", "settings", "flower"}
)  # fmt: skip


def register_sections(cls: type[Method]) -> None:
    """Register the sections ``cls.settings_model`` declares. A section already registered must be the very
    same model (two methods share ``privacy`` by both naming `PrivacySettings`); anything else is a
    `ValueError` naming both methods, raised before anything is registered."""
    found: list[Section] = []
    for section, info in cls.settings_model.model_fields.items():
        model = info.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ValueError(f"method {cls.name!r}: settings section {section!r} must be a pydantic model")
        if section in RESERVED_SECTIONS:
            raise ValueError(f"method {cls.name!r}: {section!r} is a run setting, not a method's section")
        held = SECTIONS.get(section)
        if held is not None and held.model is not model:
            raise ValueError(
                f"method {cls.name!r}: section {section!r} is {held.model.__name__} (from method "
                f"{held.owner.name!r}), not {model.__name__}"
            )
        if held is None:
            found.append(Section(section, model, (info.description or "").strip(), cls))
    SECTIONS.update({s.name: s for s in found})


def validate_sections(
    data: Mapping[str, Any],
    handler: Callable[[dict[str, Any]], Any],
    *,
    fixed: Iterable[str],
    fill: bool,
    strict_json: bool = False,
) -> Any:
    """A model's validation with the registered sections as its extra keys (the body of a ``wrap`` model
    validator): each section's value in ``data`` (a dict of settings) validated into its model — ``fill``:
    absent sections get their defaults, else absent or None stay out; ``strict_json``: read as pydantic's
    strict JSON mode would (``"1"`` is no number) — then ``handler`` (the model's own validation) on the
    fields ``fixed`` and the sections, in registry order. Keys that are neither are unknown settings
    (``extra_forbidden``); every error, the sections' (loc prefixed by the section) and the model's own,
    comes in one `ValidationError`."""
    out = dict(data)
    errors: list[Any] = []
    known = set(fixed)
    for key in out:
        if key not in known and key not in SECTIONS:
            errors.append({"type": "extra_forbidden", "loc": (key,), "input": out[key]})
    for name, section in SECTIONS.items():
        raw = out.get(name)
        if isinstance(raw, section.model) or (raw is None and not fill):
            continue
        try:
            given = {} if raw is None else raw
            if strict_json:
                out[name] = section.model.model_validate_json(json.dumps(given), strict=True)
            else:
                out[name] = section.model.model_validate(given)
        except ValidationError as exc:
            errors += [
                {
                    "type": e["type"],
                    "loc": (name, *e["loc"]),
                    "input": e.get("input"),
                    "ctx": e.get("ctx", {}),
                }
                for e in exc.errors()
            ]
    ordered = {k: v for k, v in out.items() if k in known}
    ordered.update({name: out[name] for name in SECTIONS if out.get(name) is not None})
    try:
        result = handler(ordered)
    except ValidationError as exc:
        if not errors:
            raise
        errors = [{k: e[k] for k in ("type", "loc", "input", "ctx") if k in e} for e in exc.errors()] + errors
    if errors:
        raise ValidationError.from_exception_data("settings", errors)
    return result


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Register a `Method` subclass under ``name``, and the configuration sections its settings model
    declares (`register_sections`)."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        register_sections(cls)
        METHODS[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[Method]:
    """The registered method ``name``, or a `ConfigError` listing the available ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return METHODS[name]


def load_method(path: str | Path, ctx: MethodContext) -> Method:
    """Whatever method `Method.save_pretrained` wrote under ``path``."""
    config = read_method_config(Path(path))
    return get_method(str(config.get("method"))).from_pretrained(path, ctx)
