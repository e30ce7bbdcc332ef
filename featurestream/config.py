"""Runtime settings, read at the edge only: environment (prefix ``FEATURESTREAM_``), then a
``featurestream.toml`` in the working directory (or the file ``FEATURESTREAM_CONFIG`` names).

Library classes never read the environment; the CLI and the pipeline entry points build a
:class:`Settings` and pass it down.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Settings(BaseSettings):
    """Where the backing services are. ``None`` means: start (or reuse) an embedded one."""

    model_config = SettingsConfigDict(env_prefix="FEATURESTREAM_", extra="forbid", frozen=True)

    kafka_bootstrap_servers: str | None = Field(
        default=None, description="host:port[,host:port]; unset starts the embedded broker"
    )
    kafka_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="librdkafka settings for every Kafka client (SASL/SSL, client.id, ...), as JSON",
    )
    broker_storage: str | None = Field(
        default=None,
        description="storage URL of the embedded broker (s3://bucket/, postgres://...); unset: memory",
    )
    redis_url: str | None = Field(
        default=None, description="redis://host:port/db; unset starts an embedded redis-server"
    )
    delta_uri: str | None = Field(
        default=None, description="Delta Lake root (local dir or s3://, gs://, az:// URI)"
    )
    delta_storage_options: dict[str, str] = Field(default_factory=dict)
    state_dir: Path = Field(
        default=Path(".featurestream"), description="embedded services' data and pid files"
    )
    redis_prefix: str = Field(default="fs", description="prefix of every online-store key")
    registry_url: str | None = Field(
        default=None, description="sqlite:///path or postgresql://...; unset: <state_dir>/registry.db"
    )
    metrics_port: int = Field(
        default=9464, description="worker /metrics and /healthz port (+ process id); 0 disables"
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="address /metrics and /healthz listen on; 0.0.0.0 for every interface (containers)",
    )
    drift_interval_seconds: float = Field(
        default=300, description="how often a worker measures drift of views with baselines; 0 disables"
    )
    drift_bucket_seconds: int = Field(default=3600, description="time bucket of live drift statistics")
    bounded: bool = Field(
        default=False, description="stop at each partition's end offset as of start (backfills)"
    )
    serve_host: str = Field(default="127.0.0.1", min_length=1, description="feature server address")
    serve_port: int = Field(default=6566, ge=0, le=65535, description="feature server port")
    serve_auth: bool = Field(
        default=True, description="feature server requires API keys; false only for local development"
    )
    serve_max_entities: int = Field(default=1000, ge=1, description="entities per feature server read")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(
            settings_cls, toml_file=os.environ.get("FEATURESTREAM_CONFIG", "featurestream.toml")
        )
        return init_settings, env_settings, toml

    def resolved_registry_url(self) -> str:
        return self.registry_url or f"sqlite:///{(self.state_dir / 'registry.db').resolve()}"

    def resolved_delta_uri(self) -> str:
        return self.delta_uri or str((self.state_dir / "delta").resolve())
