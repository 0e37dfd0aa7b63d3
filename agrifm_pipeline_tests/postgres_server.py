"""A real PostgreSQL for the tests marked ``postgres``: never skipped.

The server on 127.0.0.1:5432 (trust authentication, as this project's machines and CI
have it) where it answers; otherwise one started here from the PostgreSQL binaries on
the machine (``initdb``/``pg_ctl`` on PATH or under /usr/lib/postgresql), or from the
``pgserver`` package when it is installed. With none of these the tests fail and say
what to install. Each test session gets a database of its own, dropped at the end.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST, PORT = "127.0.0.1", 5432
ADMIN_DATABASES = ("postgres", "test", "root")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _admin_url(host: str, port: int) -> str | None:
    """A URL of a database on the server we can connect to and create databases from."""
    import psycopg2

    for user in ("postgres", os.environ.get("USER") or "root"):
        for db in ADMIN_DATABASES:
            try:
                psycopg2.connect(host=host, port=port, user=user, dbname=db).close()
            except psycopg2.OperationalError:
                continue
            return f"postgresql+psycopg2://{user}@{host}:{port}/{db}"
    return None


def _execute(admin_url: str, sql: str) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(admin_url)
    conn = psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def _binaries() -> tuple[str, str] | None:
    found = shutil.which("initdb"), shutil.which("pg_ctl")
    if all(found):
        return found  # type: ignore[return-value]
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        initdb, pg_ctl = Path(bindir, "initdb"), Path(bindir, "pg_ctl")
        if initdb.exists() and pg_ctl.exists():
            return str(initdb), str(pg_ctl)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class _OwnServer:
    """A throw-away cluster from the machine's initdb/pg_ctl (as user postgres under root)."""

    def __init__(self, initdb: str, pg_ctl: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="agrifm-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.pg_ctl = pg_ctl
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self.prefix = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")
        subprocess.run(
            [*self.prefix, initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
        )
        opts = f"-h {HOST} -p {self.port} -k {self.dir}"
        subprocess.run(
            [*self.prefix, pg_ctl, "-D", str(self.data), "-o", opts, "-w", "start",
             "-l", str(self.dir / "log")],
            check=True,
            capture_output=True,
        )  # fmt: skip

    def stop(self) -> None:
        subprocess.run(
            [*self.prefix, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(self.dir, ignore_errors=True)


def fresh_database() -> Iterator[str]:
    """``postgresql+psycopg2://…`` of a fresh database, dropped afterwards. Test modules
    make it a session fixture: ``postgres_url = pytest.fixture(scope="session")(fresh_database)``."""
    stop = None
    admin = _admin_url(HOST, PORT) if _answers(HOST, PORT) else None
    if admin is None:
        bins = _binaries()
        if bins is not None:
            own = _OwnServer(*bins)
            stop = own.stop
            admin = f"postgresql+psycopg2://postgres@{HOST}:{own.port}/postgres"
        else:
            try:
                import pgserver  # type: ignore[import-not-found]
            except ImportError:
                pytest.fail(
                    "the postgres tests need a PostgreSQL: none answers on 127.0.0.1:5432 "
                    "(trust auth), no initdb/pg_ctl is installed, and pgserver is not; "
                    "start one, `apt-get install postgresql`, or `pip install pgserver`"
                )
            srv = pgserver.get_server(
                tempfile.mkdtemp(prefix="agrifm-pgserver-"), cleanup_mode="stop"
            )
            stop = srv.cleanup
            admin = srv.get_uri().replace("postgresql://", "postgresql+psycopg2://", 1)
    name = f"agrifm_test_{uuid.uuid4().hex[:12]}"
    _execute(admin, f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        try:
            _execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            if stop is not None:
                stop()
