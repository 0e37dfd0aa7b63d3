"""Stores the storage guarantees are proven on: local directories, fsspec memory, and S3
through s3fs against a moto server started on 127.0.0.1 (the real S3 protocol, no network).

conftest.py loads this module as a plugin, so its fixtures serve every test module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agrifm_pipeline.storage import FileStore, ZarrStore

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]

    def options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint},
        }

    def bucket(self) -> str:
        import s3fs

        name = f"agrifm-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(**self.options())
        fs.mkdir(name)
        return name


def start_s3_server(timeout_s: float = 60) -> S3Server:
    """A moto S3 server in its own process on 127.0.0.1 (``pip install 'moto[server]'``),
    answering; raises RuntimeError when it does not (the caller kills ``proc``)."""
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return S3Server(f"http://127.0.0.1:{port}", proc)
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the moto S3 server exited at start") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the moto S3 server did not answer within {timeout_s:.0f} s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server for the session (see :func:`start_s3_server`)."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as exc:  # the dev extra installs both
        pytest.fail(f"the S3 store tests need moto[server] and s3fs (the dev extra): {exc}")
    try:
        server = start_s3_server()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.proc.kill()
        server.proc.wait()


@dataclass
class StoreKind:
    """One kind of store under test: how to build its stores in this and other processes."""

    name: str
    root: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    commit_lock: bool = True

    def _options(self, **kw: Any) -> dict[str, Any]:
        return {"storage_options": self.storage_options, "commit_lock": self.commit_lock, **kw}

    def zarr(self, asset: str = "grid", **kw: Any) -> ZarrStore:
        return ZarrStore(self.root, asset, **self._options(**kw))

    def files(self, asset: str = "chips", **kw: Any) -> FileStore:
        return FileStore(self.root, asset, **self._options(**kw))

    def spec(self) -> str:
        """JSON a child process rebuilds the store from (see :func:`child_script`)."""
        return json.dumps(
            {
                "root": self.root,
                "storage_options": self.storage_options,
                "commit_lock": self.commit_lock,
            }
        )


STORE_KINDS = ["local", "local-nolock", "memory", "s3"]
PROCESS_STORE_KINDS = ["local", "local-nolock", "s3"]  # shared between processes


def _make_kind(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> StoreKind:
    if kind == "local":
        return StoreKind(kind, str(tmp_path / "store"))
    if kind == "local-nolock":
        return StoreKind(kind, str(tmp_path / "store"), commit_lock=False)
    if kind == "memory":
        return StoreKind(kind, f"memory://agrifm-{uuid.uuid4().hex[:12]}")
    server: S3Server = request.getfixturevalue("s3_server")
    return StoreKind(kind, f"s3://{server.bucket()}/root", server.options())


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest, tmp_path: Path) -> StoreKind:
    """Every store the guarantees hold on: a local directory (commits serialised with a
    POSIX lock, and with the lock forced off as on a file system without locks), fsspec
    memory, and S3 (moto)."""
    return _make_kind(request.param, request, tmp_path)


@pytest.fixture(params=PROCESS_STORE_KINDS)
def process_store_kind(request: pytest.FixtureRequest, tmp_path: Path) -> StoreKind:
    """The stores several processes share (writers killed with SIGKILL, concurrent writers)."""
    return _make_kind(request.param, request, tmp_path)


def child_script(kind: StoreKind, body: str) -> list[str]:
    """A command running ``body`` in a fresh interpreter with ``spec`` = the store kind."""
    prelude = (
        "import json, os, sys, time\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        f"spec = json.loads({kind.spec()!r})\n"
        "from agrifm_pipeline import storage\n"
        "def zarr(asset='grid', **kw):\n"
        "    return storage.ZarrStore(spec['root'], asset, storage_options=spec['storage_options'],"
        " commit_lock=spec['commit_lock'], **kw)\n"
    )
    return [sys.executable, "-c", prelude + body]


def run_until(cmd: list[str], marker: str, *, timeout: float = 120) -> subprocess.Popen[str]:
    """Start ``cmd`` and return once it prints ``marker`` (it is then killed by the caller)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise AssertionError(f"child exited with {proc.returncode} before printing {marker}")
        if line.strip() == marker:
            return proc
    proc.kill()
    raise AssertionError(f"child did not print {marker} within {timeout} s")
