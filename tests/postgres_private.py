"""A private PostgreSQL server for tests that need logical replication.

The machine's shared instance has ``wal_level=replica``; logical decoding needs ``logical``, which
only a restart can set. So this starts a throwaway server: ``initdb`` in a temp dir, trust auth,
``wal_level=logical``, a free port on 127.0.0.1, stopped (and its dir removed) at the end of the
session. Missing PostgreSQL binaries fail the test loudly. As root, the server runs as the
``postgres`` user (PostgreSQL refuses to run as root).

Use it with ``from tests.postgres_private import private_postgres`` in a test module (or a
conftest), which makes the session-scoped fixture available there.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

__all__ = ["PrivatePostgres", "private_postgres", "start_private_postgres"]


@dataclass(frozen=True)
class PrivatePostgres:
    host: str
    port: int
    user: str
    dbname: str
    data_dir: Path

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=True)


def _bin_dir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin nor on "
        "PATH: install the postgresql package (apt-get install postgresql)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user() -> tuple[list[str], str]:
    """Command prefix to run the server binaries, and the database superuser's name."""
    if os.geteuid() != 0:
        return [], pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("running as root needs a 'postgres' OS user to run PostgreSQL") from None
    return ["runuser", "-u", "postgres", "--"], "postgres"


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")


def start_private_postgres(root: Path) -> PrivatePostgres:
    """initdb + pg_ctl start in ``root``; call :func:`stop_private_postgres` to stop it."""
    bins = _bin_dir()
    prefix, user = _as_user()
    data = root / "data"
    if prefix:
        shutil.chown(root, "postgres", "postgres")
    _run([*prefix, str(bins / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8",
          "--no-sync"])  # fmt: skip
    port = _free_port()
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(
            f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
            "wal_level = logical\nmax_replication_slots = 20\nmax_wal_senders = 20\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nTimeZone = 'UTC'\n"
        )
    _run([*prefix, str(bins / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
          "start"])  # fmt: skip
    pg = PrivatePostgres("127.0.0.1", port, user, "postgres", data)
    deadline = time.monotonic() + 30
    while True:
        try:
            with pg.connect() as conn:
                conn.execute("SELECT 1")
            return pg
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stop_private_postgres(pg: PrivatePostgres) -> None:
    prefix, _ = _as_user()
    subprocess.run(
        [*prefix, str(_bin_dir() / "pg_ctl"), "-D", str(pg.data_dir), "-m", "immediate", "stop"],
        capture_output=True,
        check=False,
    )


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL with ``wal_level=logical`` for the whole test session."""
    root = Path(tempfile.mkdtemp(prefix="fs-pg-"))
    pg = start_private_postgres(root)
    try:
        yield pg
    finally:
        stop_private_postgres(pg)
        shutil.rmtree(root, ignore_errors=True)
