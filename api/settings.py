"""Server settings: a pydantic model read from flags, ``KTL_*`` environment variables and a TOML file.

Precedence, highest first: explicit values (``ktl serve`` flags, or keyword arguments in tests) →
environment (``KTL_ADMIN_TOKEN``, ``KTL_DATA_DIR``, ``KTL_PORT``, …; nested with ``__``, e.g.
``KTL_GENERATORS__DEFAULT__BATCH_SIZE``; lists comma-separated, ``KTL_DEVICES=cuda:0,cuda:1``) → the
``--config`` TOML file → defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ktl.config import format_validation_error
from ktl.device import resolve_device
from ktl.errors import ConfigError
from ktl.generator import GeneratorSpec

__all__ = ["ServerSettings", "load_settings", "resolve_devices"]


def _canonical(name: str) -> str:
    """A device name as compared: ``auto`` resolved, ``cuda`` → ``cuda:0``; a malformed name raises."""
    name = name.strip()
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and device.index is None:
        return "cuda:0"
    return str(device)


class ServerSettings(BaseSettings):
    """Everything ``ktl serve`` needs. Tests build one directly with keyword arguments."""

    model_config = SettingsConfigDict(env_prefix="KTL_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(
        Path("ktl-data"), description="Where state lives: SQLite metadata + safetensors tensors"
    )
    host: str = Field("127.0.0.1", description="Bind address; loopback unless an operator says otherwise")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the operator; required: the server refuses to start without one",
    )
    device: str | None = Field(
        None,
        description="One device for alignment and generation: cpu, cuda, cuda:N or auto (the GPU, else "
        "the CPU); none = the devices of `devices`",
    )
    devices: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="The devices the server uses, one worker each (comma-separated in KTL_DEVICES and "
        "--devices, e.g. cuda:0,cuda:1; a device may repeat): rounds run on the first, batch jobs' "
        "batches on all of them; none = `device` if set, else every visible CUDA GPU, else the CPU",
    )
    generators: dict[str, GeneratorSpec] = Field(
        default_factory=lambda: {"default": GeneratorSpec()},
        description="Generators loaded once at start-up, by name, each with the fields of ktl simulate's "
        "generator.* settings (kind, path, …); federations pick one by name",
    )
    max_upload_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest upload body (safetensors); larger uploads get 413"
    )
    # -- limits on every caller (checked before authentication and before parsing) ----------------------
    max_json_upload_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest JSON upload body (JSON costs ~10× its size in memory while parsed; "
        "safetensors is preferred)",
    )
    max_request_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest body of every other route (federation specs, client registrations, jobs); "
        "413 beyond, before the token is checked",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Seconds a request body may take to arrive in full; 408 after"
    )
    limit_concurrency: int = Field(
        256,
        ge=8,
        description="Requests in progress at once (idle keep-alive connections do not count; the health "
        "probes are never refused); beyond it 503 at once",
    )
    keep_alive_s: float = Field(5.0, gt=0, description="Seconds an idle keep-alive connection stays open")
    # -- admission control and fairness on the device -------------------------------------------------
    max_federation_bytes: int | None = Field(
        None,
        ge=1,
        description="Most device memory one federation's server step may need by the cost model "
        "(parameters, optimiser state, activations, pairs); none = a quarter of the device's memory "
        "(of RAM on the CPU). A spec beyond it is refused with 422",
    )
    max_align_seconds: float = Field(
        600.0, gt=0, description="Time budget of one round's server step; past it the round fails"
    )
    align_slice_seconds: float = Field(
        0.25,
        gt=0,
        description="A server step runs in slices of about this long, round-robin with the other "
        "federations' work, so no federation holds the device for longer",
    )
    max_round_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="Times a round's server step is tried (restarts included) before the round fails",
    )
    # -- storage ------------------------------------------------------------------------------------------
    min_free_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="Free space below which /readyz reports not ready and writes are refused with 507",
    )
    rate_limit_per_minute: float = Field(
        600.0, gt=0, description="Sustained requests per minute per client token (token bucket; 429 beyond)"
    )
    rate_limit_burst: int = Field(60, ge=1, description="Requests a client token may make at once")
    scheduler_interval_s: float = Field(0.25, gt=0, description="Seconds between checks of round deadlines")
    job_batch_size: int = Field(256, ge=1, description="Images per generator call in batch jobs")
    # Writing after every small batch cost ~25 % of the images/s at batch 16 on 2 CPU cores.
    job_progress_interval_s: float = Field(
        0.5,
        ge=0,
        description="Least seconds between a running job's progress writes (each is a durable SQLite "
        "commit, an fsync)",
    )
    max_job_images: int = Field(200_000, ge=1, description="Most images one batch job may generate")
    job_retention_s: float | None = Field(
        7 * 86400.0,
        gt=0,
        description="Seconds a finished job (done, failed, cancelled) and its result file are kept after it "
        "ends; then both are deleted (DELETE /v1/jobs/{id} deletes one at once); none = kept until deleted",
    )
    keep_aligner_rounds: int = Field(
        2, ge=1, description="Snapshots of the method's server state kept per federation"
    )

    @field_validator("devices", mode="before")
    @classmethod
    def _split_devices(cls, value: Any) -> Any:
        if isinstance(value, str):  # KTL_DEVICES=cuda:0,cuda:1 (or a JSON list)
            if value.strip().startswith("["):
                try:
                    return json.loads(value)
                except ValueError:
                    raise ValueError(f"{value!r} is not a JSON list of device names") from None
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("name at least one device, e.g. cpu or cuda:0,cuda:1")
            for name in value:
                _canonical(name)
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        if value is not None:
            _canonical(value)
        return value

    @model_validator(mode="after")
    def _device_agrees_with_devices(self) -> ServerSettings:
        if (
            self.device is not None
            and self.devices is not None
            and [_canonical(self.device)] != [_canonical(d) for d in self.devices]
        ):
            raise ValueError(
                f"device={self.device} and devices={','.join(self.devices)} disagree: --device "
                "(KTL_DEVICE) names one device, --devices (KTL_DEVICES) a list; set only one of them"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = settings_cls.model_config.get("toml_file")
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if toml:
            sources += (TomlConfigSettingsSource(settings_cls),)
        return sources


def load_settings(config_file: Path | None = None, **overrides: Any) -> ServerSettings:
    """Resolve settings; a bad value or a missing file is a `ConfigError` with one line."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cls: type[ServerSettings] = ServerSettings
    if config_file is not None:
        toml_path = Path(config_file)
        if not toml_path.is_file():
            raise ConfigError(f"config file {config_file} does not exist")

        class _FromFile(ServerSettings):
            model_config = SettingsConfigDict(**{**ServerSettings.model_config, "toml_file": toml_path})

        cls = _FromFile
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except ValueError as exc:  # a malformed TOML file
        raise ConfigError(f"cannot read config file {config_file}: {exc}") from None


def resolve_devices(settings: ServerSettings) -> list[torch.device]:
    """The server's devices: ``devices``, else ``device``, else every visible CUDA GPU, else the CPU. A
    CUDA device that is not there is a `ConfigError`."""
    names = settings.devices or ([settings.device] if settings.device is not None else None)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if names is None:
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    devices = [resolve_device(name.strip()) for name in names]
    for device in devices:
        if device.type == "cuda" and (device.index or 0) >= count:
            raise ConfigError(f"device {device} asked for, but this machine has {count} CUDA device(s)")
    return devices
