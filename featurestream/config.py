"""Runtime settings, read at the edge only: environment (prefix ``FEATURESTREAM_``), then a
``featurestream.toml`` in the working directory (or the file ``FEATURESTREAM_CONFIG`` names).

Library classes never read the environment; the CLI and the pipeline entry points build a
:class:`Settings` and pass it down.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError

from engine.errors import FeaturestreamError
from engine.redact import redact_text

PREFIX = "FEATURESTREAM_"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class ConfigError(FeaturestreamError, ValueError):
    """A setting is invalid; the message names the variable or file key, its source and the fix."""


def config_file() -> Path:
    """The settings file: ``FEATURESTREAM_CONFIG``, else ``featurestream.toml`` here."""
    return Path(os.environ.get("FEATURESTREAM_CONFIG", "featurestream.toml"))


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

    def __init__(self, **values: Any) -> None:
        """Read the settings; an invalid one raises :class:`ConfigError` (one line per problem)."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, values)) from None
        except SettingsError as exc:  # a JSON setting (dict) that does not parse
            field = str(exc).split('"')[1] if '"' in str(exc) else "?"
            where, _ = _source(field, values)
            raise ConfigError(
                f'{where}: not a JSON object; write it as JSON, e.g. {{}} or {{"key": "value"}}'
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file()}: not valid TOML ({exc}); fix the file or remove it") from None

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(_REDIS_SCHEMES):
            raise ValueError(
                "not a Redis URL; write redis://host:port/db, e.g. redis://localhost:6379/0 "
                "(rediss:// for TLS, unix:///path.sock)"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file())
        return init_settings, env_settings, toml

    def resolved_registry_url(self) -> str:
        return self.registry_url or f"sqlite:///{(self.state_dir / 'registry.db').resolve()}"

    def resolved_delta_uri(self) -> str:
        return self.delta_uri or str((self.state_dir / "delta").resolve())


def _source(field: str, values: dict[str, Any]) -> tuple[str, Any]:
    """Where a setting's value came from (argument, environment variable or settings file)."""
    env = PREFIX + field.upper()
    if field in values:
        return f"setting {field}", values[field]
    if env in os.environ:
        return env, os.environ[env]
    path = config_file()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        data = {}
    if field in data:
        return f"{path}: {field}", data[field]
    return f"setting {field} ({env})", None


def _explain(exc: ValidationError, values: dict[str, Any]) -> str:
    """One line per invalid setting: where it came from, its (redacted) value, what is wrong, the fix."""
    known = sorted(Settings.model_fields)
    lines: list[str] = []
    errors: dict[str, list[Any]] = {}
    for err in exc.errors():
        errors.setdefault(str(err["loc"][0]) if err["loc"] else "?", []).append(err)
    for field, errs in errors.items():
        if errs[0]["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            where = "Settings()" if field in values else str(config_file())
            lines.append(f"{where}: unknown setting {field!r}; {hint}")
            continue
        where, raw = _source(field, values)
        secretive = field in ("kafka_config", "delta_storage_options")  # may hold passwords and keys
        if secretive:
            lines.append(
                f"{where}: not a JSON object of settings; write e.g. "
                '{"security.protocol": "SSL"} (values are strings, numbers or booleans)'
            )
            continue
        err = errs[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        info = Settings.model_fields.get(field)
        default = None if info is None or info.default is PydanticUndefined else info.default
        kind = {"int": "a whole number", "float": "a number", "bool": "true or false"}.get(
            str(err["type"]).split("_")[0]
        )
        if kind:
            example = f", e.g. {str(default).lower()}" if default not in (None, "") else ""
            msg = f"not {kind}; set {kind}{example}" if kind != "true or false" else "set true or false"
        shown = "" if raw is None else f" = {redact_text(str(raw))!r}"
        lines.append(f"{where}{shown}: {msg}")
    return "invalid settings:\n  " + "\n  ".join(lines) if len(lines) > 1 else lines[0]
