"""API keys and the access audit in the registry (SQLite and PostgreSQL), and `featurestream keys`."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from registry.core import Registry, RegistryError
from registry.keys import (
    AccessRecord,
    access_audit_log,
    create_key,
    get_key,
    list_keys,
    parse_key,
    record_access,
    revoke_key,
)
from registry.schema import api_keys
from tests.registry_fixtures import *  # noqa: F403

CLI = [sys.executable, "-m", "featurestream.cli"]


def test_a_key_is_shown_once_and_stored_only_as_a_hash(registry: Registry) -> None:
    key, secret = create_key(registry, "fraud-scoring", read=["user_spend", "user_spend"], produce=["tx"])
    assert re.fullmatch(r"fsk_[a-z2-9]{12}_[A-Za-z0-9_-]{43}", secret)
    assert parse_key(secret) == (key.id, secret.split("_", 2)[2])
    assert key.read == ("user_spend",) and key.produce == ("tx",) and key.status() == "active"
    with registry.read() as conn:
        row = conn.execute(select(api_keys)).one()._mapping
    stored = " ".join(str(v) for v in row.values())
    assert secret not in stored and secret.split("_", 2)[2] not in stored
    assert len(row["secret_sha256"]) == 64
    listed = list_keys(registry)
    assert [k.id for k in listed] == [key.id]
    assert listed[0].matches(secret.split("_", 2)[2])
    assert not listed[0].matches("A" * 43)
    other, other_secret = create_key(registry, "second", read=["*"])
    assert other.id != key.id and other_secret != secret
    assert other.may("read", "anything") and not other.may("produce", "tx")
    assert key.may("read", "user_spend") and not key.may("read", "user_spend2")


def test_revoke_and_expiry(registry: Registry) -> None:
    key, _ = create_key(registry, "svc", read=["v"], expires_in=timedelta(hours=1))
    assert key.expires_at is not None and key.status(key.expires_at + timedelta(seconds=1)) == "expired"
    revoked = revoke_key(registry, key.id)
    assert revoked.status() == "revoked" and revoked.revoked_at is not None
    assert revoke_key(registry, key.id).revoked_at == revoked.revoked_at  # idempotent
    assert list_keys(registry, include_revoked=False) == []
    assert get_key(registry, key.id).revoked_at == revoked.revoked_at
    with pytest.raises(RegistryError, match="keys list"):
        revoke_key(registry, "nosuchkey234")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "at least one scope"),
        ({"read": ["bad name!"]}, "is not a name"),
        ({"read": ["v"], "expires_at": datetime(2030, 1, 1)}, "no time zone"),
        ({"read": ["v"], "expires_at": datetime(2000, 1, 1, tzinfo=UTC)}, "in the past"),
        ({"read": ["v"], "expires_in": timedelta(seconds=-1)}, "must be positive"),
    ],
)
def test_invalid_keys_are_refused_with_the_fix(registry: Registry, kwargs: dict, match: str) -> None:
    with pytest.raises(RegistryError, match=match):
        create_key(registry, "x", **kwargs)
    assert list_keys(registry) == []


def test_audit_is_recorded_and_queried(registry: Registry) -> None:
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    records = [
        AccessRecord(t0, "aaaaaaaaaaaa", "read", ("spend",), True, "ok", "10.0.0.1"),
        AccessRecord(t0 + timedelta(minutes=1), "aaaaaaaaaaaa", "read", ("clicks",), False, "out_of_scope"),
        AccessRecord(t0 + timedelta(minutes=2), None, "produce", ("tx",), False, "missing_key"),
        AccessRecord(t0 + timedelta(minutes=3), "bbbbbbbbbbbb", "read", ("spend", "clicks"), True, "ok"),
    ]
    record_access(registry, records)
    everything = access_audit_log(registry)
    assert everything == records[::-1]  # newest first, every field round-trips
    assert access_audit_log(registry, key_id="aaaaaaaaaaaa") == records[1::-1]
    assert access_audit_log(registry, allowed=False) == [records[2], records[1]]
    assert access_audit_log(registry, resource="clicks") == [records[3], records[1]]
    assert access_audit_log(registry, since=t0 + timedelta(minutes=2)) == [records[3], records[2]]
    assert access_audit_log(registry, until=t0 + timedelta(minutes=1)) == [records[0]]
    assert access_audit_log(registry, limit=1) == [records[3]]
    record_access(registry, [AccessRecord(t0, None, "read", ("axb",), False, "missing_key", count=7)])
    assert access_audit_log(registry, resource="a_b") == []  # a name, not a LIKE pattern
    assert access_audit_log(registry, resource="axb")[0].count == 7


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)


def test_keys_cli_create_list_revoke_audit(tmp_path: Path) -> None:
    import os

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    env = {**os.environ, "FEATURESTREAM_REGISTRY_URL": url, "COLUMNS": "200"}
    made = _cli(env, "keys", "create", "scoring", "--read", "spend", "--produce", "tx", "--expires", "30d")
    assert made.returncode == 0, made.stderr
    secret = re.search(r"^fsk_\S+$", made.stdout, re.MULTILINE)
    assert secret is not None, made.stdout
    key_id = secret[0].split("_")[1]
    assert "shown only now" in made.stdout
    listed = _cli(env, "keys", "list")
    assert listed.returncode == 0 and key_id in listed.stdout and "active" in listed.stdout
    assert secret[0] not in listed.stdout and secret[0].split("_", 2)[2] not in listed.stdout
    reg = Registry(url)
    expires = get_key(reg, key_id).expires_at
    assert expires is not None and timedelta(days=29) < expires - datetime.now(UTC) < timedelta(days=31)
    record_access(reg, [AccessRecord(datetime.now(UTC), key_id, "read", ("spend",), False, "out_of_scope")])
    reg.close()
    audit = _cli(env, "keys", "audit", "--key", key_id, "--denied")
    assert audit.returncode == 0 and "out_of_scope" in audit.stdout and key_id in audit.stdout
    assert "no access decisions" in _cli(env, "keys", "audit", "--key", "zzzzzzzzzzzz").stdout
    revoked = _cli(env, "keys", "revoke", key_id)
    assert revoked.returncode == 0 and f"revoked API key {key_id}" in revoked.stdout
    assert key_id not in _cli(env, "keys", "list").stdout
    assert "revoked" in _cli(env, "keys", "list", "--all").stdout
    bad = _cli(env, "keys", "create", "x", "--read", "v", "--expires", "soon")
    assert bad.returncode == 2 and "neither a duration" in bad.stdout
    none = _cli(env, "keys", "create", "x")
    assert none.returncode == 2 and "at least one scope" in none.stdout
