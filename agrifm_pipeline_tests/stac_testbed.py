"""An offline Sentinel-2 archive behind a real STAC API, for the ``stac`` provider's tests
and benchmarks. Everything listens on 127.0.0.1 only.

- **STAC API**: stac-fastapi-pgstac (uvicorn, in its own process) on a fresh database of
  the machine's PostgreSQL (:mod:`agrifm_pipeline_tests.postgres_server`), migrated by
  pypgstac; PostGIS is installed when the server lacks it (``apt-get install
  postgresql-<version>-postgis-3``, as root), otherwise the setup fails saying so.
  :func:`start_stac_api`, :class:`StacApi` (``load``: upsert collections and items).
- **Object store**: moto's S3 server (:func:`agrifm_pipeline_tests.object_store.start_s3_server`)
  holding per-band COGs written by rasterio's COG driver with a configurable block size
  and overviews (:class:`CogOptions`, :func:`write_cog`, :func:`put_objects`).
- **Front** (:class:`FaultFront`): one HTTP server in front of both, which forwards
  ``/s3/<bucket>/<key>`` to moto, ``/<account>/<container>/<blob>`` to moto too but only
  with a valid SAS token (Azure's path style, as Azurite serves it), answers
  ``/sas/token/<account>/<container>`` as the Planetary Computer's token service, and
  everything else to the STAC API. It injects faults (:class:`Fault`: an HTTP status
  with a body, a dropped connection, a body cut short, a slow first byte), adds a
  latency to every answer when asked, counts every request and byte, and rewrites
  :data:`ARCHIVE_ORIGIN` in the API's answers to its own address: item hrefs stored in
  the database point at whichever front serves them, so each fault test gets a front
  (and an address) of its own.
- **Archive** (:class:`Archive`): STAC items made from the bundled sample's real scenes
  (:func:`sample_scenes`), with an archive's asset keys, baselines (DN + 1000 from 04.00
  on), datatakes, MGRS tiles and generation times; 20 m bands and SCL at 20 m.

The pieces are functions so that a benchmark can start them with other block sizes
and latencies; the fixtures at the bottom are what the tests use.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.warp import Resampling, calculate_default_transform, reproject, transform_bounds

from agrifm_pipeline.providers.stac_profiles import (
    EARTH_SEARCH_ASSETS,
    NATIVE_20M,
    PLANETARY_COMPUTER_ASSETS,
)

from .object_store import S3Server, start_s3_server
from .postgres_server import fresh_database

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data" / "s2_sample"
#: Stored in item hrefs; every front replaces it with its own address in the API's answers.
ARCHIVE_ORIGIN = "http://s2-archive.invalid"
#: The storage account of the Planetary Computer-style blobs (Azurite's default name).
BLOB_ACCOUNT = "devstoreaccount1"
BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    import requests

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited at start: {log.read_text()[-2000:]}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s: {log.read_text()[-2000:]}")


# -- PostgreSQL with PostGIS, pgstac, the API ----------------------------------------------------


def _connect(database_url: str) -> Any:
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(database_url)
    conn = psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)
    conn.autocommit = True
    return conn


def ensure_postgis(database_url: str) -> None:
    """PostGIS available to the server of ``database_url``: installed with apt-get (as
    root) when missing; a failure says what to install."""
    conn = _connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'")
            if cur.fetchone():
                return
            cur.execute("SHOW server_version_num")
            major = int(cur.fetchone()[0]) // 10000
    finally:
        conn.close()
    package = f"postgresql-{major}-postgis-3"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(
            f"the STAC API tests need PostGIS: install {package} (apt-get install {package})"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", package],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        done = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", package],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"installing {package} failed: {done.stderr[-1500:]}")


def _dsn(database_url: str) -> str:
    from sqlalchemy.engine import make_url

    u = make_url(database_url)
    return f"postgresql://{u.username}@{u.host}:{u.port}/{u.database}"


@dataclass
class StacApi:
    """stac-fastapi-pgstac on a database of its own (``url``: the API itself, not a front)."""

    url: str
    dsn: str
    proc: subprocess.Popen[bytes]
    workdir: Path

    def load(
        self, collections: Sequence[Mapping[str, Any]], items: Sequence[Mapping[str, Any]]
    ) -> None:
        """Upsert ``collections`` and ``items`` (an item of the same id is replaced: a
        reprocessed item)."""
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods

        with PgstacDB(dsn=self.dsn) as db:
            loader = Loader(db=db)
            if collections:
                loader.load_collections(iter([dict(c) for c in collections]), Methods.upsert)
            if items:
                loader.load_items(iter([dict(i) for i in items]), Methods.upsert)

    def delete_items(self, collection: str, ids: Sequence[str]) -> None:
        conn = psycopg_connect(self.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SET search_path TO pgstac, public")
                for iid in ids:
                    cur.execute("SELECT delete_item(%s, %s)", (iid, collection))
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def psycopg_connect(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True)


def start_stac_api(database_url: str, timeout_s: float = 60) -> StacApi:
    """Migrate ``database_url`` with pypgstac and serve it with stac-fastapi-pgstac."""
    try:
        import pypgstac  # noqa: F401
        import stac_fastapi.pgstac  # noqa: F401
    except ImportError as exc:
        pytest.fail(
            f"the STAC API tests need stac-fastapi-pgstac and pypgstac[psycopg] ({exc}); "
            "install the project's dev extra: pip install -e '.[dev]'"
        )
    ensure_postgis(database_url)
    dsn = _dsn(database_url)
    from pypgstac.db import PgstacDB
    from pypgstac.migrate import Migrate

    for attempt in range(3):  # the roles pgstac makes are the cluster's: another session may race
        try:
            with PgstacDB(dsn=dsn) as db:
                Migrate(db).run_migration()
            break
        except Exception:
            if attempt == 2:
                raise
            time.sleep(1 + attempt)
    from sqlalchemy.engine import make_url

    u = make_url(database_url)
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="agrifm-stac-api-"))  # no stray .env is read
    log = workdir / "api.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PG", "POSTGRES"))},
        "PGUSER": u.username or "postgres",
        "PGPASSWORD": "",
        "PGHOST": u.host or "127.0.0.1",
        "PGPORT": str(u.port or 5432),
        "PGDATABASE": u.database or "",
        "ENABLED_EXTENSIONS": "query,sort,fields,filter,pagination,collection_search",
        "DB_MIN_CONN_SIZE": "1",
        "DB_MAX_CONN_SIZE": "4",
        "WEB_CONCURRENCY": "1",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "stac_fastapi.pgstac.app:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    api = StacApi(f"http://127.0.0.1:{port}", dsn, proc, workdir)
    try:
        _wait_http(api.url + "/_mgmt/ping", proc, timeout_s, log)
    except BaseException:
        api.stop()
        raise
    return api


# -- COGs in moto ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CogOptions:
    """How each band file is written: block side, overviews (``auto`` or ``none``), codec."""

    block_size: int = 512
    overviews: str = "auto"
    compress: str = "DEFLATE"
    predictor: int = 2


def write_cog(
    path: Path,
    values: np.ndarray,
    transform: Affine,
    crs: str,
    options: CogOptions = CogOptions(),
) -> Path:
    """One band as a Cloud-Optimized GeoTIFF (rasterio's COG driver), nodata 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = values.shape
    with rasterio.open(
        path, "w", driver="COG", width=w, height=h, count=1, dtype=values.dtype.name,
        crs=crs, transform=transform, nodata=0, blocksize=options.block_size,
        compress=options.compress, predictor=options.predictor,
        overviews="AUTO" if options.overviews == "auto" else "NONE",
        resampling="nearest",
    ) as dst:  # fmt: skip
        dst.write(values, 1)
    return path


def put_objects(s3: S3Server, bucket: str, files: Mapping[str, Path], workers: int = 8) -> None:
    """Upload ``key -> file`` into ``bucket`` (created if needed), readable anonymously."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=s3.endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
        config=Config(max_pool_connections=workers),
    )  # fmt: skip
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)

    def one(entry: tuple[str, Path]) -> None:
        key, path = entry
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), ACL="public-read",
                          ContentType="image/tiff; application=geotiff; profile=cloud-optimized")  # fmt: skip

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, files.items()))


# -- the front ---------------------------------------------------------------------------------


@dataclass
class Fault:
    """A fault the front answers instead of (or before) the real answer, ``times`` times, to
    requests whose path matches ``path`` (a regular expression) and ``method``.

    ``kind``: ``status`` (HTTP ``status`` with ``body``, nothing forwarded), ``drop`` (the
    connection closed without an answer), ``cut`` (the real answer's headers, then half
    its body and the connection closed), ``slow`` (the real answer after ``delay_s``).
    """

    kind: str
    path: str = ".*"
    times: int = 1
    status: int = 503
    body: bytes = b""
    delay_s: float = 2.0
    method: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    injected: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (
            self.injected < self.times
            and (self.method is None or self.method == method)
            and re.search(self.path, path) is not None
        )


THROTTLED_403 = b'{"message":"Forbidden"}'


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms stalls
        return sock, addr


class FaultFront:
    """The front of the test archive (see the module docstring)."""

    def __init__(self, api_url: str, s3_endpoint: str, *, latency_s: float = 0.0) -> None:
        self.api = urlsplit(api_url)
        self.s3 = urlsplit(s3_endpoint)
        self.latency_s = latency_s
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int, int]] = []  # method, path, status, bytes sent
        self.token_lifetime_s = 3600.0
        self.tokens: dict[str, tuple[str, float]] = {}  # sig -> (account/container, expiry)
        self._lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                front._handle(self, "GET")

            def do_HEAD(self) -> None:
                front._handle(self, "HEAD")

            def do_POST(self) -> None:
                front._handle(self, "POST")

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    # -- what the tests ask -------------------------------------------------------------
    def add(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def injected(self) -> dict[str, int]:
        with self._lock:
            return {f"{f.kind} {f.status if f.kind == 'status' else ''}".strip(): f.injected
                    for f in self.faults}  # fmt: skip

    def requests(
        self, pattern: str = ".*", method: str | None = None
    ) -> list[tuple[str, str, int, int]]:
        with self._lock:
            return [
                r for r in self.log
                if re.search(pattern, r[1]) and (method is None or r[0] == method)
            ]  # fmt: skip

    def bytes_sent(self, pattern: str = ".*") -> int:
        return sum(r[3] for r in self.requests(pattern))

    def expire_tokens(self) -> None:
        """Every token issued so far is refused from now on (as an expired one is)."""
        with self._lock:
            self.tokens = {k: (v[0], 0.0) for k, v in self.tokens.items()}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- serving ------------------------------------------------------------------------
    def _fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(method, path):
                    f.injected += 1
                    return f
        return None

    def _record(self, method: str, path: str, status: int, nbytes: int) -> None:
        with self._lock:
            self.log.append((method, path, status, nbytes))

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = h.path
        if self.latency_s:
            time.sleep(self.latency_s)
        fault = self._fault(method, path)
        if fault is not None and fault.kind == "status":
            self._send(h, method, path, fault.status, fault.body,
                       {"Content-Type": "application/json", **fault.headers})  # fmt: skip
            return
        if fault is not None and fault.kind == "drop":
            self._record(method, path, 0, 0)
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.delay_s)
        status, headers, payload = self._answer(h, method, path, body)
        if fault is not None and fault.kind == "cut":
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            with contextlib.suppress(OSError):
                h.wfile.write(payload[: len(payload) // 2])
                h.wfile.flush()
            self._record(method, path, status, len(payload) // 2)
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(h, method, path, status, payload, headers)

    def _send(
        self, h: BaseHTTPRequestHandler, method: str, path: str, status: int, payload: bytes,
        headers: Mapping[str, str],
    ) -> None:  # fmt: skip
        try:
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(payload)
            h.wfile.flush()
        except OSError:  # the client gave up (a slow answer it timed out on)
            h.close_connection = True
        self._record(method, path, status, 0 if method == "HEAD" else len(payload))

    def _answer(
        self, h: BaseHTTPRequestHandler, method: str, path: str, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(path)
        segments = [s for s in parts.path.split("/") if s]
        if segments[:1] == ["sas"]:
            return self._token(segments)
        if segments[:1] == ["s3"]:
            return self._forward(self.s3, method, "/" + "/".join(segments[1:]), h, body)
        if segments[:1] == [BLOB_ACCOUNT]:
            refused = self._check_token(segments, parse_qs(parts.query))
            if refused is not None:
                return refused
            return self._forward(self.s3, method, "/" + "/".join(segments[1:]), h, body)
        status, headers, payload = self._forward(self.api, method, path, h, body)
        if headers.get("Content-Type", "").startswith(("application/json", "application/geo+json")):
            payload = payload.replace(ARCHIVE_ORIGIN.encode(), self.url.encode())
            payload = payload.replace(f"http://{self.api.netloc}".encode(), self.url.encode())
        return status, headers, payload

    def _forward(
        self, upstream: Any, method: str, path: str, h: BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        headers = {k: v for k, v in h.headers.items()
                   if k.lower() not in ("host", "accept-encoding", "connection", "content-length")}  # fmt: skip
        headers["Host"] = self.url.split("://", 1)[1]
        headers["Accept-Encoding"] = "identity"
        if body:
            headers["Content-Length"] = str(len(body))
        try:
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            keep = ("Content-Type", "Content-Range", "Accept-Ranges", "ETag", "Last-Modified")
            given = {k.lower(): v for k, v in resp.getheaders()}
            out = {k: given[k.lower()] for k in keep if k.lower() in given}
            return resp.status, out, payload
        finally:
            conn.close()

    # -- the token service and its check ---------------------------------------------------
    def _token(self, segments: list[str]) -> tuple[int, dict[str, str], bytes]:
        if len(segments) != 4 or segments[1] != "token":
            return 404, {"Content-Type": "application/json"}, b'{"detail":"Not Found"}'
        account, container = segments[2], segments[3]
        sig = secrets.token_hex(8)
        claimed = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        with self._lock:
            self.tokens[sig] = (f"{account}/{container}", time.time() + self.token_lifetime_s)
        token = (
            f"st={dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ}&se={claimed:%Y-%m-%dT%H:%M:%SZ}"
            f"&sp=rl&sv=2024-05-04&sr=c&sig={sig}"
        )
        doc = {"msft:expiry": f"{claimed:%Y-%m-%dT%H:%M:%SZ}", "token": token}
        return 200, {"Content-Type": "application/json"}, json.dumps(doc).encode()

    def _check_token(
        self, segments: list[str], query: dict[str, list[str]]
    ) -> tuple[int, dict[str, str], bytes] | None:
        xml = {"Content-Type": "application/xml"}
        if "sig" not in query:
            return 409, xml, (
                b'<?xml version="1.0" encoding="utf-8"?><Error><Code>PublicAccessNotPermitted'
                b"</Code><Message>Public access is not permitted on this storage account."
                b"</Message></Error>"
            )  # fmt: skip
        with self._lock:
            held = self.tokens.get(query["sig"][0])
        where = "/".join(segments[:2])
        if held is None or held[0] != where or held[1] < time.time():
            return 403, xml, (
                b'<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed'
                b"</Code><Message>Server failed to authenticate the request. Signature not "
                b"valid in the specified time frame.</Message></Error>"
            )  # fmt: skip
        return None


# -- scenes and items ---------------------------------------------------------------------------


@dataclass
class SampleScene:
    """One acquisition of the bundled sample: its 10 bands (10 m grid) and SCL."""

    date: str
    when: dt.datetime
    bands: np.ndarray  # (10, H, W) uint16, harmonized DN
    scl: np.ndarray  # (H, W) uint8
    transform: Affine
    crs: str
    cloud_pct: float


def sample_scenes(sample_dir: Path = SAMPLE_DIR) -> dict[str, SampleScene]:
    manifest = json.loads((sample_dir / "manifest.json").read_text())
    out = {}
    for entry in manifest["dates"]:
        date = entry["date"]
        with rasterio.open(sample_dir / f"{date}.tif") as src:
            bands, transform, crs = src.read(), src.transform, src.crs.to_string()
        with rasterio.open(sample_dir / "masks" / f"{date}.tif") as src:
            scl = src.read(2)
        when = dt.datetime.fromisoformat(
            str(entry.get("acquisition_datetime_utc") or f"{date}T10:50:00").replace("Z", "+00:00")
        )
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        out[date] = SampleScene(date, when, bands, scl, transform, crs,
                                100.0 * float(entry["cloud_fraction"]))  # fmt: skip
    return out


@dataclass
class Layer:
    """One asset's raster: values and their grid."""

    values: np.ndarray
    transform: Affine
    crs: str


def scene_layers(scene: SampleScene, offset: int = 0) -> dict[str, Layer]:
    """The scene as an archive holds it: 10 m bands at 10 m, 20 m bands and SCL at 20 m
    (the sample's 2 x 2 repeated pixels taken once), reflectance plus ``offset`` where it
    has data."""
    out = {}
    t = scene.transform
    t20 = Affine(t.a * 2, t.b, t.c, t.d, t.e * 2, t.f)
    for i, band in enumerate(BANDS):
        values = scene.bands[i].astype(np.uint32)
        if offset:
            values = np.where(values > 0, values + offset, 0)
        values = values.astype(np.uint16)
        out[band] = (
            Layer(values[::2, ::2].copy(), t20, scene.crs) if band in NATIVE_20M else
            Layer(values, t, scene.crs)
        )  # fmt: skip
    out["SCL"] = Layer(scene.scl[::2, ::2].copy(), t20, scene.crs)
    return out


def reproject_layers(layers: Mapping[str, Layer], crs: str) -> dict[str, Layer]:
    """Every layer in another CRS at its own pixel size (nearest neighbour), the 10 m and
    20 m grids of the new CRS aligned (the 20 m grid's origin on the 10 m lattice)."""
    ref = layers["B2"]
    h, w = ref.values.shape
    left, bottom, right, top = rasterio.transform.array_bounds(h, w, ref.transform)
    t10, w10, h10 = calculate_default_transform(ref.crs, crs, w, h, left, bottom, right, top,
                                                resolution=10)  # fmt: skip
    # Snap the origin to 20 m and make the size even, so that 20 m pixels are 2 x 2 of 10 m.
    x0, y0 = np.floor(t10.c / 20) * 20, np.ceil(t10.f / 20) * 20
    w10, h10 = int(w10) + 4 + (int(w10) % 2), int(h10) + 4 + (int(h10) % 2)
    out = {}
    for name, layer in layers.items():
        res = abs(layer.transform.a)
        dst_t = Affine(res, 0, x0, 0, -res, y0)
        n = 10 / res
        dst = np.zeros((int(h10 * n), int(w10 * n)), layer.values.dtype)
        reproject(layer.values, dst, src_transform=layer.transform, src_crs=layer.crs,
                  dst_transform=dst_t, dst_crs=crs, resampling=Resampling.nearest,
                  src_nodata=0, dst_nodata=0)  # fmt: skip
        out[name] = Layer(dst, dst_t, crs)
    return out


def layers_as_local_scene(layers: Mapping[str, Layer], path: Path, offset: int = 0) -> None:
    """The same layers as the ``local`` provider's files: ``path`` (10 bands on the 10 m
    grid, 20 m bands repeated 2 x 2, ``offset`` taken off) and ``masks/<name>`` (band 2 SCL)."""
    ref = layers["B2"]
    h, w = ref.values.shape
    bands = []
    for band in BANDS:
        v = layers[band].values
        if v.shape != (h, w):
            v = np.repeat(np.repeat(v, 2, axis=0), 2, axis=1)[:h, :w]
        v = v.astype(np.int32)
        if offset:
            v = np.where(v > 0, np.maximum(v - offset, 1), 0)
        bands.append(v.astype(np.uint16))
    scl = np.repeat(np.repeat(layers["SCL"].values, 2, axis=0), 2, axis=1)[:h, :w]
    cloud = np.isin(scl, (0, 1, 3, 8, 9, 10, 11)).astype(np.uint8)
    profile = {"driver": "GTiff", "width": w, "height": h, "crs": ref.crs,
               "transform": ref.transform, "nodata": 0}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", count=10, dtype="uint16", **profile) as dst:
        dst.write(np.stack(bands))
        dst.descriptions = BANDS
    (path.parent / "masks").mkdir(exist_ok=True)
    with rasterio.open(path.parent / "masks" / path.name, "w", count=2, dtype="uint8",
                       **{**profile, "nodata": None}) as dst:  # fmt: skip
        dst.write(np.stack([cloud, scl]))
        dst.descriptions = ("cloud_mask", "SCL")


def band_keys(profile: str) -> dict[str, str]:
    return dict(
        PLANETARY_COMPUTER_ASSETS if profile == "planetary-computer" else EARTH_SEARCH_ASSETS
    )


@dataclass
class ItemSpec:
    """One item of the test archive (see :meth:`Archive.add`)."""

    scene: SampleScene
    collection: str
    item_id: str
    baseline: str = "05.10"
    generation: dt.datetime = dt.datetime(2023, 6, 1, tzinfo=dt.UTC)
    updated: dt.datetime = dt.datetime(2023, 6, 2, tzinfo=dt.UTC)
    mgrs: str = "31UES"
    datatake: str | None = None
    platform: str = "sentinel-2a"
    layers: dict[str, Layer] | None = None  # the raster per band; default: the scene's own
    cloud_pct: float | None = None
    storage: str = "s3"  # "s3" (public, http) or "blob" (Azure path style: signed reads)


class Archive:
    """Items and COGs of the test archive, written to a directory, put in moto, loaded
    into the API."""

    def __init__(self, root: Path, bucket: str, cog: CogOptions = CogOptions()) -> None:
        self.root, self.bucket, self.cog = root, bucket, cog
        self.items: list[dict[str, Any]] = []
        self.files: dict[str, Path] = {}
        self.collections: dict[str, str] = {}  # id -> profile whose keys it uses

    def collection(self, cid: str, profile: str = "earth-search") -> dict[str, Any]:
        self.collections[cid] = profile
        return {
            "type": "Collection", "stac_version": "1.0.0", "id": cid,
            "description": f"test archive {cid} ({profile} keys)", "license": "proprietary",
            "links": [],
            "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                       "temporal": {"interval": [["2015-06-27T00:00:00Z", None]]}},
        }  # fmt: skip

    def add(self, spec: ItemSpec) -> dict[str, Any]:
        """Write the item's COGs (DN + 1000 from baseline 04.00 on) and make its STAC item."""
        profile = self.collections.get(spec.collection, "earth-search")
        keys = band_keys(profile)
        major = int(spec.baseline.split(".")[0])
        offset = 1000 if major >= 4 else 0
        layers = spec.layers or scene_layers(spec.scene, offset)
        ref = layers["B2"]
        epsg = rasterio.crs.CRS.from_string(ref.crs).to_epsg()
        h, w = ref.values.shape
        bounds = rasterio.transform.array_bounds(h, w, ref.transform)
        west, south, east, north = transform_bounds(ref.crs, "EPSG:4326", *bounds[:4])
        # bounds come as (west, south, east, north) in the layer's CRS
        when = spec.scene.when
        datatake = spec.datatake or (
            f"G{spec.platform[-2:].upper()}_{when:%Y%m%dT%H%M%S}_000000_N{spec.baseline}"
        )
        assets = {}
        prefix = f"{spec.collection}/{spec.item_id}"
        for band, layer in layers.items():
            key = keys[band]
            path = self.root / prefix / f"{key}.tif"
            write_cog(path, layer.values, layer.transform, layer.crs, self.cog)
            object_key = f"{prefix}/{key}.tif"
            self.files[object_key] = path
            if spec.storage == "blob":
                href = f"{ARCHIVE_ORIGIN}/{BLOB_ACCOUNT}/{self.bucket}/{object_key}"
            else:
                href = f"{ARCHIVE_ORIGIN}/s3/{self.bucket}/{object_key}"
            res = abs(layer.transform.a)
            assets[key] = {
                "href": href,
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
                "raster:bands": [{
                    "nodata": 0, "data_type": str(layer.values.dtype), "spatial_resolution": res,
                    **({} if band == "SCL" else {"scale": 0.0001, "offset": -0.1 if offset else 0.0}),
                }],
            }  # fmt: skip
        cloud = spec.scene.cloud_pct if spec.cloud_pct is None else spec.cloud_pct
        item = {
            "type": "Feature", "stac_version": "1.0.0", "id": spec.item_id,
            "collection": spec.collection,
            "geometry": {"type": "Polygon", "coordinates": [[[west, south], [east, south],
                         [east, north], [west, north], [west, south]]]},
            "bbox": [west, south, east, north],
            "properties": {
                "datetime": f"{when:%Y-%m-%dT%H:%M:%S.%fZ}",
                "created": f"{spec.updated:%Y-%m-%dT%H:%M:%S.%fZ}",
                "updated": f"{spec.updated:%Y-%m-%dT%H:%M:%S.%fZ}",
                "platform": spec.platform, "constellation": "sentinel-2",
                "eo:cloud_cover": cloud,
                "s2:processing_baseline": spec.baseline,
                "s2:generation_time": f"{spec.generation:%Y-%m-%dT%H:%M:%S.%fZ}",
                "s2:datatake_id": datatake,
                "s2:mgrs_tile": spec.mgrs,
                "grid:code": f"MGRS-{spec.mgrs}",
                "proj:code": f"EPSG:{epsg}",
            },
            "links": [],
            "assets": assets,
        }  # fmt: skip
        self.items.append(item)
        return item

    def publish(self, s3: S3Server, api: StacApi, collections: Sequence[Mapping[str, Any]]) -> None:
        put_objects(s3, self.bucket, self.files)
        api.load(collections, self.items)


def earth_search_id(platform: str, mgrs: str, when: dt.datetime, suffix: str = "") -> str:
    """An Earth Search Collection-1 item id: ``S2B_T38XNF_20250422T091553_L2A``."""
    return f"S2{platform[-1].upper()}_T{mgrs}_{when:%Y%m%dT%H%M%S}_L2A{suffix}"


# -- the tests' archive -----------------------------------------------------------------------------

MAIN = "sentinel-2-c1-l2a"  # every sample scene, Earth Search Collection-1 style
DUPLICATES = "c1-duplicates"  # one acquisition delivered twice, one pass in three granules
PLANETARY = "pc-sentinel-2-l2a"  # Planetary Computer keys, baselines either side of 04.00
DARK = "c1-dark"  # reflectance at or below 0 under the offset
ZONE32 = "c1-zone32"  # scenes delivered as granules of the next UTM zone
DUPLICATE_DATES = ("2019-04-16", "2019-04-21", "2019-05-11", "2019-05-16")
PLANETARY_BASELINES = {
    "2019-04-11": "02.12",
    "2019-04-16": "04.00",
    "2019-04-21": "02.12",
    "2019-05-06": "05.09",
    "2019-05-11": "02.13",
    "2019-05-16": "04.00",
}
ZONE32_DATES = ("2019-06-20", "2019-07-25")
ZONE_DATES = ("2019-06-20", "2019-07-05", "2019-07-25")
DARK_DATE = "2019-05-16"
#: (row, col) of the dark item's B2 pixels and the raw DN written there (baseline 05.10).
DARK_PIXELS = {(0, 0): 500, (0, 1): 1000, (0, 2): 1001, (0, 3): 0}


def platform_of(date: str) -> str:
    """Sentinel-2A and 2B alternate every five days in the sample."""
    days = (dt.date.fromisoformat(date) - dt.date(2018, 11, 2)).days
    return "sentinel-2a" if (days // 5) % 2 == 0 else "sentinel-2b"


def crop_layers(layers: Mapping[str, Layer], col0: int, col1: int) -> dict[str, Layer]:
    """Columns ``col0:col1`` of the 10 m grid (even bounds: the 20 m grid is cut with it)."""
    out = {}
    for name, layer in layers.items():
        k = 10 / abs(layer.transform.a)
        a, b = int(col0 * k), int(col1 * k)
        t = layer.transform
        out[name] = Layer(layer.values[:, a:b].copy(), t @ Affine.translation(a, 0), layer.crs)
    return out


@dataclass
class StacArchive:
    """The published test archive, and for each case the ``local`` provider's directory
    holding the same scenes."""

    bucket: str
    scenes: dict[str, SampleScene]
    items: dict[str, list[dict[str, Any]]]  # collection -> its items
    local: dict[str, Path]  # collection -> local provider root with the same scenes

    def item(self, collection: str, date: str) -> dict[str, Any]:
        found = [i for i in self.items[collection] if i["properties"]["datetime"].startswith(date)]
        assert found, (collection, date)
        return found[0]


def _local_copy(dest: Path, scenes: Mapping[str, SampleScene], dates: Sequence[str]) -> Path:
    (dest / "masks").mkdir(parents=True, exist_ok=True)
    for date in dates:
        shutil.copy(SAMPLE_DIR / f"{date}.tif", dest / f"{date}.tif")
        shutil.copy(SAMPLE_DIR / "masks" / f"{date}.tif", dest / "masks" / f"{date}.tif")
    _local_manifest(dest, dates)
    return dest


def _local_manifest(dest: Path, dates: Sequence[str]) -> None:
    manifest = json.loads((SAMPLE_DIR / "manifest.json").read_text())
    entries = [e for e in manifest["dates"] if e["date"] in set(dates)]
    (dest / "manifest.json").write_text(json.dumps({"dates": entries}))


def build_test_archive(
    bed: StacBed, root: Path, cog: CogOptions = CogOptions(block_size=256)
) -> StacArchive:
    """Every collection the tests read (see the constants above), written, put in moto
    and loaded into the API; and the local directories that hold the same scenes."""
    scenes = sample_scenes()
    archive = Archive(root / "cogs", bucket_name(), cog)
    collections = [
        archive.collection(MAIN),
        archive.collection(DUPLICATES),
        archive.collection(PLANETARY, "planetary-computer"),
        archive.collection(DARK),
        archive.collection(ZONE32),
    ]
    by: dict[str, list[dict[str, Any]]] = {c["id"]: [] for c in collections}

    def add(spec: ItemSpec) -> None:
        by[spec.collection].append(archive.add(spec))

    for date, sc in scenes.items():
        craft = platform_of(date)
        add(ItemSpec(sc, MAIN, earth_search_id(craft, "31UES", sc.when), platform=craft))
    # Duplicates: the winner holds the real scene, the loser another day's pixels.
    d0, d1, d2, d3 = (scenes[d] for d in DUPLICATE_DATES)
    add(
        ItemSpec(
            d0,
            DUPLICATES,
            earth_search_id("sentinel-2a", "31UES", d0.when, "_1"),
            baseline="05.10",
            generation=dt.datetime(2023, 6, 1, tzinfo=dt.UTC),
        )
    )
    add(
        ItemSpec(
            d0,
            DUPLICATES,
            earth_search_id("sentinel-2a", "31UES", d0.when, "_0"),
            baseline="04.00",
            generation=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
            layers=scene_layers(scenes["2019-06-20"], 1000),
        )
    )  # newer, lower baseline
    add(
        ItemSpec(
            d1,
            DUPLICATES,
            earth_search_id("sentinel-2b", "31UES", d1.when, "_0"),
            platform="sentinel-2b",
            generation=dt.datetime(2023, 6, 1, tzinfo=dt.UTC),
        )
    )
    add(
        ItemSpec(
            d1,
            DUPLICATES,
            earth_search_id("sentinel-2b", "31UES", d1.when, "_1"),
            platform="sentinel-2b",
            generation=dt.datetime(2022, 1, 1, tzinfo=dt.UTC),
            layers=scene_layers(scenes["2019-07-25"], 1000),
        )
    )  # same baseline, older
    whole = scene_layers(d2, 1000)
    datatake = f"GS2A_{d2.when:%Y%m%dT%H%M%S}_020000_N05.10"
    add(
        ItemSpec(
            d2,
            DUPLICATES,
            earth_search_id("sentinel-2a", "31UES", d2.when),
            layers=crop_layers(whole, 0, 40),
            datatake=datatake,
        )
    )
    add(
        ItemSpec(
            d2,
            DUPLICATES,
            earth_search_id("sentinel-2a", "31UFS", d2.when),
            mgrs="31UFS",
            layers=crop_layers(whole, 24, 64),
            datatake=datatake,
        )
    )
    add(  # a third granule of the pass, inside the first one's footprint: nothing to add
        ItemSpec(
            d2,
            DUPLICATES,
            earth_search_id("sentinel-2a", "31UET", d2.when),
            mgrs="31UET",
            layers=crop_layers(whole, 8, 32),
            datatake=datatake,
        )
    )
    add(ItemSpec(d3, DUPLICATES, earth_search_id("sentinel-2a", "31UES", d3.when)))
    for date, baseline in PLANETARY_BASELINES.items():
        sc = scenes[date]
        craft = platform_of(date)
        iid = f"S2{craft[-1].upper()}_MSIL2A_{sc.when:%Y%m%dT%H%M%S}_R051_T31UES_2021{date[5:7]}01T000000"
        add(ItemSpec(sc, PLANETARY, iid, baseline=baseline, platform=craft, storage="blob"))
    dark = scene_layers(scenes[DARK_DATE], 1000)
    for (r, c), raw in DARK_PIXELS.items():
        dark["B2"].values[r, c] = raw
    add(
        ItemSpec(
            scenes[DARK_DATE],
            DARK,
            earth_search_id("sentinel-2a", "31UES", scenes[DARK_DATE].when),
            layers=dark,
        )
    )
    local = {
        MAIN: SAMPLE_DIR,
        DUPLICATES: _local_copy(root / "local" / DUPLICATES, scenes, DUPLICATE_DATES),
        PLANETARY: _local_copy(root / "local" / PLANETARY, scenes, list(PLANETARY_BASELINES)),
        ZONE32: _local_copy(
            root / "local" / ZONE32, scenes, [d for d in ZONE_DATES if d not in ZONE32_DATES]
        ),
    }
    for date in ZONE_DATES:
        sc = scenes[date]
        craft = platform_of(date)
        if date in ZONE32_DATES:
            layers = reproject_layers(scene_layers(sc, 1000), "EPSG:32632")
            layers_as_local_scene(layers, local[ZONE32] / f"{date}.tif", offset=1000)
            add(
                ItemSpec(
                    sc,
                    ZONE32,
                    earth_search_id(craft, "32ULA", sc.when),
                    mgrs="32ULA",
                    platform=craft,
                    layers=layers,
                )
            )
        else:
            add(ItemSpec(sc, ZONE32, earth_search_id(craft, "31UES", sc.when), platform=craft))
    _local_manifest(local[ZONE32], ZONE_DATES)
    archive.publish(bed.s3, bed.api, collections)
    return StacArchive(archive.bucket, scenes, by, local)


# -- fixtures ------------------------------------------------------------------------------------


@dataclass
class StacBed:
    """The running pieces: the API, moto, and a way to make fronts."""

    api: StacApi
    s3: S3Server
    fronts: list[FaultFront] = field(default_factory=list)

    def front(self, latency_s: float = 0.0) -> FaultFront:
        f = FaultFront(self.api.url, self.s3.endpoint, latency_s=latency_s)
        self.fronts.append(f)
        return f

    def close(self) -> None:
        for f in self.fronts:
            f.close()


@contextlib.contextmanager
def stac_testbed() -> Iterator[StacBed]:
    """The API on a fresh database, and moto; both stopped at the end."""
    db = fresh_database()
    url = next(db)
    s3 = start_s3_server()
    api = None
    try:
        api = start_stac_api(url)
        bed = StacBed(api, s3)
        try:
            yield bed
        finally:
            bed.close()
    finally:
        if api is not None:
            api.stop()
        s3.proc.kill()
        s3.proc.wait()
        with contextlib.suppress(StopIteration):
            next(db)


@pytest.fixture(scope="session")
def stac_bed() -> Iterator[StacBed]:
    """The STAC API and moto, for the session."""
    with stac_testbed() as bed:
        yield bed


@pytest.fixture(scope="session")
def stac_archive(stac_bed: StacBed, tmp_path_factory: pytest.TempPathFactory) -> StacArchive:
    """The tests' archive (:func:`build_test_archive`), published once per session."""
    return build_test_archive(stac_bed, tmp_path_factory.mktemp("stac-archive"))


def bucket_name() -> str:
    """A bucket (and blob container) name of its own."""
    return f"s2-{uuid.uuid4().hex[:12]}"
