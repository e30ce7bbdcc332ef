"""Registry tables and their migrations (SQLAlchemy Core; SQLite and PostgreSQL).

A migration is a list of statements applied once, in order, in one transaction, under a lock
(see :mod:`registry.core`). Never edit a released migration: add the next one.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

schema_migrations = Table(
    "fs_schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

# One row per immutable feature view version. ``version_hash`` is FeatureView.version (content
# hash of the canonical definition); ``seq`` is its readable number per view (1, 2, ...).
view_versions = Table(
    "fs_view_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("version_hash", String(64), nullable=False),
    Column("definition", JSON, nullable=False),  # FeatureView.model_dump(mode="json")
    Column("source_topic", String(255), nullable=False),
    Column("status", String(16), nullable=False),  # active | deprecated | retired
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("deprecated_at", DateTime(timezone=True)),
    Column("retire_after", DateTime(timezone=True)),
    Column("retired_at", DateTime(timezone=True)),
    Column("description", Text, nullable=False, default=""),
    Column("owner", String(255), nullable=False, default=""),
    Column("tags", JSON, nullable=False),
    UniqueConstraint("name", "seq", name="uq_view_seq"),
    UniqueConstraint("name", "version_hash", name="uq_view_hash"),
)

# Every change `apply` recorded (new versions and metadata-only edits), for audit.
view_changes = Table(
    "fs_view_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("view_version_id", Integer, ForeignKey("fs_view_versions.id"), nullable=False),
    Column("kind", String(16), nullable=False),  # new | breaking | additive | metadata
    Column("detail", JSON, nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

# A training set as built: which view versions, which Delta table versions, which entities.
training_sets = Table(
    "fs_training_sets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False, default=""),
    Column("features", JSON, nullable=False),  # ["view:feature", ...]
    Column("view_version_ids", JSON, nullable=False),  # [id, ...]
    Column("delta_versions", JSON, nullable=False),  # {table_uri: delta version}
    Column("entity_uri", Text, nullable=False),  # where the entity set snapshot is stored
    Column("entity_sha256", String(64), nullable=False),
    Column("entity_rows", BigInteger, nullable=False),
    Column("timestamp_column", String(255), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

models = Table(
    "fs_models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False),
    Column("version", String(64), nullable=False),
    Column("training_set_id", Integer, ForeignKey("fs_training_sets.id"), nullable=False),
    Column("parameters", JSON, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("name", "version", name="uq_model_version"),
)

# Baseline distribution of one feature of one view version, captured from a training set.
drift_baselines = Table(
    "fs_drift_baselines",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("view_version_id", Integer, ForeignKey("fs_view_versions.id"), nullable=False),
    Column("feature", String(255), nullable=False),
    Column("training_set_id", Integer, ForeignKey("fs_training_sets.id")),
    Column("stats", JSON, nullable=False),  # n, null_rate, mean, std, quantiles, bin edges, counts
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Live statistics per time bucket and their distance to the baseline.
drift_measurements = Table(
    "fs_drift_measurements",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("view_version_id", Integer, ForeignKey("fs_view_versions.id"), nullable=False),
    Column("feature", String(255), nullable=False),
    Column("bucket_start", DateTime(timezone=True), nullable=False),
    Column("bucket_end", DateTime(timezone=True), nullable=False),
    Column("n", BigInteger, nullable=False),
    Column("null_rate", Float, nullable=False),
    Column("mean", Float),
    Column("std", Float),
    Column("psi", Float),
    Column("ks", Float),
    Column("status", String(8), nullable=False),  # ok | warn | alert
    Column("stats", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("view_version_id", "feature", "bucket_start", name="uq_drift_bucket"),
)

# API keys of the feature server. Only the SHA-256 of each key's secret is stored; the key itself
# is shown once, at creation. Scopes: feature view names it may read, source names it may push to.
api_keys = Table(
    "fs_api_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # public id, also the key's readable prefix
    Column("name", String(255), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("read_scopes", JSON, nullable=False),  # ["view", ...] or ["*"]
    Column("produce_scopes", JSON, nullable=False),  # ["source", ...] or ["*"]
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
)

# Access decisions of the feature server (allowed or denied). Identical decisions (same key,
# action, resources, outcome, reason and client) within one flush interval of the server share
# a row: ``count`` of them, the first at ``at``, the last at ``last_at``.
access_audit = Table(
    "fs_access_audit",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("last_at", DateTime(timezone=True), nullable=False),
    Column("count", BigInteger, nullable=False, default=1),
    Column("key_id", String(32)),  # NULL: no key, or not one of ours
    Column("action", String(16), nullable=False),  # read | produce
    Column("resources", JSON, nullable=False),  # view or source names
    Column("resource_list", Text, nullable=False),  # the same as ",a,b,", to filter on portably
    Column("allowed", Boolean, nullable=False),
    Column("reason", String(32), nullable=False),  # ok | missing_key | unknown_key | revoked | ...
    Column("client", String(64), nullable=False, default=""),
    Index("ix_access_audit_at", "at"),
    Index("ix_access_audit_key_at", "key_id", "at"),
)

# version -> tables created by that migration (in dependency order). Later migrations may add
# raw DDL statements as strings instead.
MIGRATIONS: dict[int, list[Table | str]] = {
    1: [view_versions, view_changes, training_sets, models, drift_baselines, drift_measurements],
}
# 2: a metadata-only apply (description, owner, tags, ttl, drift thresholds) keeps the version and
# its immutable ``definition``; the definition with those edits goes here (NULL until the first).
MIGRATIONS[2] = ["ALTER TABLE fs_view_versions ADD COLUMN edited_definition JSON"]
# 3: API keys and the access audit of the feature server.
MIGRATIONS[3] = [api_keys, access_audit]
LATEST = max(MIGRATIONS)
