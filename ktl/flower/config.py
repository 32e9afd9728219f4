"""Flower's run config → the same configuration as ``ktl simulate``.

Every setting of ``ktl simulate`` is a run-config key, dotted as on the command line (``preset``,
``method``, ``rounds``, ``client.lr``, ``privacy.epsilon``, ``models`` as a comma list …): in
``pyproject.toml``'s ``[tool.flwr.app.config]`` or ``flwr run . --run-config "method='fedproto'"``; since ``flwr run`` only overrides keys its
``pyproject.toml`` lists, any other setting goes in the one ``settings`` key as space-separated pairs
(``--run-config "settings='client.lr=0.05 data.alpha=0.5'"``). Keys under ``flower.`` are the
transport's own (`FlowerOptions`); participation is ``study.join_ratio`` / ``study.min_clients`` as in
``ktl simulate`` (``flower.fraction`` remains as an alias).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ktl.config import SimulateConfig, build_config, config_fields, nest, parse_flag_value
from ktl.errors import ConfigError
from ktl.study import StudySettings

__all__ = ["FlowerOptions", "from_run_config", "participation", "to_run_config"]


class FlowerOptions(BaseModel):
    """How the ServerApp samples and waits (the ``flower.*`` run-config keys)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="An alias of study.join_ratio (the fraction of the connected nodes sampled for each "
        "round's training), kept for older run configs: set, it overrides study.join_ratio.",
    )
    min_nodes: int = Field(
        1, ge=1, alias="min-nodes", description="Nodes that must be connected before the first round starts."
    )
    round_timeout: float = Field(
        3600.0,
        gt=0,
        alias="round-timeout",
        description="Seconds a round waits for its replies; late ones are dropped.",
    )
    out: str = Field("", description="A folder for metrics.jsonl and summary.json (empty: none).")
    # SecAgg+ (methods *-secagg): Flower's own parameters, Flower's example values as defaults.
    secagg_shares: int | float = Field(
        3,
        alias="secagg-shares",
        description="SecAgg+: shares of each client's secrets (its neighbours + itself): an integer > 2, or a "
        "fraction (0, 1] of the sampled nodes (1.0: every node, i.e. SecAgg).",
    )
    secagg_threshold: int | float = Field(
        2,
        alias="secagg-threshold",
        description="SecAgg+: shares needed to rebuild a secret (an integer below secagg-shares, or a "
        "fraction (0, 1] of them); a client whose live neighbours fall below it ends the round unsummed.",
    )

    @model_validator(mode="after")
    def _secagg(self) -> FlowerOptions:
        shares, threshold = self.secagg_shares, self.secagg_threshold
        if isinstance(shares, int) and shares <= 2 or isinstance(shares, float) and not 0 < shares <= 1:
            raise ValueError("secagg-shares must be an integer > 2 or a fraction in (0, 1]")
        if isinstance(threshold, float) and not 0 < threshold <= 1:
            raise ValueError("secagg-threshold as a fraction must lie in (0, 1]")
        if isinstance(threshold, int) and (threshold < 2 or isinstance(shares, int) and threshold >= shares):
            raise ValueError("secagg-threshold must be an integer ≥ 2 and below secagg-shares")
        return self


def participation(config: SimulateConfig, options: FlowerOptions) -> StudySettings:
    """The study settings the ServerApp samples with: ``study``, with ``flower.fraction`` (when set) as
    its join ratio."""
    if options.fraction is None:
        return config.study
    return config.study.model_copy(update={"join_ratio": options.fraction})


def from_run_config(run_config: Mapping[str, Any]) -> tuple[SimulateConfig, FlowerOptions]:
    """Split a run config into ktl's configuration (validated as ``ktl simulate`` validates it) and the
    transport's options; one `ConfigError` line for anything unknown or invalid."""
    preset = run_config.get("preset") or None
    annotations = {dotted: ann for dotted, ann, _ in config_fields()}
    overrides: dict[str, Any] = {}
    flower: dict[str, Any] = {}
    items = dict(run_config)
    for pair in str(items.pop("settings", "") or "").split():  # "client.lr=0.05 data.alpha=0.5"
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"run-config settings must be key=value pairs, got {pair!r}")
        items[key.strip()] = value.strip()
    for key, value in items.items():
        if key == "preset":
            continue
        if key.startswith("flower."):
            flower[key.removeprefix("flower.")] = value
            continue
        if key not in annotations:
            close = difflib.get_close_matches(key, list(annotations), n=1, cutoff=0.7)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown run-config key {key!r} (ktl simulate's settings, or flower.*){hint}")
        overrides[key] = parse_flag_value(annotations[key], value) if isinstance(value, str) else value
    config = build_config(preset=str(preset) if preset else None, overrides=nest(overrides))
    try:
        options = FlowerOptions.model_validate(flower)
    except ValueError as exc:
        raise ConfigError(f"invalid flower.* run config: {exc}") from None
    return config, options


def to_run_config(config: SimulateConfig, options: FlowerOptions | None = None) -> dict[str, Any]:
    """A resolved configuration as a flat run config (lists as comma strings), e.g. for `run_simulation`."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif value is None:
                continue
            elif isinstance(value, list | tuple):
                flat[f"{prefix}{key}"] = ",".join(str(v) for v in value)
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, bool | int | float) else str(value)

    walk(config.model_dump(mode="json", exclude={"preset", "out"}), "")
    for key, value in (options or FlowerOptions()).model_dump(by_alias=True, exclude_none=True).items():
        flat[f"flower.{key}"] = value
    return flat
