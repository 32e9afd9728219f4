"""Run configuration: pydantic models, presets (TOML data files), config files and flag overrides.

Precedence, lowest first: model defaults → ``--preset`` → ``--config FILE`` (TOML or JSON, e.g. a run's
``config.json``) → individual flags. Every field is a flag: ``--rounds 5``, ``--data.alpha 0.5``,
``--client.lr 0.05``, ``--models cnn4,vit-small``.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import re
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    SecretStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from ktl.clients import ClientSettings
from ktl.clients.backbones import expand_models
from ktl.data import DataConfig
from ktl.errors import ConfigError
from ktl.generator import GeneratorSpec
from ktl.methods import SECTIONS, Section, validate_sections
from ktl.study import StudySettings

__all__ = [
    "Setting",
    "sections_of",
    "with_sections",
    "SimulateConfig",
    "available_presets",
    "build_config",
    "config_fields",
    "format_validation_error",
    "format_value",
    "generated_docs",
    "iter_settings",
    "load_preset",
    "preset_settings",
    "preset_value",
    "update_docs",
]

logger = logging.getLogger(__name__)

# HtFLlib-style heterogeneous zoo, assigned to clients round-robin.
DEFAULT_MODELS = ["cnn4", "resnet-s", "resnet-m", "mobilenetv2", "vit-small", "convnext"]
_S = TypeVar("_S", bound=BaseModel)
_DEVICE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")


def with_sections(
    schema: JsonSchemaValue, handler: GetJsonSchemaHandler, *, optional: bool
) -> JsonSchemaValue:
    """``schema`` (a model's JSON schema) with a property per registered method section (its settings model
    in ``$defs``), and no other extra property: the sections a model takes from the registry are
    documented as if declared (``--help``, OpenAPI). ``optional``: the section may be null."""
    target = handler.resolve_ref_schema(schema)
    properties = target.setdefault("properties", {})
    for section in SECTIONS.values():
        # Through the generator itself (not ``handler``, which inlines): a ``$ref`` into ``$defs``.
        ref = handler.generate_json_schema.generate_inner(section.model.__pydantic_core_schema__)  # type: ignore[attr-defined]
        prop: JsonSchemaValue = {"anyOf": [ref, {"type": "null"}], "default": None} if optional else dict(ref)
        properties[section.name] = {**prop, "description": section.description}
    target["additionalProperties"] = False
    return schema


class SimulateConfig(BaseModel):
    """Everything ``ktl simulate`` needs; ``config.json`` in a run folder is this model, resolved.

    Besides the fields below it holds one section per registered method section (``fedktl``, ``aligner``,
    ``baseline``, ``privacy``, ``secagg``, a plugin's own, …; `ktl.methods.SECTIONS`), each its settings
    model with its defaults: a method declares the sections it reads on its settings model, and
    registering the method adds them here. Read one as ``config.section("privacy")`` (or the attribute)."""

    # Extra keys are allowed only as the registered sections (checked in `_method_sections`).
    model_config = ConfigDict(extra="allow")

    preset: str | None = Field(
        None,
        description="The preset the run started from: recorded in config.json, not applied (use --preset)",
    )
    method: str = Field(
        "fedktl",
        description="A registered method: fedktl, local (training alone: same models, data and budget), the "
        "baselines fedproto, fedtgp, fd, the ablation fedktl-latents (the server sends only the class "
        "latents; clients distil their own images towards them), and fedproto-secagg / fedktl-secagg (the "
        "server sees only per-class sums; secure aggregation on Flower); see docs/results.md",
    )
    seed: int = Field(
        0,
        description="Seeds data subsampling, partitions, model init, batch order and the server's draws; "
        "same seed, same numbers on the same CPU and thread count, and on any x86-64 CPU in the pinned "
        "mode KTL_REPRODUCIBLE=1 (docs/architecture.md, Seeds and determinism)",
    )
    rounds: int = Field(20, ge=1, description="Communication rounds")
    num_clients: int = Field(20, ge=1, description="Number of clients; a pfl-npz folder must hold this many")
    models: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MODELS),
        min_length=1,
        description="Backbones assigned to clients round-robin, or a model group standing for its members "
        "(htfe8: HtFLlib's 4-layer CNN, GoogLeNet, MobileNetV2, ResNet-18/34/50/101/152); `ktl list` shows both",
    )
    etf_seed: int = Field(0, description="Seed of the shared simplex-ETF classifier")
    device: str = Field("cpu", description="cpu, cuda, cuda:N, mps or auto (cuda when available, else cpu)")
    out: Path | None = Field(
        None,
        description="Run folder; none = runs/<method>-<preset>-s<seed>-<timestamp>. An existing non-empty "
        "folder is refused unless --overwrite",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    client: ClientSettings = Field(default_factory=ClientSettings)
    generator: GeneratorSpec = Field(default_factory=GeneratorSpec)
    study: StudySettings = Field(default_factory=StudySettings)

    @model_validator(mode="wrap")
    @classmethod
    def _method_sections(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> SimulateConfig:
        """Every registered section validated into its model (defaults where absent); any other key that is
        not a field is an unknown setting, as under ``extra="forbid"``."""
        if not isinstance(data, dict):
            return handler(data)
        config: SimulateConfig = validate_sections(data, handler, fixed=cls.model_fields, fill=True)
        return config

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return with_sections(handler(core_schema), handler, optional=False)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (for another process: a Ray worker of ``ktl flower simulate``) as its JSON and the plugins
        loaded here, which the other process loads before validating it — a plugin method's section model
        lives in a module only that process can import by loading the plugin."""
        from ktl.plugins import loaded_plugins

        return (_config_from_json, (self.model_dump_json(), loaded_plugins()))

    def section(self, name: str, model: type[_S] = BaseModel) -> _S:  # type: ignore[assignment]
        """The settings of method section ``name`` (e.g. ``config.section("privacy", PrivacySettings)``,
        typed as ``model``); `ConfigError` if no such section is registered."""
        value = (self.__pydantic_extra__ or {}).get(name)
        if not isinstance(value, model):
            raise ConfigError(
                f"no settings section {name!r} of {model.__name__}; registered: {', '.join(SECTIONS)}"
            )
        return value

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: list[str]) -> list[str]:
        """Registered backbones; a model group's name (``htfe8``) stands for its members."""
        return expand_models(models)

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


def _config_from_json(text: str, plugins: list[str]) -> SimulateConfig:
    """Unpickle a `SimulateConfig`: load the plugins it was made with, then validate its JSON."""
    from ktl.plugins import load_plugins

    load_plugins(plugins)
    return SimulateConfig.model_validate_json(text)


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
            close = difflib.get_close_matches(loc, [x.name for x in iter_settings()], n=1, cutoff=0.7)
            msg = "unknown setting" + (f" (did you mean {close[0]}?)" if close else "")
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
    given: dict[str, Any] = {}
    if config_file is not None:
        given = _load_file(Path(config_file))
    given = _merge(given, overrides or {})
    data = _merge(data, given)
    _keep_users_data_whole(data, given, preset)
    try:
        return SimulateConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def _keep_users_data_whole(data: dict[str, Any], given: dict[str, Any], preset: str | None) -> None:
    """A preset's ``data.fraction`` subsamples the preset's own data set; on a data set the user brought
    (another ``data.dataset``) it is dropped unless the user set it too — a preset never shrinks a user's
    data silently (it once took a PFLlib client from 61 training samples to 15)."""
    section, mine = data.get("data") or {}, given.get("data") or {}
    if preset is None or "dataset" not in mine or "fraction" in mine:
        return
    preset_data = load_preset(preset).get("data") or {}
    if "fraction" in preset_data and mine["dataset"] != preset_data.get("dataset", mine["dataset"]):
        section.pop("fraction", None)
        logger.info(
            "preset %s: data.fraction %s is for its %s data, not applied to %s (set --data.fraction to subsample)",
            preset,
            preset_data["fraction"],
            preset_data.get("dataset"),
            mine["dataset"],
        )


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


@dataclass(frozen=True)
class Setting:
    """One leaf setting of a settings model."""

    name: str  # dotted, e.g. ``data.alpha``
    annotation: Any
    description: str  # the field's ``description``: the one place its meaning is written
    default: Any  # the built-in default (default factories called)
    model: type[BaseModel]  # the model that declares it


def sections_of(model: type[BaseModel], *, builtin_only: bool = False) -> list[Section]:
    """The method sections ``model`` takes from the registry besides its fields: all of them for
    `SimulateConfig` (``builtin_only``: only those of ktl's own methods), none for any other model."""
    if not (isinstance(model, type) and issubclass(model, SimulateConfig)):
        return []
    return [s for s in SECTIONS.values() if s.builtin or not builtin_only]


def iter_settings(
    model: type[BaseModel] = SimulateConfig, prefix: str = "", *, builtin_only: bool = False
) -> Iterator[Setting]:
    """Every leaf setting of ``model``, depth first in declaration order (then the registered method
    sections, for `SimulateConfig`); nested models are walked. ``builtin_only``: leave out the sections
    of plugin methods (the reference page documents ktl's own)."""
    for name, info in model.model_fields.items():
        if _is_model(info.annotation):
            yield from iter_settings(info.annotation, f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            yield Setting(
                name=f"{prefix}{name}",
                annotation=info.annotation,
                description=(info.description or "").strip(),
                default=info.get_default(call_default_factory=True),
                model=model,
            )
    for section in sections_of(model, builtin_only=builtin_only):
        yield from iter_settings(section.model, f"{prefix}{section.name}.")


def format_value(value: Any) -> str:
    """A value as it is written on the command line: ``none``, ``true``, ``a,b,c``, ``0.01``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, BaseModel):
        changed = value.model_dump(exclude_defaults=True)
        return (
            f"{type(value).__name__}(" + ", ".join(f"{k}={format_value(v)}" for k, v in changed.items()) + ")"
        )
    if isinstance(value, SecretStr):
        return "***"
    return str(value)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _lookup(config: BaseModel, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, BaseModel) or part not in {
            **type(value).model_fields,
            **(value.model_extra or {}),
        }:
            raise ConfigError(f"unknown setting {dotted!r}")
        value = getattr(value, part)
    return value


def preset_settings(preset: str) -> dict[str, Any]:
    """What preset ``preset`` sets: dotted name → value, validated (as a run sees it)."""
    config = build_config(preset=preset)
    return {dotted: _lookup(config, dotted) for dotted in _flatten(load_preset(preset))}


def preset_value(preset: str | None, dotted: str) -> Any:
    """The value of setting ``dotted`` (e.g. ``client.lr``) under ``preset``: the preset's own value where
    it sets one, else the built-in default; ``preset=None`` gives the default."""
    return _lookup(build_config(preset=preset), dotted)


def flag_help(setting: Setting, preset: str | None = None, chosen: dict[str, Any] | None = None) -> str:
    """A flag's help: its meaning, its default and, where ``chosen`` (the preset's settings) sets it, the
    preset's value, e.g. ``SGD learning rate (paper: 0.01). default 0.01; preset cpu-small: 0.05``."""
    text = setting.description.rstrip(". ") or "(undocumented)"
    text += f". default {format_value(setting.default)}"
    if preset is not None and chosen and setting.name in chosen:
        text += f"; preset {preset}: {format_value(chosen[setting.name])}"
    return text


def config_fields(
    model: type[BaseModel] = SimulateConfig, prefix: str = "", *, preset: str | None = None
) -> Iterator[tuple[str, Any, str]]:
    """Yield ``(dotted name, annotation, help)`` for every leaf setting of ``model``; the help is the
    setting's description and default, plus the value of ``preset`` where that preset sets it (an unknown
    preset is a `ConfigError`)."""
    chosen = preset_settings(preset) if preset is not None else {}
    for setting in iter_settings(model, prefix):
        yield setting.name, setting.annotation, flag_help(setting, preset, chosen)


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


# -- the settings reference (docs/configuration.md) ------------------------------------------------
# The page keeps hand-written prose around generated blocks, each between
# ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; `update_docs` rewrites the blocks from the models.
# Regenerate with ``python -m ktl.config --write-docs docs/configuration.md`` (``--check`` only checks).


def _cell(text: str) -> str:
    """Text for a Markdown table cell: RST ``code`` as Markdown `code`, ``<``/``>`` outside code escaped
    (``runs/<method>`` is not an HTML tag), ``|`` escaped."""
    parts = " ".join(text.replace("``", "`").split()).split("`")
    parts[::2] = [p.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for p in parts[::2]]
    return "`".join(parts).replace("|", "\\|")


def _code(value: Any) -> str:
    text = format_value(value)
    return "none" if text == "none" else "`" + text.replace("|", "\\|") + "`"


def _doc_of(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(inspect.cleandoc(doc).split("\n\n", 1)[0].split())


def _readers(section: str) -> list[str]:
    """ktl's own methods whose settings model declares ``section``."""
    from ktl.methods import METHODS

    return sorted(
        name
        for name, cls in METHODS.items()
        if section in cls.settings_model.sections() and cls.__module__.startswith("ktl.")
    )


def _settings_markdown(model: type[BaseModel], title: str) -> str:
    """One section per (nested) model: its docstring, then a table of its leaf settings."""
    groups: dict[str, list[Setting]] = {}
    for setting in iter_settings(model, builtin_only=True):
        groups.setdefault(setting.name.rpartition(".")[0], []).append(setting)
    out: list[str] = []
    for prefix, settings in groups.items():
        heading = f"`{prefix}`" if prefix else title
        out += [f"### {heading}", ""]
        if doc := _doc_of(settings[0].model):
            out += [_cell(doc), ""]
        if prefix in SECTIONS:  # a method section: who reads it, from the registry
            readers = ", ".join(f"`{name}`" for name in _readers(prefix))
            out += [f"A method section, read by {readers}.", ""]
        out += ["| setting | default | meaning |", "|---|---|---|"]
        out += [f"| `{s.name}` | {_code(s.default)} | {_cell(s.description)} |" for s in settings]
        out.append("")
    return "\n".join(out).rstrip("\n")


def _presets_markdown() -> str:
    """Rows: every setting some preset sets; columns: the built-in default, then each preset's value."""
    presets = available_presets()
    chosen = {name: preset_settings(name) for name in presets}
    rows = [s for s in iter_settings(builtin_only=True) if any(s.name in c for c in chosen.values())]
    out = [
        "| setting | default | " + " | ".join(f"`{p}`" for p in presets) + " |",
        "|---|---|" + "---|" * len(presets),
    ]
    for s in rows:
        values = [_code(chosen[p][s.name]) if s.name in chosen[p] else "" for p in presets]
        out.append(f"| `{s.name}` | {_code(s.default)} | " + " | ".join(values) + " |")
    return "\n".join(out)


def _serve_markdown() -> str:
    from ktl.api.settings import ServerSettings

    prefix = str(ServerSettings.model_config.get("env_prefix", ""))
    sep = str(ServerSettings.model_config.get("env_nested_delimiter") or "__")
    out = ["| setting | environment | default | meaning |", "|---|---|---|---|"]
    for s in iter_settings(ServerSettings):
        env = prefix + s.name.replace(".", sep).upper()
        args = typing.get_args(s.annotation)
        if typing.get_origin(s.annotation) is dict and len(args) == 2 and _is_model(args[1]):
            env += f"{sep}<NAME>{sep}<FIELD>"
        out.append(f"| `{s.name}` | `{env}` | {_code(s.default)} | {_cell(s.description)} |")
    return "\n".join(out)


def generated_docs() -> dict[str, str]:
    """The generated blocks of docs/configuration.md, by marker name."""
    return {
        "presets": _presets_markdown(),
        "settings": _settings_markdown(SimulateConfig, "Run"),
        "serve": _serve_markdown(),
    }


def update_docs(text: str) -> str:
    """``text`` with every generated block rewritten; a block whose markers are missing is a `ConfigError`."""
    for name, body in generated_docs().items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        head, found, rest = text.partition(begin)
        _, found_end, tail = rest.partition(end)
        if not (found and found_end):
            raise ConfigError(f"the page lacks the markers {begin} … {end}")
        note = "<!-- generated from the settings models: python -m ktl.config --write-docs FILE -->"
        text = f"{head}{begin}\n{note}\n\n{body}\n\n{end}{tail}"
    return text


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ktl.config", description="Regenerate the settings reference of a Markdown page."
    )
    parser.add_argument(
        "--write-docs", type=Path, required=True, metavar="FILE", help="e.g. docs/configuration.md"
    )
    parser.add_argument("--check", action="store_true", help="only check: exit 1 if FILE is stale")
    args = parser.parse_args(argv)
    text = args.write_docs.read_text()
    new = update_docs(text)
    if args.check:
        if new != text:
            sys.stderr.write(
                f"{args.write_docs} is stale: run python -m ktl.config --write-docs {args.write_docs}\n"
            )
            return 1
        return 0
    if new != text:
        args.write_docs.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
