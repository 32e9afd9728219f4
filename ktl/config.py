"""Run configuration: pydantic models, presets (TOML data files), config files and flag overrides.

Precedence, lowest first: model defaults → ``--preset`` → ``--config FILE`` (TOML or JSON, e.g. a run's
``config.json``) → individual flags. Every field is a flag: ``--rounds 5``, ``--data.alpha 0.5``,
``--client.lr 0.05``, ``--models cnn4,vit-small``.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ktl.aligner import AlignerSettings
from ktl.clients import ClientSettings
from ktl.clients.backbones import BACKBONES, available_backbones
from ktl.data import DataConfig
from ktl.errors import ConfigError
from ktl.generator import GeneratorSpec
from ktl.methods import BaselineSettings, PrivacySettings
from ktl.round import FedKTLSettings

__all__ = [
    "SimulateConfig",
    "available_presets",
    "build_config",
    "config_fields",
    "format_validation_error",
    "load_preset",
]

# HtFLlib-style heterogeneous zoo, assigned to clients round-robin.
DEFAULT_MODELS = ["cnn4", "resnet-s", "resnet-m", "mobilenetv2", "vit-small", "convnext"]
_DEVICE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")


class SimulateConfig(BaseModel):
    """Everything ``ktl simulate`` needs; ``config.json`` in a run folder is this model, resolved."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = None  # the preset the run started from (recorded, not applied)
    method: str = "fedktl"  # a registered method: fedktl | local | fedproto | fedtgp | fd | fedktl-latents
    seed: int = 0  # seeds data, partitions, model init, batch order and the server's draws
    rounds: int = Field(20, ge=1)  # communication rounds
    num_clients: int = Field(20, ge=1)
    models: list[str] = Field(default_factory=lambda: list(DEFAULT_MODELS), min_length=1)  # round-robin
    etf_seed: int = 0  # the shared simplex-ETF classifier
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (cuda when available)
    out: Path | None = None  # run folder; default runs/<method>-<preset>-s<seed>-<timestamp>
    data: DataConfig = Field(default_factory=DataConfig)
    client: ClientSettings = Field(default_factory=ClientSettings)
    fedktl: FedKTLSettings = Field(default_factory=FedKTLSettings)
    aligner: AlignerSettings = Field(default_factory=AlignerSettings)
    generator: GeneratorSpec = Field(default_factory=GeneratorSpec)
    baseline: BaselineSettings = Field(default_factory=BaselineSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: list[str]) -> list[str]:
        unknown = [m for m in models if m not in BACKBONES]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; available: {', '.join(available_backbones())}")
        return models

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        from ktl.methods import METHODS, available_methods

        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; available: {', '.join(available_methods())}")
        return method

    @field_validator("device")
    @classmethod
    def _device_name(cls, device: str) -> str:
        if not _DEVICE.match(device):
            raise ValueError(f"device must be cpu, cuda, cuda:N, mps or auto, got {device!r}")
        return device


def available_presets() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml")
        for p in resources.files("ktl.presets").iterdir()
        if p.name.endswith(".toml")
    )


def load_preset(name: str) -> dict[str, Any]:
    path = resources.files("ktl.presets") / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    return tomllib.loads(path.read_text())


def _load_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def format_validation_error(exc: ValidationError) -> str:
    """One line naming each bad setting, e.g. ``rounds: must be ≥ 1 (got -1)``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        got = err.get("input")
        suffix = "" if isinstance(got, dict) or err["type"] == "extra_forbidden" else f" (got {got!r})"
        parts.append(f"{loc}: {msg}{suffix}")
    return "invalid config: " + "; ".join(parts)


def build_config(
    *, preset: str | None = None, config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> SimulateConfig:
    """Resolve defaults ← preset ← config file ← overrides (a nested dict) into a validated config."""
    data: dict[str, Any] = {}
    if preset is not None:
        data = _merge(load_preset(preset), {"preset": preset})
    if config_file is not None:
        data = _merge(data, _load_file(Path(config_file)))
    data = _merge(data, overrides or {})
    try:
        return SimulateConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


# -- flags -----------------------------------------------------------------------------------------


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_sequence(annotation: Any) -> bool:
    origins = {typing.get_origin(a) for a in (annotation, *typing.get_args(annotation))}
    return bool(origins & {list, tuple})


def _is_optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )


def config_fields(
    model: type[BaseModel] = SimulateConfig, prefix: str = ""
) -> Iterator[tuple[str, Any, str]]:
    """Yield ``(dotted name, annotation, description)`` for every leaf setting of ``model``."""
    for name, info in model.model_fields.items():
        if _is_model(info.annotation):
            yield from config_fields(info.annotation, f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            yield (
                f"{prefix}{name}",
                info.annotation,
                f"default: {info.get_default(call_default_factory=True)!r}",
            )


def parse_flag_value(annotation: Any, raw: str) -> Any:
    """A flag's text as pydantic should see it: comma lists for sequences, ``none`` for optionals."""
    if _is_optional(annotation) and raw.lower() in ("none", "null", ""):
        return None
    if _is_sequence(annotation):
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"data.alpha": 1}`` → ``{"data": {"alpha": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
