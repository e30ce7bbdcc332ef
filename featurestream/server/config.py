"""The feature server's own settings (the CLI builds them from flags and FEATURESTREAM_SERVE_*)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.definitions import FeatureView

__all__ = ["ServerConfig", "ServerDeps"]


class ServerConfig(BaseModel):
    """Limits and intervals of one server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    auth: bool = Field(default=True, description="require API keys; off only for local development")
    max_entities: int = Field(default=1000, ge=1, description="entities per online read")
    max_push_events: int = Field(default=10_000, ge=1, description="events per POST /push request")
    max_body_bytes: int = Field(default=8 << 20, ge=1024, description="largest request body")
    refresh_seconds: float = Field(
        default=5.0, gt=0, description="how often keys and registered versions are re-read"
    )
    redis_timeout_seconds: float = Field(default=1.0, gt=0, description="Redis connect and read timeout")
    audit_flush_seconds: float = Field(default=0.5, gt=0, description="how often the audit queue is written")
    audit_max_pending: int = Field(
        default=100_000, ge=1, description="queued audit records beyond which requests get 503"
    )
    read_cache_mib: float = Field(
        default=64, ge=0, description="memory for computed values of unchanged entities; 0 disables"
    )
    push_flush_seconds: float = Field(
        default=10.0, gt=0, description="how long a push waits for the broker's acknowledgement"
    )


@dataclass(frozen=True)
class ServerDeps:
    """What the server reads and writes: resolved endpoints, never read from the environment here."""

    views: list[FeatureView]
    redis_url: str
    redis_prefix: str = "fs"
    registry_url: str | None = None
    kafka_bootstrap_servers: str | None = None
    kafka_config: dict[str, Any] = field(default_factory=dict)
    config: ServerConfig = field(default_factory=ServerConfig)
