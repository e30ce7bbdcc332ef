"""Secrets never leave the process: URL passwords and secret settings are masked in any text."""

from __future__ import annotations

import socket

import pytest

from engine.observe import DEFAULT_HOST, serve, stop
from engine.redact import describe, is_secret_key, redact, redact_config, redact_text, redact_url
from featurestream.config import Settings

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"redis://user:{SECRET}@cache:6379/0", "redis://user:***@cache:6379/0"),
        (f"redis://:{SECRET}@127.0.0.1:6379/0 failed", "redis://:***@127.0.0.1:6379/0 failed"),
        (f"rediss://default:{SECRET}@h:6380", "rediss://default:***@h:6380"),
        (f"redis://{SECRET}@h:6379", "redis://***@h:6379"),  # Redis reads a lone user as password
        (f"postgresql://fs:{SECRET}@db:5432/registry", "postgresql://fs:***@db:5432/registry"),
        (f"postgresql+psycopg://fs:{SECRET}@db/r", "postgresql+psycopg://fs:***@db/r"),
        (f"redis://u:p@{SECRET}@h/0", "redis://u:***@h/0"),  # "@" inside the password
        (f"s3://AKIA:{SECRET}@bucket/path", "s3://AKIA:***@bucket/path"),
        (f"redis://h:6379/0?password={SECRET}&db=1", "redis://h:6379/0?password=***&db=1"),
        (f"sasl.password={SECRET} sasl.username=bob", "sasl.password=*** sasl.username=bob"),
        (f"{{'ssl.key.password': '{SECRET}'}}", "{'ssl.key.password': '***'}"),
        (f"aws_secret_access_key: {SECRET}", "aws_secret_access_key: ***"),
        ("redis://cache:6379/0 and postgresql://db/r", "redis://cache:6379/0 and postgresql://db/r"),
        ("Error 111 connecting to 127.0.0.1:6379. Connection refused.", None),
        ("monkey=1 ssl.key.location=/etc/k.pem at 12:30:00", None),
    ],
)
def test_redact_text(text: str, expected: str | None) -> None:
    assert redact_text(text) == (text if expected is None else expected)


def test_redact_url_leaves_other_text() -> None:
    assert redact_url(f"connect redis://:{SECRET}@h:1/0 password={SECRET}") == (
        f"connect redis://:***@h:1/0 password={SECRET}"
    )


def test_redact_config_masks_secret_settings_and_urls() -> None:
    conf = {
        "bootstrap.servers": "k:9092",
        "sasl.username": "bob",
        "sasl.password": SECRET,
        "ssl.key.password": SECRET,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "azure_storage_account_key": SECRET,
        "sas_token": SECRET,
        "url": f"redis://:{SECRET}@h/0",
    }
    assert redact_config(conf) == {
        "bootstrap.servers": "k:9092",
        "sasl.username": "bob",
        "sasl.password": "***",
        "ssl.key.password": "***",
        "AWS_SECRET_ACCESS_KEY": "***",
        "azure_storage_account_key": "***",
        "sas_token": "***",
        "url": "redis://:***@h/0",
    }
    assert redact(conf) == redact_config(conf)
    assert redact_text(f"broker rejected {SECRET}", {"sasl.password": SECRET}) == "broker rejected ***"
    assert is_secret_key("ssl.key.password") and not is_secret_key("ssl.key.location")


def test_describe_redacts_the_message_the_causes_and_the_traceback() -> None:
    try:
        try:
            raise ConnectionError(f"cannot reach redis://:{SECRET}@h:1/0")
        except ConnectionError as exc:
            raise RuntimeError("write failed") from exc
    except RuntimeError as exc:
        assert describe(exc) == "RuntimeError: write failed"
        chain = describe(exc, chain=True)
        assert (
            chain == "ConnectionError: cannot reach redis://:***@h:1/0; raised as RuntimeError: write failed"
        )
        trace = describe(exc, trace=True)
        assert "Traceback" in trace and "redis://:***@h:1/0" in trace and SECRET not in trace


def test_metrics_listen_on_loopback_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().metrics_host == DEFAULT_HOST == "127.0.0.1"
    monkeypatch.setenv("FEATURESTREAM_METRICS_HOST", "0.0.0.0")
    assert Settings().metrics_host == "0.0.0.0"
    server = serve(0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        stop(server)
    server = serve(0, host="0.0.0.0")
    try:
        assert server.server_address[0] == "0.0.0.0"
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=2):
            pass
    finally:
        stop(server)
