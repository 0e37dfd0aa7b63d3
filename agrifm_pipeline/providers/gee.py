"""Google Earth Engine as a Sentinel-2 source, through ``earthengine-api``.

Server side, per request: the collection (``COPERNICUS/S2_SR_HARMONIZED`` by
default) filtered by the area, the range and ``CLOUDY_PIXEL_PERCENTAGE <=
cloudy_pct``; each scene masked per pixel by its SCL band (the CloudMask's
classes; nothing with ``mode="none"``, the peer's behaviour); then for every
frame window the median (or most-recent-clear mosaic) of the window's scenes
plus a per-pixel count of clear observations, and the same for the whole range
(the back-fill source). All of it is one multi-band image, fetched with
``ee.data.computePixels`` on the area's own grid — its UTM CRS and affine
transform at true ``scale_m`` metres, not Web Mercator.

Client side: requests are split into blocks of the grid so that each stays
within Earth Engine's limits (48 MB uncompressed, 32768 px a side), run with
bounded concurrency (below Earth Engine's 40 concurrent requests per
endpoint), retried with exponential backoff and jitter on 429, 5xx and quota
errors, and reassembled exactly. Empty windows are back-filled by the
contract's rule and every frame is recorded.

The client library's own retry loop is switched off (``ee.data.setMaxRetries(0)``)
so that attempts are ours to count, bound and report.

Earth Engine's client keeps its connection settings process-wide; one process
talks to one endpoint and project at a time.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from odc.geo.geobox import GeoBox

from agrifm_pipeline.compositing import backfill_sources
from agrifm_pipeline.errors import ProviderError, SettingsError
from agrifm_pipeline.frames import FrameWindow
from agrifm_pipeline.providers.base import CloudMask, FrameRecord, FrameStack, frame_stack_array
from agrifm_pipeline.specs import SensorSpec

DEFAULT_ENDPOINT = "https://earthengine.googleapis.com"
HIGH_VOLUME_ENDPOINT = "https://earthengine-highvolume.googleapis.com"
MAX_REQUEST_BYTES = 48 * 1024 * 1024
MAX_REQUEST_SIDE = 32768
DEFAULT_MAX_CONCURRENT = 8
EE_CONCURRENCY_QUOTA = 40
_RETRYABLE = (
    "too many requests",
    "quota",
    "rate limit",
    "resource_exhausted",
    "resource exhausted",
    "service unavailable",
    "unavailable",
    "internal error",
    "internal server error",
    "bad gateway",
    "gateway timeout",
    "deadline",
    "timed out",
    "try again",
    "http 429",
    "http 5",
)

T = TypeVar("T")

_INIT_LOCK = threading.Lock()
_INITIALISED: tuple[Any, ...] | None = None


def is_retryable(exc: BaseException) -> bool:
    """Whether an Earth Engine error is transient (quota, rate, 5xx) rather than a bad request."""
    text = str(exc).lower()
    return any(marker in text for marker in _RETRYABLE)


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


class EarthEngineProvider:
    """Sentinel-2 frame stacks from Earth Engine (see the module docstring)."""

    name = "gee"

    def __init__(
        self,
        *,
        project: str | None = None,
        service_account_key: str | Path | None = None,
        credentials: Any = None,
        endpoint: str = "default",
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_attempts: int = 6,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import ee

        if not 1 <= max_concurrent < EE_CONCURRENCY_QUOTA:
            raise SettingsError(
                f"max_concurrent={max_concurrent}; use 1..{EE_CONCURRENCY_QUOTA - 1} "
                f"(Earth Engine allows {EE_CONCURRENCY_QUOTA} concurrent requests per endpoint)"
            )
        if max_attempts < 1:
            raise SettingsError(f"max_attempts={max_attempts}; use 1 or more")
        self.project = project
        self.endpoint = {"default": DEFAULT_ENDPOINT, "highvolume": HIGH_VOLUME_ENDPOINT}.get(
            endpoint, endpoint
        )
        self.max_concurrent = max_concurrent
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._credentials = credentials
        self._key = Path(service_account_key) if service_account_key else None
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "in_flight_max": 0}
        self._in_flight = 0
        self.version = f"earthengine-api {ee.__version__}"

    # -- connection ----------------------------------------------------------------------
    def _resolve_credentials(self) -> Any:
        import ee

        if self._credentials is not None:
            return self._credentials
        if self._key is not None:
            if not self._key.is_file():
                raise ProviderError(f"service-account key {self._key} does not exist")
            import json

            try:
                email = json.loads(self._key.read_text())["client_email"]
            except (ValueError, KeyError) as exc:
                raise ProviderError(
                    f"{self._key} is not a service-account key file (no client_email)"
                ) from exc
            return ee.ServiceAccountCredentials(email, str(self._key))
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
                f"application-default credentials (gcloud auth application-default login): {exc}"
            ) from exc
        self.project = self.project or default_project
        return creds

    def initialise(self) -> None:
        """``ee.Initialize`` once per (endpoint, project, credentials) in this process."""
        global _INITIALISED
        import ee

        with _INIT_LOCK:
            creds = self._resolve_credentials()
            key = (self.endpoint, self.project, id(creds))
            if key == _INITIALISED:
                return
            if not self.project:
                raise ProviderError("no Earth Engine project; pass project=<cloud project id>")
            try:
                ee.Initialize(credentials=creds, project=self.project, opt_url=self.endpoint)
            except Exception as exc:  # ee raises EEException, HttpError, transport errors
                raise ProviderError(
                    f"Earth Engine initialisation at {self.endpoint} failed: {exc}"
                ) from exc
            ee.data.setMaxRetries(0)  # we retry ourselves, countably
            _INITIALISED = key

    # -- requests -----------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one request under the concurrency bound, retrying transient failures."""
        for attempt in range(1, self.max_attempts + 1):
            with self._slots:
                with self._lock:
                    self._in_flight += 1
                    self.stats["requests"] += 1
                    self.stats["in_flight_max"] = max(self.stats["in_flight_max"], self._in_flight)
                try:
                    return fn()
                except Exception as exc:  # the client raises EEException and transport errors
                    if not is_retryable(exc):
                        raise ProviderError(
                            f"Earth Engine refused {what}: {exc}{_hint(exc)}"
                        ) from exc
                    if attempt == self.max_attempts:
                        raise ProviderError(
                            f"Earth Engine kept failing {what} after {attempt} attempts: {exc}; "
                            "lower RS_EMBED_AGRIFM_FETCH_WORKERS or try later"
                        ) from exc
                finally:
                    with self._lock:
                        self._in_flight -= 1
            with self._lock:
                self.stats["retries"] += 1
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
            self._sleep(delay + random.uniform(0, delay))
        raise AssertionError("unreachable")

    # -- the expression -----------------------------------------------------------------
    def _collection(
        self, area: GeoBox, start: dt.date, end: dt.date, sensor: SensorSpec, cloud_mask: CloudMask
    ) -> Any:
        import ee

        bbox = area.extent.boundingbox
        region = ee.Geometry.Rectangle(
            [bbox.left, bbox.bottom, bbox.right, bbox.top], str(area.crs), False
        )
        col = (
            ee.ImageCollection(sensor.collection)
            .filterBounds(region)
            .filterDate(start.isoformat(), end.isoformat())
            .filter(ee.Filter.lte("CLOUDY_PIXEL_PERCENTAGE", sensor.cloudy_pct))
        )
        classes = list(cloud_mask.scl_classes) if cloud_mask.mode == "scl" else []
        nodata = [0]  # SCL 0 is no data whatever the mask

        def mask(img: Any) -> Any:
            masked = sorted(set(classes) | set(nodata))
            keep = img.select("SCL").remap(masked, [0] * len(masked), 1)
            return img.updateMask(keep)

        return col.map(mask)

    def _frame_image(self, col: Any, sensor: SensorSpec, tag: str) -> Any:
        import ee

        bands = list(sensor.bands)
        if sensor.composite == "median":
            comp = col.select(bands).median()
        else:  # most recent clear on top
            comp = col.sort("system:time_start").select(bands).mosaic()
        comp = comp.unmask(sensor.fill_value).toUint16().rename([f"{tag}_{b}" for b in bands])
        count = col.select(bands[0]).count().unmask(0).toUint16().rename(f"{tag}_count")
        return ee.Image.cat([comp, count])

    def build_request(
        self,
        area: GeoBox,
        windows: Sequence[FrameWindow],
        sensor: SensorSpec,
        cloud_mask: CloudMask,
    ) -> tuple[Any, list[str], Any]:
        """(image, band ids, per-window scene counts as an ee.List) for a fetch."""
        import ee

        start, end = windows[0].start, windows[-1].end
        col = self._collection(area, start, end, sensor, cloud_mask)
        images, band_ids = [], []
        sizes = []
        for win in windows:
            part = col.filterDate(win.start.isoformat(), win.end.isoformat())
            images.append(self._frame_image(part, sensor, f"f{win.index}"))
            band_ids += [f"f{win.index}_{b}" for b in sensor.bands] + [f"f{win.index}_count"]
            sizes.append(part.size())
        images.append(self._frame_image(col, sensor, "all"))
        band_ids += [f"all_{b}" for b in sensor.bands] + ["all_count"]
        sizes.append(col.size())
        return ee.Image.cat(images), band_ids, ee.List(sizes)

    # -- pixels -------------------------------------------------------------------------
    @staticmethod
    def blocks(area: GeoBox, n_bands: int, bytes_per_value: int = 2) -> list[tuple[slice, slice]]:
        """Split the grid into row/column blocks each within Earth Engine's request limits."""
        h, w = area.shape
        max_px = MAX_REQUEST_BYTES // (n_bands * bytes_per_value)
        side = min(MAX_REQUEST_SIDE, max(1, math.isqrt(max_px)))
        ny, nx = math.ceil(h / side), math.ceil(w / side)
        # Even blocks: split as equally as possible.
        rows = np.linspace(0, h, ny + 1).round().astype(int)
        cols = np.linspace(0, w, nx + 1).round().astype(int)
        out = []
        for r0, r1 in itertools.pairwise(rows):
            for c0, c1 in itertools.pairwise(cols):
                if (r1 - r0) * (c1 - c0) * n_bands * bytes_per_value > MAX_REQUEST_BYTES:
                    raise AssertionError("block split exceeds the request limit")
                out.append((slice(int(r0), int(r1)), slice(int(c0), int(c1))))
        return out

    def _pixels(
        self, image: Any, band_ids: list[str], area: GeoBox, block: tuple[slice, slice]
    ) -> np.ndarray:
        import ee

        sub = area[block]
        a = sub.affine
        params = {
            "expression": image,
            "fileFormat": "NUMPY_NDARRAY",
            "bandIds": band_ids,
            "grid": {
                "dimensions": {"width": int(sub.shape[1]), "height": int(sub.shape[0])},
                "affineTransform": {
                    "scaleX": a.a,
                    "shearX": a.b,
                    "translateX": a.c,
                    "shearY": a.d,
                    "scaleY": a.e,
                    "translateY": a.f,
                },
                "crsCode": str(area.crs),
            },
        }
        arr = self._call(f"computePixels {sub.shape} px", lambda: ee.data.computePixels(params))
        if arr.shape != tuple(sub.shape):
            raise ProviderError(
                f"Earth Engine returned {arr.shape} px for a {tuple(sub.shape)} request"
            )
        return np.stack([arr[b] for b in band_ids]).astype(np.uint16)  # (bands, h, w)

    def fetch(
        self,
        area: GeoBox,
        windows: Sequence[FrameWindow],
        sensor: SensorSpec,
        cloud_mask: CloudMask,
    ) -> FrameStack:
        self.initialise()
        image, band_ids, sizes = self.build_request(area, windows, sensor, cloud_mask)
        counts = self._call("scene counts", sizes.getInfo)
        blocks = self.blocks(area, len(band_ids))
        h, w = area.shape
        full = np.zeros((len(band_ids), h, w), dtype=np.uint16)
        with ThreadPoolExecutor(max_workers=min(self.max_concurrent, len(blocks))) as pool:
            parts = pool.map(lambda blk: (blk, self._pixels(image, band_ids, area, blk)), blocks)
            for (rows, cols), values in parts:
                full[:, rows, cols] = values
        return self._assemble(full, counts, area, windows, sensor)

    def _assemble(
        self,
        full: np.ndarray,
        counts: list[int],
        area: GeoBox,
        windows: Sequence[FrameWindow],
        sensor: SensorSpec,
    ) -> FrameStack:
        c = len(sensor.bands)
        per = c + 1
        frames: list[np.ndarray] = []
        records: list[FrameRecord] = []
        for i, win in enumerate(windows):
            block = full[i * per : (i + 1) * per]
            clear = block[c] > 0
            frames.append(block[:c])
            records.append(
                FrameRecord(
                    win.index,
                    win.start,
                    win.end,
                    n_scenes=int(counts[i]),
                    clear_fraction=float(clear.mean()),
                )
            )
        whole = full[len(windows) * per : (len(windows) + 1) * per]
        whole_clear = whole[c] > 0
        empty = [r.clear_fraction == 0.0 for r in records]
        if all(empty):
            raise ProviderError(
                f"no clear observation of {area.crs} {tuple(area.extent.boundingbox)} in "
                f"[{windows[0].start}, {windows[-1].end}) ({int(counts[-1])} scenes pass "
                f"cloudy_pct <= {sensor.cloudy_pct}); widen the range or raise cloudy_pct"
            )
        for i, source in enumerate(backfill_sources(empty, bool(whole_clear.any()))):
            if source is None:
                continue
            records[i].backfilled, records[i].backfill_source = True, source
            if source == "whole_range":
                frames[i], records[i].clear_fraction = whole[:c], float(whole_clear.mean())
            else:
                j = int(source.split(":")[1])
                frames[i], records[i].clear_fraction = frames[j], records[j].clear_fraction
        return FrameStack(
            data=frame_stack_array(np.stack(frames), area, windows, sensor.bands),
            frames=records,
            provider=self.name,
            provider_version=self.version,
            extra={
                "endpoint": self.endpoint,
                "project": self.project,
                "requests": self.stats["requests"],
                "retries": self.stats["retries"],
                "scenes_in_range": int(counts[-1]),
            },
        )

    def fetch_many(
        self,
        areas: Sequence[GeoBox],
        windows: Sequence[FrameWindow],
        sensor: SensorSpec,
        cloud_mask: CloudMask,
        workers: int | None = None,
    ) -> list[FrameStack]:
        """Several areas at once (``RS_EMBED_AGRIFM_FETCH_WORKERS`` areas in flight); order kept."""
        from agrifm_pipeline.settings import load_settings

        n = workers or load_settings().fetch_workers
        with ThreadPoolExecutor(max_workers=max(1, min(n, len(areas)))) as pool:
            return list(pool.map(lambda a: self.fetch(a, windows, sensor, cloud_mask), areas))
