"""Shared test fixtures: where the reference data lives, and a local HTTP server."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agrifm_pipeline_tests.fixtures.reference import FIXTURES

# Stores under test (local, memory, S3 on a moto server), and the STAC archive test bed
# (started only by the tests that ask for it): fixtures for every module, one per session.
pytest_plugins = ["agrifm_pipeline_tests.object_store", "agrifm_pipeline_tests.stac_testbed"]

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The official AgriFM reference fixtures, kept in the repository (see its README.md)."""
    return FIXTURES


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled real Sentinel-2 sample (a copy of the shared one, shipped with the product)."""
    return REPO_ROOT / "data" / "s2_sample"


@dataclass
class Route:
    """What the server answers on one path: status, headers, body; ``truncate`` cuts the body short."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    truncate: int | None = None


@dataclass
class LocalServer:
    url: str
    routes: dict[str, Route]
    hits: list[str]

    def add(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url + path


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    """A real HTTP server on 127.0.0.1 serving the routes a test registers."""
    routes: dict[str, Route] = {}
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            route = routes.get(self.path)
            if route is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(route.status)
            headers = {"Content-Type": "application/octet-stream", **route.headers}
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            body = route.body if route.truncate is None else route.body[: route.truncate]
            self.wfile.write(body)
            self.wfile.flush()
            if route.truncate is not None:
                self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield LocalServer(f"http://127.0.0.1:{server.server_address[1]}", routes, hits)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_partial_files() -> Callable[[Path], None]:
    def check(directory: Path) -> None:
        leftovers = (
            [p.name for p in directory.iterdir() if ".part" in p.name] if directory.exists() else []
        )
        assert not leftovers, f"partial downloads left behind: {leftovers}"

    return check
