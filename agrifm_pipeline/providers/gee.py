"""Google Earth Engine as a Sentinel-2 source, through ``earthengine-api``.

A tile-year is fetched in two steps.

1. **Granules** (one ``value:compute``): the collection
   (``COPERNICUS/S2_SR_HARMONIZED`` by default) filtered by the area, the
   range and ``CLOUDY_PIXEL_PERCENTAGE <= cloudy_pct``; for each granule its
   id, time, spacecraft, relative orbit, MGRS tile and generation time.
   Granules are grouped into **acquisitions** (UTC date, spacecraft, orbit):
   the granules of neighbouring MGRS tiles that overlap the area become one
   observation (a mosaic), and of a granule delivered twice only the newest
   generation is kept. Frame windows, scene counts and the record count
   acquisitions, as the local provider counts its scenes.
2. **Pixels** (``image:computePixels`` on the area's own grid: its CRS, as
   ``crsCode`` when it has an EPSG code and ``crsWkt`` otherwise, and its
   affine transform at true ``scale_m`` metres). Every granule is masked per
   pixel with one mask for all bands: a pixel is clear where every band has
   data and, with ``CloudMask(mode="scl")``, its SCL class is not masked (SCL
   0, no data, always is). Each window with acquisitions becomes ten bands
   (the median rounded half up, or the most recent clear observation; the
   fill value where nothing is clear) plus a clear flag. Windows without any
   acquisition are never sent: an empty collection reduces to an image with
   no bands, which Earth Engine refuses to rename or combine.

The rules are those of :mod:`agrifm_pipeline.providers.compositing`, so the local and
Earth Engine providers give the same frames from the same scenes. An empty
window (no acquisition, or nothing clear) is back-filled by the contract's
rule; the whole-range composite it needs is requested with the windows when
a window is known to be empty, and in a second round only when a window
turns out to have nothing clear.

Requests are split so that each stays within Earth Engine's limits: at most
``max_request_bands`` bands (window groups, under the 1024 of
``computePixels``), 48 MB uncompressed and 32768 px a side (blocks of rows).
An answer "Computation timed out." to a pixel request splits the block in two
and asks again; to a request that cannot be split (a granule list) it is a
:class:`ProviderError` at once, saying to ask for less.

Transient failures are retried with exponential backoff and jitter. They are
recognised by the HTTP status of the ``HttpError`` the client chains behind
its ``EEException`` (429, 500, 502, 503, 504), by connection and timeout
errors, and by Earth Engine's own messages (:data:`RETRY_MESSAGES`). The
client library's own retry loop is switched off (``ee.data.setMaxRetries(0)``)
so that attempts are ours to count, bound and report.

Concurrency has two bounds: ``max_concurrent`` requests per provider in this
process, and a deployment-wide limit of ``deployment_slots`` concurrent
requests (default 32, below Earth Engine's 40 per project) held by a
:class:`~agrifm_pipeline.providers.ee_slots.SlotDirectory` that every process
using the same directory shares (see that module for how it holds across
processes and nodes, and for the Dagster-pool alternative).

``ee.Initialize`` runs once per process and (endpoint, project, credentials);
the credentials are resolved once and cached. Earth Engine's client keeps its
connection settings process-wide; one process talks to one endpoint and
project at a time.

**Listing** (:meth:`EarthEngineProvider.scene_indexes`, for the stale sensor
and the audit): the granule list of step 1 for many tile-years in one
``value:compute`` (a dictionary of each tile-year's granule properties, at
most :data:`LIST_BATCH` tile-years and :data:`MAX_LIST_REQUEST_BYTES` of
expression per request), grouped locally as a fetch groups them: an unchanged
collection lists exactly the ``scene_index`` the fetch recorded, and a
re-delivered, added or removed granule changes exactly the tile-years it
intersects. Listing requests share the retries and both concurrency bounds.
"""

from __future__ import annotations

import datetime as dt
import http.client
import itertools
import json
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from odc.geo.geobox import GeoBox

from agrifm_pipeline.errors import NoCoverageError, ProviderError, SettingsError
from agrifm_pipeline.frames import FrameWindow
from agrifm_pipeline.lineage import SCENE_INDEX_KEY, scene_index_record
from agrifm_pipeline.providers.base import CloudMask, FrameRecord, FrameStack, frame_stack_array
from agrifm_pipeline.providers.compositing import backfill_sources, fill_dn
from agrifm_pipeline.providers.ee_slots import Limiter, SlotDirectory, default_slots_dir
from agrifm_pipeline.specs import SensorSpec

DEFAULT_ENDPOINT = "https://earthengine.googleapis.com"
HIGH_VOLUME_ENDPOINT = "https://earthengine-highvolume.googleapis.com"
MAX_REQUEST_BYTES = 48 * 1024 * 1024
MAX_REQUEST_SIDE = 32768
EE_MAX_REQUEST_BANDS = 1024
DEFAULT_MAX_REQUEST_BANDS = 1023
DEFAULT_MAX_CONCURRENT = 8
DEFAULT_DEPLOYMENT_SLOTS = 32
EE_CONCURRENCY_QUOTA = 40
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Earth Engine's texts for transient conditions (matched case-insensitively in the message).
RETRY_MESSAGES = (
    "too many concurrent aggregations",
    "earth engine capacity exceeded",
    "earth engine memory capacity exceeded",
    "too many requests",
    "internal error",
    "service unavailable",
    "backend error",
)
TIMED_OUT_MESSAGE = "computation timed out"
#: Tile-years whose granules one listing request asks for (:meth:`EarthEngineProvider.scene_indexes`).
LIST_BATCH = 50
#: The most serialised expression one listing request sends (Earth Engine refuses payloads over 10 MB).
MAX_LIST_REQUEST_BYTES = 1_000_000
#: Collections whose values are not comparable across the 2022-01-25 processing change.
NON_HARMONIZED = {
    "COPERNICUS/S2_SR": "COPERNICUS/S2_SR_HARMONIZED",
    "COPERNICUS/S2": "COPERNICUS/S2_HARMONIZED",
}
GRANULE_PROPERTIES = (
    "system:index",
    "system:time_start",
    "SPACECRAFT_NAME",
    "SENSING_ORBIT_NUMBER",
    "MGRS_TILE",
    "GENERATION_TIME",
)
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,  # includes RemoteDisconnected, ConnectionResetError, BrokenPipeError
    TimeoutError,  # socket.timeout is TimeoutError
    socket.gaierror,
    http.client.IncompleteRead,
    http.client.BadStatusLine,
)

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

_INIT_LOCK = threading.Lock()
_INITIALISED: tuple[Any, ...] | None = None
_CREDENTIALS: dict[tuple[Any, ...], tuple[Any, str | None]] = {}
INIT_COUNT = {"initialize": 0}  # ee.Initialize calls made by this process


# --- error classification ------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those it was raised from or while handling."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an ``HttpError`` anywhere in the exception's chain."""
    for e in _chain(exc):
        resp = getattr(e, "resp", None)
        status = getattr(resp, "status", None) if resp is not None else None
        if status is not None and type(e).__name__ == "HttpError":
            return int(status)
    return None


def classify(exc: BaseException) -> str:
    """``"retry"`` (transient), ``"split"`` (the block timed out) or ``"fail"``."""
    text = " ".join(str(e) for e in _chain(exc)).lower()
    if TIMED_OUT_MESSAGE in text:
        return "split"
    if http_status(exc) in RETRY_STATUSES:
        return "retry"
    if any(isinstance(e, _TRANSIENT_ERRORS) for e in _chain(exc)):
        return "retry"
    if any(m in text for m in RETRY_MESSAGES):
        return "retry"
    return "fail"


def is_retryable(exc: BaseException) -> bool:
    """Whether an Earth Engine error is transient (quota, rate, 5xx, dropped connection)."""
    return classify(exc) == "retry"


def _hint(exc: BaseException) -> str:
    """A fix for the refusals users cause themselves (wrong collection or bands)."""
    text = str(exc).lower()
    if "did not match any bands" in text or ("band" in text and "not found" in text):
        return (
            "; the collection lacks bands this sensor needs (10 S2 L2A bands B2..B12 and SCL): "
            "use COPERNICUS/S2_SR_HARMONIZED or set SensorSpec.bands to bands the collection has"
        )
    if "not found" in text and ("collection" in text or "asset" in text):
        return "; check the collection id (for example COPERNICUS/S2_SR_HARMONIZED) and your access to it"
    return ""


def check_collection(sensor: SensorSpec) -> None:
    """Refuse collections whose values change meaning within the archive."""
    fix = NON_HARMONIZED.get(sensor.collection)
    if fix:
        raise SettingsError(
            f"SensorSpec.collection={sensor.collection!r} is not harmonized: its scenes processed "
            "from 2022-01-25 on (processing baseline 04.00) carry a +1000 DN offset, so frames "
            f"before and after that date do not compare; use collection={fix!r}"
        )


# --- acquisitions --------------------------------------------------------------------------


@dataclass
class Acquisition:
    """One pass of one spacecraft over the area: the granules that observed it."""

    date: dt.date
    spacecraft: str
    orbit: int
    time_start: int
    granules: list[str] = field(default_factory=list)  # system:index of the granules kept
    superseded: list[str] = field(default_factory=list)  # older deliveries left out

    @property
    def id(self) -> str:
        craft = self.spacecraft.replace("Sentinel-", "S")
        return f"{self.date.isoformat()}_{craft}_R{self.orbit:03d}"


def group_acquisitions(granules: dict[str, list[Any]]) -> list[Acquisition]:
    """Granules (property name -> one value per granule) grouped into acquisitions.

    An acquisition is (UTC date, spacecraft, relative orbit). Within it, of
    the granules of one MGRS tile only the newest ``GENERATION_TIME`` is kept
    (a re-delivered granule); granules of different tiles stay, to be
    mosaicked. Sorted by time, then id.
    """
    lengths = {k: len(v) for k, v in granules.items()}
    if len(set(lengths.values())) > 1:
        raise ProviderError(
            f"Earth Engine returned granule properties of unequal length {lengths}: some "
            f"granules lack one of {list(GRANULE_PROPERTIES)}; this collection cannot be "
            "grouped into acquisitions (use COPERNICUS/S2_SR_HARMONIZED)"
        )
    rows = [
        dict(zip(granules, values, strict=True)) for values in zip(*granules.values(), strict=True)
    ]
    acqs: dict[tuple[dt.date, str, int], Acquisition] = {}
    newest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r["system:time_start"], r["system:index"])):
        day = dt.datetime.fromtimestamp(row["system:time_start"] / 1000, dt.UTC).date()
        key = (day, str(row["SPACECRAFT_NAME"]), int(row["SENSING_ORBIT_NUMBER"]))
        acq = acqs.setdefault(key, Acquisition(*key, time_start=int(row["system:time_start"])))
        tile = (*key, row["MGRS_TILE"])
        kept = newest.get(tile)
        if kept is None:
            newest[tile] = row
            acq.granules.append(row["system:index"])
        elif row["GENERATION_TIME"] > kept["GENERATION_TIME"]:
            acq.granules[acq.granules.index(kept["system:index"])] = row["system:index"]
            acq.superseded.append(kept["system:index"])
            newest[tile] = row
        else:
            acq.superseded.append(row["system:index"])
    return sorted(acqs.values(), key=lambda a: (a.time_start, a.id))


def granule_stamps(granules: dict[str, list[Any]], acqs: Sequence[Acquisition]) -> dict[str, str]:
    """``system:index`` -> ``generated <GENERATION_TIME>`` of the granules the acquisitions keep."""
    generated = dict(
        zip(granules.get("system:index", []), granules.get("GENERATION_TIME", []), strict=False)
    )
    return {g: f"generated {generated.get(g)}" for a in acqs for g in a.granules}


# --- request planning -----------------------------------------------------------------------


def band_groups(tags: Sequence[str], bands_per_tag: int, max_bands: int) -> list[list[str]]:
    """Consecutive groups of tags whose bands stay within ``max_bands`` per request."""
    per = max(1, max_bands // bands_per_tag)
    if bands_per_tag > max_bands:
        raise SettingsError(
            f"max_request_bands={max_bands} is below the {bands_per_tag} bands of one frame"
        )
    return [list(tags[i : i + per]) for i in range(0, len(tags), per)]


def blocks(
    shape: tuple[int, int], bytes_per_px: int, max_bytes: int = MAX_REQUEST_BYTES
) -> list[tuple[slice, slice]]:
    """Blocks of rows (columns only beyond 32768 px) each within the request limits.

    As few blocks as the byte limit allows, split as evenly as possible.
    """
    h, w = shape
    nx = math.ceil(w / MAX_REQUEST_SIDE)
    bw = math.ceil(w / nx)
    rows_fit = max_bytes // (bytes_per_px * bw)
    if rows_fit < 1:
        nx = math.ceil(w * bytes_per_px / max_bytes)
        bw = math.ceil(w / nx)
        rows_fit = max(1, max_bytes // (bytes_per_px * bw))
    ny = max(math.ceil(h / rows_fit), math.ceil(h / MAX_REQUEST_SIDE))
    rows = np.linspace(0, h, ny + 1).round().astype(int)
    cols = np.linspace(0, w, nx + 1).round().astype(int)
    return [
        (slice(int(r0), int(r1)), slice(int(c0), int(c1)))
        for r0, r1 in itertools.pairwise(rows)
        for c0, c1 in itertools.pairwise(cols)
        if r1 > r0 and c1 > c0
    ]


def halves(block: tuple[slice, slice]) -> list[tuple[slice, slice]]:
    """A block cut in two across its longer side (for a request that timed out)."""
    rows, cols = block
    h, w = rows.stop - rows.start, cols.stop - cols.start
    if h >= w:
        mid = rows.start + h // 2
        return [(slice(rows.start, mid), cols), (slice(mid, rows.stop), cols)]
    mid = cols.start + w // 2
    return [(rows, slice(cols.start, mid)), (rows, slice(mid, cols.stop))]


def pixel_grid(area: GeoBox, block: tuple[slice, slice]) -> dict[str, Any]:
    """The ``PixelGrid`` of a block of ``area``: ``crsCode`` with an EPSG code, else ``crsWkt``."""
    sub = area[block]
    a = sub.affine
    grid: dict[str, Any] = {
        "dimensions": {"width": int(sub.shape[1]), "height": int(sub.shape[0])},
        "affineTransform": {
            "scaleX": a.a,
            "shearX": a.b,
            "translateX": a.c,
            "shearY": a.d,
            "scaleY": a.e,
            "translateY": a.f,
        },
    }
    assert area.crs is not None, "an area grid always has a CRS"
    epsg = area.crs.epsg
    if epsg is not None:
        grid["crsCode"] = f"EPSG:{epsg}"
    else:
        grid["crsWkt"] = area.crs.to_wkt()
    return grid


def backfill(
    frames: list[np.ndarray],
    records: list[FrameRecord],
    empty: Sequence[bool],
    whole: tuple[np.ndarray, np.ndarray] | None,
) -> None:
    """Back-fill empty windows in place by the contract's rule (as the local provider does).

    ``whole`` is the whole-range composite and its clear mask, or None when it
    was not fetched: an empty window takes it when it has a clear pixel, and
    otherwise the nearest non-empty window (the earlier one on ties).
    """
    available = whole is not None and bool(whole[1].any())
    for i, source in enumerate(backfill_sources(empty, available)):
        if source is None:
            continue
        records[i].backfilled, records[i].backfill_source = True, source
        if source == "whole_range":
            assert whole is not None
            frames[i], records[i].clear_fraction = whole[0], float(whole[1].mean())
        else:
            j = int(source.split(":")[1])
            frames[i], records[i].clear_fraction = frames[j], records[j].clear_fraction


def _region(area: GeoBox) -> Any:
    """``area``'s bounding box as an ee.Geometry in its own CRS (planar)."""
    import ee

    bbox = area.extent.boundingbox
    return ee.Geometry.Rectangle(
        [bbox.left, bbox.bottom, bbox.right, bbox.top], str(area.crs), False
    )


@dataclass
class _Counters:
    """Requests of one fetch (a provider may run several fetches at once)."""

    requests: int = 0
    retries: int = 0
    splits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


class EarthEngineProvider:
    """Sentinel-2 frame stacks from Earth Engine (see the module docstring)."""

    name = "gee"
    source_title = "Earth Engine"  # in the stale sensor's words on what it listed

    synthetic = False

    @staticmethod
    def identity(endpoint: str = "default", **_: Any) -> dict[str, Any]:
        """What names this source in lineage and fingerprints (the project and credentials
        do not change what the collection holds)."""
        return {"name": "gee", "endpoint": endpoint}

    def __init__(
        self,
        *,
        project: str | None = None,
        service_account_key: str | Path | None = None,
        credentials: Any = None,
        endpoint: str = "default",
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        deployment_slots: int = DEFAULT_DEPLOYMENT_SLOTS,
        slots_dir: str | Path | None = None,
        limiter: Limiter | None = None,
        max_attempts: int = 6,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_request_bands: int = DEFAULT_MAX_REQUEST_BANDS,
        list_batch: int = LIST_BATCH,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import ee

        for name, value in (
            ("max_concurrent", max_concurrent),
            ("deployment_slots", deployment_slots),
        ):
            if not 1 <= value < EE_CONCURRENCY_QUOTA:
                raise SettingsError(
                    f"{name}={value}; use 1..{EE_CONCURRENCY_QUOTA - 1} (Earth Engine allows "
                    f"{EE_CONCURRENCY_QUOTA} concurrent requests per project)"
                )
        if max_attempts < 1:
            raise SettingsError(f"max_attempts={max_attempts}; use 1 or more")
        if list_batch < 1:
            raise SettingsError(f"list_batch={list_batch}; use 1 or more")
        if not 1 <= max_request_bands <= EE_MAX_REQUEST_BANDS:
            raise SettingsError(
                f"max_request_bands={max_request_bands}; use 1..{EE_MAX_REQUEST_BANDS} "
                "(computePixels' limit)"
            )
        if not 1 <= max_request_bytes <= MAX_REQUEST_BYTES:
            raise SettingsError(
                f"max_request_bytes={max_request_bytes}; use 1..{MAX_REQUEST_BYTES} (48 MB)"
            )
        self.project = project
        self.endpoint = {"default": DEFAULT_ENDPOINT, "highvolume": HIGH_VOLUME_ENDPOINT}.get(
            endpoint, endpoint
        )
        self.max_concurrent = max_concurrent
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_request_bytes = max_request_bytes
        self.max_request_bands = max_request_bands
        self.list_batch = list_batch
        self._sleep = sleep
        self._credentials = credentials
        self._key = Path(service_account_key) if service_account_key else None
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self.limiter: Limiter = limiter or SlotDirectory(
            slots_dir or default_slots_dir(project), deployment_slots
        )
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "splits": 0, "in_flight_max": 0}
        self._in_flight = 0
        self.version = f"earthengine-api {ee.__version__}"

    # -- connection ----------------------------------------------------------------------
    def _credential_key(self) -> tuple[Any, ...]:
        c = self._credentials
        if c is not None:  # equal credentials built afresh by each caller count as one
            # Who they are (stable across token refreshes); a bare token is its own identity.
            who = [
                getattr(c, a, None) for a in ("service_account_email", "client_id", "refresh_token")
            ]
            if any(who):
                return ("given", type(c).__name__, *who)
            token = getattr(c, "token", None)
            return ("given", type(c).__name__, token) if token else ("given", id(c))
        if self._key is not None:
            return ("key", str(self._key.resolve()))
        return ("default",)

    def _resolve_credentials(self) -> tuple[Any, str | None]:
        """(credentials, default project); resolved once per process and source."""
        key = self._credential_key()
        if key[0] == "given":
            return self._credentials, None
        if key in _CREDENTIALS:
            return _CREDENTIALS[key]
        import ee

        if self._key is not None:
            if not self._key.is_file():
                raise ProviderError(f"service-account key {self._key} does not exist")
            try:
                email = json.loads(self._key.read_text())["client_email"]
            except (ValueError, KeyError) as exc:
                raise ProviderError(
                    f"{self._key} is not a service-account key file (no client_email)"
                ) from exc
            found: tuple[Any, str | None] = (
                ee.ServiceAccountCredentials(email, str(self._key)),
                None,
            )
        else:
            try:
                import google.auth

                creds, default_project = google.auth.default(
                    scopes=[
                        "https://www.googleapis.com/auth/earthengine",
                        "https://www.googleapis.com/auth/cloud-platform",
                    ]
                )
            except Exception as exc:  # google.auth raises DefaultCredentialsError and others
                raise ProviderError(
                    "no Earth Engine credentials: pass service_account_key=<key.json>, or set up "
                    "application-default credentials (gcloud auth application-default login): "
                    f"{exc}"
                ) from exc
            found = (creds, default_project)
        _CREDENTIALS[key] = found
        return found

    def initialise(self) -> None:
        """``ee.Initialize`` once per (endpoint, project, credentials) in this process."""
        global _INITIALISED
        import ee

        with _INIT_LOCK:
            creds, default_project = self._resolve_credentials()
            self.project = self.project or default_project
            key = (self.endpoint, self.project, self._credential_key())
            if key == _INITIALISED:
                return
            if not self.project:
                raise ProviderError("no Earth Engine project; pass project=<cloud project id>")

            def init() -> None:
                INIT_COUNT["initialize"] += 1
                ee.Initialize(credentials=creds, project=self.project, url=self.endpoint)

            try:
                self._call("initialisation", init, _Counters())
            except ProviderError as exc:
                raise ProviderError(
                    f"Earth Engine initialisation at {self.endpoint} failed: {exc}"
                ) from exc
            ee.data.setMaxRetries(0)  # we retry ourselves, countably
            _INITIALISED = key

    # -- requests -----------------------------------------------------------------------
    def _call(
        self,
        what: str,
        fn: Callable[[], T],
        counters: _Counters,
        attempts: int | None = None,
        *,
        splittable: bool = False,
    ) -> T:
        """One request under both concurrency bounds, retrying transient failures.

        A "Computation timed out." answer is raised as :class:`_TimedOut` for the
        caller to split the request where it can (``splittable``: a pixel request);
        elsewhere (a granule list, initialisation) it is a :class:`ProviderError` at
        once, as the same expression would time out again. ``attempts``: at most
        this many (and never more than ``max_attempts``), for a caller on a deadline.
        """
        max_attempts = min(attempts or self.max_attempts, self.max_attempts)
        for attempt in range(1, max_attempts + 1):
            with self._slots, self.limiter.slot():
                with self._lock:
                    self._in_flight += 1
                    self.stats["requests"] += 1
                    self.stats["in_flight_max"] = max(self.stats["in_flight_max"], self._in_flight)
                counters.add("requests")
                try:
                    return fn()
                except Exception as exc:  # the client raises EEException and transport errors
                    kind = classify(exc)
                    if kind == "split":
                        if splittable:
                            raise _TimedOut(str(exc)) from exc
                        raise ProviderError(
                            f"Earth Engine timed out computing {what}: {exc}; ask for less at "
                            "once (a shorter range or a smaller area; for listings a smaller "
                            "list_batch)"
                        ) from exc
                    if kind == "fail":
                        raise ProviderError(
                            f"Earth Engine refused {what}: {exc}{_hint(exc)}"
                        ) from exc
                    if attempt == max_attempts:
                        raise ProviderError(
                            f"Earth Engine kept failing {what} after {attempt} attempts: {exc}; "
                            "lower deployment_slots / RS_EMBED_AGRIFM_FETCH_WORKERS or try later"
                        ) from exc
                finally:
                    with self._lock:
                        self._in_flight -= 1
            with self._lock:
                self.stats["retries"] += 1
            counters.add("retries")
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
            self._sleep(delay + random.uniform(0, delay))
        raise AssertionError("unreachable")

    # -- step 1: granules -----------------------------------------------------------------
    @staticmethod
    def _collection(area: GeoBox, start: dt.date, end: dt.date, sensor: SensorSpec) -> Any:
        """The granules over ``area`` in ``[start, end)`` that pass the scene filter.

        Bounds and dates are the filters Earth Engine answers from its index;
        both steps start from this collection.
        """
        import ee

        region = _region(area)
        return (
            ee.ImageCollection(sensor.collection)
            .filterBounds(region)
            .filterDate(start.isoformat(), end.isoformat())
            .filter(ee.Filter.lte("CLOUDY_PIXEL_PERCENTAGE", sensor.cloudy_pct))
        )

    def _covered(self, area: GeoBox, sensor: SensorSpec, counters: _Counters) -> bool:
        """Whether any granule of the collection, of any date, reaches ``area`` (one request)."""
        import ee

        region = _region(area)
        anyone = ee.ImageCollection(sensor.collection).filterBounds(region).limit(1).size()
        return bool(self._call("the coverage check", anyone.getInfo, counters))

    @staticmethod
    def _granule_query(col: Any) -> Any:
        """An ee.Dictionary: property name -> one value per granule of ``col``."""
        import ee

        return ee.Dictionary.fromLists(
            list(GRANULE_PROPERTIES), [col.aggregate_array(p) for p in GRANULE_PROPERTIES]
        )

    def granules(self, col: Any, counters: _Counters) -> dict[str, list[Any]]:
        """Each granule's properties (:data:`GRANULE_PROPERTIES`), one request."""
        found = self._call("the granule list", self._granule_query(col).getInfo, counters)
        return dict(found or {})

    # -- listing: the granules of many tile-years -----------------------------------------
    def _listing_query(
        self, area: GeoBox, windows: Sequence[FrameWindow], sensor: SensorSpec
    ) -> Any:
        """The granule query a fetch of (area, windows) starts with."""
        return self._granule_query(
            self._collection(area, windows[0].start, windows[-1].end, sensor)
        )

    def listing_batches(
        self, requests: Sequence[tuple[K, GeoBox, Sequence[FrameWindow]]], sensor: SensorSpec
    ) -> list[list[tuple[K, GeoBox, Sequence[FrameWindow]]]]:
        """``requests`` in the batches :meth:`scene_indexes` sends, one request each: at
        most ``list_batch`` tile-years and :data:`MAX_LIST_REQUEST_BYTES` of expression
        (a tile-year's measured once per CRS: only its coordinates' digits differ)."""
        import ee

        self.initialise()
        out: list[list[tuple[K, GeoBox, Sequence[FrameWindow]]]] = []
        size = 0
        sizes: dict[str, int] = {}
        for req in requests:
            crs = str(req[1].crs)
            if crs not in sizes:
                query = self._listing_query(req[1], req[2], sensor)
                sizes[crs] = len(json.dumps(ee.serializer.encode(query, for_cloud_api=True))) + 256
            n = sizes[crs]
            if not out or len(out[-1]) >= self.list_batch or size + n > MAX_LIST_REQUEST_BYTES:
                out.append([])
                size = 0
            out[-1].append(req)
            size += n
        return out

    def scene_indexes(
        self,
        requests: Sequence[tuple[K, GeoBox, Sequence[FrameWindow]]],
        sensor: SensorSpec,
        *,
        attempts: int | None = None,
    ) -> dict[K, dict[str, str]]:
        """``{key: {granule id: "generated <GENERATION_TIME>"}}`` for each ``(key, area,
        windows)``: what a fetch of that area and those windows would record as its
        ``scene_index`` now, many tile-years per request (:meth:`listing_batches`).

        The granules are those a fetch considers (the scene filter applied: a granule
        whose ``CLOUDY_PIXEL_PERCENTAGE`` crosses ``cloudy_pct`` appears or goes), grouped
        as a fetch groups them. Raises :class:`ProviderError` when a request fails;
        ``attempts`` bounds the attempts of each request (for a caller on a deadline).
        """
        check_collection(sensor)
        batches = self.listing_batches(requests, sensor)
        out: dict[K, dict[str, str]] = {}
        workers = max(1, min(self.max_concurrent, len(batches)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for part in pool.map(lambda b: self._list_batch(b, sensor, attempts), batches):
                out.update(part)
        return out

    def _list_batch(
        self,
        batch: Sequence[tuple[K, GeoBox, Sequence[FrameWindow]]],
        sensor: SensorSpec,
        attempts: int | None,
    ) -> dict[K, dict[str, str]]:
        """One listing request: the batch's granule lists in one nested ee.Dictionary."""
        import ee

        names = [str(i) for i in range(len(batch))]
        query = ee.Dictionary.fromLists(
            names, [self._listing_query(area, windows, sensor) for _, area, windows in batch]
        )
        found = self._call(
            f"the granule lists of {len(batch)} tile-year(s)", query.getInfo, _Counters(), attempts
        )
        if not isinstance(found, dict) or set(found) != set(names):
            raise ProviderError(
                f"Earth Engine answered the granule lists of {len(batch)} tile-year(s) with "
                f"{type(found).__name__} {str(found)[:80]}"
            )
        out: dict[K, dict[str, str]] = {}
        for name, (key, _, _) in zip(names, batch, strict=True):
            granules = dict(found[name] or {})
            out[key] = granule_stamps(granules, group_acquisitions(granules))
        return out

    def scene_index(
        self, area: GeoBox, windows: Sequence[FrameWindow], sensor: SensorSpec
    ) -> dict[str, str]:
        """The granules a fetch of ``area`` would record now (one request; see
        :meth:`scene_indexes`, which lists many tile-years per request)."""
        return self.scene_indexes([(0, area, windows)], sensor)[0]

    # -- step 2: the expression -----------------------------------------------------------
    def _acquisition_images(
        self, col: Any, acqs: Sequence[Acquisition], sensor: SensorSpec, cloud_mask: CloudMask
    ) -> dict[str, Any]:
        """One masked ee.Image per acquisition (a mosaic of its granules)."""
        import ee

        bands = list(sensor.bands)
        masked_classes = sorted({0, *(cloud_mask.scl_classes if cloud_mask.mode == "scl" else ())})

        def mask(img: Any) -> Any:
            img = ee.Image(img)
            values = img.select(bands)
            every_band = values.mask().reduce(ee.Reducer.min())  # one mask for all bands
            scl_ok = img.select("SCL").remap(masked_classes, [0] * len(masked_classes), 1)
            return values.updateMask(every_band.And(scl_ok))

        ids = sorted({g for a in acqs for g in a.granules})
        base = col.filter(ee.Filter.inList("system:index", ids)).map(mask)
        return {
            a.id: base.filter(ee.Filter.inList("system:index", a.granules)).mosaic() for a in acqs
        }

    def _composite(self, images: Sequence[Any], sensor: SensorSpec, tag: str) -> Any:
        import ee

        col = ee.ImageCollection(list(images))  # in time order: a mosaic puts the newest on top
        # The median of an even count is a float: rounded half up, as the local median.
        comp = col.median().round() if sensor.composite == "median" else col.mosaic()
        clear = comp.select([0]).mask().toUint8().rename(f"{tag}_clear")
        values = comp.unmask(fill_dn(sensor.fill_value)).toUint16()
        return values.rename([f"{tag}_{b}" for b in sensor.bands]).addBands(clear)

    # -- pixels -------------------------------------------------------------------------
    def _pixels(
        self,
        image: Any,
        band_ids: list[str],
        area: GeoBox,
        block: tuple[slice, slice],
        counters: _Counters,
    ) -> list[tuple[tuple[slice, slice], np.ndarray]]:
        """(block, (bands, h, w) values) for ``block``, split further where it timed out."""
        import ee

        params = {
            "expression": image,
            "fileFormat": "NUMPY_NDARRAY",
            "bandIds": band_ids,
            "grid": pixel_grid(area, block),
        }
        shape = (block[0].stop - block[0].start, block[1].stop - block[1].start)
        try:
            arr = self._call(
                f"computePixels {shape} px x {len(band_ids)} bands",
                lambda: ee.data.computePixels(params),
                counters,
                splittable=True,
            )
        except _TimedOut as exc:
            if shape == (1, 1):
                raise ProviderError(
                    f"Earth Engine timed out computing a single pixel of {len(band_ids)} bands "
                    f"({exc}); lower n_frames or use fewer scenes (a shorter range)"
                ) from exc
            counters.add("splits")
            with self._lock:
                self.stats["splits"] += 1
            return [
                part
                for half in halves(block)
                for part in self._pixels(image, band_ids, area, half, counters)
            ]
        if arr.shape != shape:
            raise ProviderError(f"Earth Engine returned {arr.shape} px for a {shape} request")
        return [(block, np.stack([arr[b] for b in band_ids]))]

    def _fetch_tags(
        self,
        composites: dict[str, Any],
        area: GeoBox,
        sensor: SensorSpec,
        counters: _Counters,
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(values (C, H, W) uint16, clear (H, W) bool) for each tag's composite."""
        import ee

        c = len(sensor.bands)
        h, w = area.shape
        jobs = []
        for group in band_groups(list(composites), c + 1, self.max_request_bands):
            image = ee.Image.cat([composites[t] for t in group])
            band_ids = [f"{t}_{b}" for t in group for b in (*sensor.bands, "clear")]
            for blk in blocks((h, w), len(group) * (2 * c + 1), self.max_request_bytes):
                jobs.append((group, image, band_ids, blk))
        out = {t: (np.zeros((c, h, w), np.uint16), np.zeros((h, w), bool)) for t in composites}
        workers = max(1, min(self.max_concurrent, len(jobs)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(
                lambda job: (job[0], self._pixels(job[1], job[2], area, job[3], counters)), jobs
            )
            for group, parts in results:
                for (rows, cols), values in parts:
                    for k, t in enumerate(group):
                        block = values[k * (c + 1) : (k + 1) * (c + 1)]
                        out[t][0][:, rows, cols] = block[:c]
                        out[t][1][rows, cols] = block[c] > 0
        return out

    # -- the interface --------------------------------------------------------------------
    def fetch(
        self,
        area: GeoBox,
        windows: Sequence[FrameWindow],
        sensor: SensorSpec,
        cloud_mask: CloudMask,
    ) -> FrameStack:
        check_collection(sensor)
        if sensor.composite not in ("median", "mosaic"):
            raise ProviderError(f"composite={sensor.composite!r}; use 'median' or 'mosaic'")
        self.initialise()
        counters = _Counters()
        start, end = windows[0].start, windows[-1].end
        label = f"{area.crs} {tuple(area.extent.boundingbox)}"
        col = self._collection(area, start, end, sensor)
        granules = self.granules(col, counters)
        acqs = group_acquisitions(granules)
        if not acqs:
            if not self._covered(area, sensor, counters):
                raise NoCoverageError(label, sensor.collection, None)
            raise ProviderError(
                f"no Sentinel-2 granule of {sensor.collection} covers {label} in [{start}, {end}) "
                f"with CLOUDY_PIXEL_PERCENTAGE <= {sensor.cloudy_pct}; widen the range or raise "
                "cloudy_pct (S2_SR_HARMONIZED starts on 2017-03-28)"
            )
        members = [[a for a in acqs if win.contains(a.date)] for win in windows]
        images = self._acquisition_images(col, acqs, sensor, cloud_mask)
        composites = {
            f"f{win.index}": self._composite([images[a.id] for a in m], sensor, f"f{win.index}")
            for win, m in zip(windows, members, strict=True)
            if m
        }
        whole = self._composite([images[a.id] for a in acqs], sensor, "all")
        if not all(members):  # a window without acquisition needs the back-fill source
            composites["all"] = whole
        fetched = self._fetch_tags(composites, area, sensor, counters)
        empty = [
            not m or not fetched[f"f{w.index}"][1].any()
            for w, m in zip(windows, members, strict=True)
        ]
        if all(empty):
            raise ProviderError(
                f"no clear observation of {label} in [{start}, {end}) ({len(acqs)} acquisitions "
                f"pass cloudy_pct <= {sensor.cloudy_pct}); widen the range, raise cloudy_pct, or "
                "use cloud_mask='none'"
            )
        if any(empty) and "all" not in fetched:
            fetched.update(self._fetch_tags({"all": whole}, area, sensor, counters))

        fill = np.full((len(sensor.bands), *area.shape), fill_dn(sensor.fill_value), np.uint16)
        frames: list[np.ndarray] = []
        records: list[FrameRecord] = []
        for win, m, e in zip(windows, members, empty, strict=True):
            values, clear = fetched.get(f"f{win.index}", (fill, np.zeros(area.shape, bool)))
            frames.append(values)
            records.append(
                FrameRecord(
                    win.index,
                    win.start,
                    win.end,
                    n_scenes=len(m),
                    scenes=[a.id for a in m],
                    clear_fraction=0.0 if e else float(clear.mean()),
                )
            )
        backfill(frames, records, empty, fetched.get("all"))
        return FrameStack(
            data=frame_stack_array(np.stack(frames), area, windows, sensor.bands),
            frames=records,
            provider=self.name,
            provider_version=self.version,
            extra={
                "endpoint": self.endpoint,
                "project": self.project,
                "requests": counters.requests,
                "retries": counters.retries,
                "splits": counters.splits,
                "scenes_in_range": len(acqs),
                "granules_in_range": len(granules.get("system:index", [])),
                "granules_merged": sum(len(a.granules) - 1 + len(a.superseded) for a in acqs),
                # The granules used, by id, with their generation time (a re-processed
                # delivery is a new id): the stale sensor and the audit list them again,
                # many tile-years per request (scene_indexes), and compare.
                SCENE_INDEX_KEY: scene_index_record(granule_stamps(granules, acqs)),
            },
        )


class _TimedOut(Exception):
    """Earth Engine answered "Computation timed out." for a request."""
