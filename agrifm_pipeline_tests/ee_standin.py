"""A stand-in for the Earth Engine REST API on 127.0.0.1, for the real ``earthengine-api`` client.

It serves what the client asks for while initialising (the discovery
document and the algorithm list, both shipped in the client's wheel) and
answers ``value:compute`` and ``image:computePixels``. Every request body is
kept for assertions. Pixels are synthesised deterministically from the band
name and the pixel's map coordinates (see :func:`expected_value`), so a test
can check that a reassembled stack is exact. Failures (429, 503, 400) can be
queued for the next requests.
"""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ee
import numpy as np

EE_TESTS = Path(ee.__file__).parent / "tests"


def expected_value(band: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The value the stand-in returns for ``band`` at map coordinates (x, y) of pixel centres."""
    if band.endswith("_count"):
        frame = band.split("_")[0]
        base = 0 if frame == "f7" else 2  # frame 7 has no clear observation: count 0
        return np.full(np.broadcast(x, y).shape, base, dtype=np.uint16)
    h = sum(ord(ch) * (i + 1) for i, ch in enumerate(band)) % 1000
    return (
        (np.floor(x / 10).astype(np.int64) * 7 + np.floor(y / 10).astype(np.int64) * 13 + h) % 9000
        + 100
    ).astype(np.uint16)


@dataclass
class StandIn:
    url: str
    project: str
    requests: list[tuple[str, str, dict[str, Any]]] = field(
        default_factory=list
    )  # (method, path, body)
    failures: list[tuple[int, str]] = field(default_factory=list)  # queued (status, message)
    in_flight: int = 0
    in_flight_max: int = 0
    delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokens: list[dict[str, str]] = field(default_factory=list)  # OAuth token grants received
    auth_headers: list[str] = field(default_factory=list)  # Authorization of API calls

    def fail_next(self, n: int, status: int, message: str = "") -> None:
        with self.lock:
            self.failures.extend([(status, message or f"HTTP {status}")] * n)

    def bodies(self, suffix: str) -> list[dict[str, Any]]:
        return [b for m, p, b in self.requests if m == "POST" and p.split("?")[0].endswith(suffix)]


def _discovery(base: str) -> bytes:
    doc = json.loads((EE_TESTS / "cloud_api_discovery_document.json").read_text())
    doc["rootUrl"] = doc["baseUrl"] = base + "/"
    return json.dumps(doc).encode()


def _npy(bands: list[str], grid: dict[str, Any]) -> bytes:
    width, height = grid["dimensions"]["width"], grid["dimensions"]["height"]
    t = grid["affineTransform"]
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x = t["translateX"] + cols * t["scaleX"] + rows * t.get("shearX", 0.0)
    y = t["translateY"] + cols * t.get("shearY", 0.0) + rows * t["scaleY"]
    arr = np.zeros((height, width), dtype=[(b, "<u2") for b in bands])
    for b in bands:
        arr[b] = expected_value(b, x, y)
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _compute_value(body: dict[str, Any]) -> Any:
    """Answer the scene-count query: one count per window plus the whole range."""
    text = json.dumps(body)
    windows = len(re.findall(r'"functionName": "Collection.size"', text))
    return [3] * max(1, windows - 1) + [20] if windows > 1 else 3


@contextmanager
def ee_standin(project: str = "test-project") -> Iterator[StandIn]:
    algorithms = (EE_TESTS / "algorithms.json").read_bytes()
    state: dict[str, StandIn] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            names = {
                429: "RESOURCE_EXHAUSTED",
                503: "UNAVAILABLE",
                400: "INVALID_ARGUMENT",
                500: "INTERNAL",
            }
            body = {
                "error": {
                    "code": status,
                    "message": message,
                    "status": names.get(status, "UNKNOWN"),
                }
            }
            self._send(status, json.dumps(body).encode())

        def do_GET(self) -> None:
            s = state["s"]
            s.requests.append(("GET", self.path, {}))
            if self.path.startswith("/$discovery/rest"):
                self._send(200, _discovery(s.url))
            elif "/algorithms" in self.path:
                self._send(200, algorithms)
            else:
                self._error(404, f"no such path {self.path}")

        def do_POST(self) -> None:
            s = state["s"]
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            if self.path == "/token":  # OAuth 2 token endpoint (service-account JWT grant)
                from urllib.parse import parse_qs

                form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                s.tokens.append(form)
                grant = {"access_token": f"standin-token-{len(s.tokens)}", "expires_in": 3600,
                         "token_type": "Bearer"}  # fmt: skip
                self._send(200, json.dumps(grant).encode())
                return
            s.auth_headers.append(self.headers.get("Authorization", ""))
            body = json.loads(raw or b"{}")
            with s.lock:
                s.requests.append(("POST", self.path, body))
                failure = s.failures.pop(0) if s.failures else None
                s.in_flight += 1
                s.in_flight_max = max(s.in_flight_max, s.in_flight)
            try:
                if s.delay_s:
                    import time

                    time.sleep(s.delay_s)
                if failure is not None:
                    self._error(*failure)
                elif self.path.split("?")[0].endswith("image:computePixels"):
                    self._send(200, _npy(body["bandIds"], body["grid"]), "application/octet-stream")
                elif self.path.split("?")[0].endswith("value:compute"):
                    self._send(200, json.dumps({"result": _compute_value(body)}).encode())
                else:
                    self._error(404, f"no such path {self.path}")
            finally:
                with s.lock:
                    s.in_flight -= 1

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["s"] = StandIn(f"http://127.0.0.1:{server.server_address[1]}", project)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["s"]
    finally:
        server.shutdown()
        server.server_close()
