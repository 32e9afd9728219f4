"""Server settings: a pydantic model read from flags, ``KTL_*`` environment variables and a TOML file.

Precedence, highest first: explicit values (``ktl serve`` flags, or keyword arguments in tests) →
environment (``KTL_ADMIN_TOKEN``, ``KTL_DATA_DIR``, ``KTL_PORT``, …; nested with ``__``, e.g.
``KTL_GENERATORS__DEFAULT__BATCH_SIZE``) → the ``--config`` TOML file → defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ktl.config import format_validation_error
from ktl.errors import ConfigError
from ktl.generator import GeneratorSpec

__all__ = ["ServerSettings", "load_settings"]


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
    device: str = Field("auto", description="Where alignment and generation run: cpu, cuda, cuda:N or auto")
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
    keep_aligner_rounds: int = Field(
        2, ge=1, description="Snapshots of the method's server state kept per federation"
    )

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
