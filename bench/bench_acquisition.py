#!/usr/bin/env python
"""Acquisition of tile-years by the ``stac`` provider from a loopback archive (issue 28, item 7).

One worker (one process, the provider's own read thread pool, ``read_workers`` threads)
fetches a tile-year (T frames over a calendar year) from the offline test bed of
``agrifm_pipeline_tests/stac_testbed.py``: a real stac-fastapi-pgstac API on the local
PostgreSQL, per-band COGs in moto's S3, both behind the fault front, which adds a fixed
first-byte latency to every answer (the search, every Range request).

The archive is made to look like Sentinel-2 L2A as Earth Search serves it, cut down to
fit: each granule ``--size`` px per 10 m band (20 m bands and SCL half that), written by
GDAL's COG driver in 1024 px DEFLATE blocks (predictor 2) with internal overviews; the
pixels are the bundled sample's real scenes repeated over the granule plus 6 bits of
noise, so that blocks do not compress to nothing. ``--granules`` items over the year
(one MGRS tile, a pass every 365/N days), with ``eo:cloud_cover`` cycling through a
spread of values, so some are left out by the scene filter, as in a real year; the item
JSON points at ``--distinct`` sets of files (the provider never caches between reads,
so reading one object for several items costs what reading several would).

The tile is a default 8.96 km tile (896 px at 10 m) placed across block boundaries.
For each latency it reports, per tile-year: the provider's requests and bytes
(``http_requests``/``http_bytes`` of the frame stack) and the front's, the bytes of the
COG blocks the tile needs (from each file's own block layout: the level-0 blocks that
intersect the window read, for every asset the provider asked for), their ratio, the
wall time, and tile-years per hour for the worker.

    nice python bench/bench_acquisition.py [--size 2048] [--granules 30] [--frames 8]
        [--latency-ms 0 20 60] [--repeats 2] [--read-workers 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import rasterio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agrifm_pipeline.frames import frame_windows  # noqa: E402
from agrifm_pipeline.providers.base import CloudMask  # noqa: E402
from agrifm_pipeline.providers.stac import StacProvider  # noqa: E402
from agrifm_pipeline.providers.stac_http import HEADER_BYTES  # noqa: E402
from agrifm_pipeline.specs import SensorSpec  # noqa: E402
from agrifm_pipeline.tiles import Tile  # noqa: E402
from agrifm_pipeline_tests.stac_testbed import (  # noqa: E402
    Archive,
    CogOptions,
    ItemSpec,
    Layer,
    bucket_name,
    earth_search_id,
    sample_scenes,
    scene_layers,
    stac_testbed,
)

COLLECTION = "bench-s2-l2a"
#: Sample scenes whose pixels fill the granules: partly cloudy to clear.
BASE_DATES = ("2019-06-10", "2019-04-26", "2019-09-18", "2019-03-07", "2019-04-11", "2019-08-24")
#: eo:cloud_cover of the items over the year, in turn (default cloudy_pct 30: 4 in 10 left out).
CLOUD_COVER = (5.0, 12.0, 45.0, 20.0, 80.0, 8.0, 35.0, 60.0, 15.0, 25.0)
#: A default tile (896 px at 10 m) inside the granule, across 1024 px block boundaries.
TILE_ID = "32631_8960m_E0065_N0626"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def granule_layers(date: str, size: int, seed: int) -> dict[str, Layer]:
    """A sample scene repeated over ``size`` px at 10 m (DN + 1000, baseline 05.10), 6 bits
    of noise on the reflectance bands."""
    sc = sample_scenes()[date]
    noise = np.random.default_rng(seed)
    out = {}
    for name, layer in scene_layers(sc, 1000).items():
        n = size if layer.values.shape[0] == sc.bands.shape[1] else size // 2
        reps = -(-n // layer.values.shape[0])
        values = np.tile(layer.values, (reps, reps))[:n, :n]
        if name != "SCL":
            values = np.where(
                values > 0, values + noise.integers(0, 64, values.shape, dtype=np.uint16), 0
            )
        out[name] = Layer(values.astype(layer.values.dtype), layer.transform, layer.crs)
    return out


def needed_block_bytes(path: Path, area: Any) -> tuple[int, int]:
    """(bytes, blocks) of the level-0 blocks of ``path`` that the window read for ``area``
    intersects (the window :func:`~agrifm_pipeline.providers.stac.read_onto` reads)."""
    a = area.affine
    h, w = area.shape
    with rasterio.open(path) as src:
        s = src.transform
        cols = np.floor((a.c + (np.arange(w) + 0.5) * a.a - s.c) / s.a).astype(np.int64)
        rows = np.floor((a.f + (np.arange(h) + 0.5) * a.e - s.f) / s.e).astype(np.int64)
        cols = cols[(cols >= 0) & (cols < src.width)]
        rows = rows[(rows >= 0) & (rows < src.height)]
        bh, bw = src.block_shapes[0]
        total = blocks = 0
        for by in range(int(rows.min()) // bh, int(rows.max()) // bh + 1):
            for bx in range(int(cols.min()) // bw, int(cols.max()) // bw + 1):
                total += int(src.get_tag_item(f"BLOCK_SIZE_{bx}_{by}", "TIFF", bidx=1))
                blocks += 1
    return total, blocks


def build(bed: Any, root: Path, args: argparse.Namespace) -> tuple[Archive, list[dict[str, Any]]]:
    """Write ``--distinct`` granules' COGs, make ``--granules`` items over 2019, publish."""
    archive = Archive(root, bucket_name(), CogOptions(block_size=1024, overviews="auto"))
    col = archive.collection(COLLECTION)
    scenes = sample_scenes()
    bases = []
    for k in range(args.distinct):
        date = BASE_DATES[k % len(BASE_DATES)]
        sc = scenes[date]
        iid = f"base-{k}"
        bases.append(
            archive.add(ItemSpec(sc, COLLECTION, iid, layers=granule_layers(date, args.size, k)))
        )
    items = []
    step = 365.0 / args.granules
    for j in range(args.granules):
        when = dt.datetime(2019, 1, 2, 10, 50, 31, tzinfo=dt.UTC) + dt.timedelta(days=j * step)
        craft = "sentinel-2a" if j % 2 == 0 else "sentinel-2b"
        item = copy.deepcopy(bases[j % len(bases)])
        item["id"] = earth_search_id(craft, "31UES", when)
        p = item["properties"]
        p["datetime"] = f"{when:%Y-%m-%dT%H:%M:%S.%fZ}"
        p["platform"] = craft
        p["eo:cloud_cover"] = CLOUD_COVER[j % len(CLOUD_COVER)]
        p["s2:datatake_id"] = f"G{craft[-2:].upper()}_{when:%Y%m%dT%H%M%S}_{j:06d}_N05.10"
        items.append(item)
    archive.items = items
    archive.publish(bed.s3, bed.api, [col])
    return archive, items


class _RangeLog:
    """Every range the provider's getter asks for (url, start, end), to count reads per
    file: each read of an asset starts with its header request (offset 0)."""

    def __init__(self) -> None:
        import threading

        from agrifm_pipeline.providers import stac_http

        self.entries: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()
        original = stac_http.RangeGetter.get
        log = self

        def get(getter: Any, url: str, start: int, end: int, counters: Any) -> Any:
            with log._lock:
                log.entries.append((url, start, end))
            return original(getter, url, start, end, counters)

        stac_http.RangeGetter.get = get  # type: ignore[method-assign,assignment]

    def take(self) -> list[tuple[str, int, int]]:
        with self._lock:
            out, self.entries = self.entries, []
        return out


def run_one(front: Any, area: Any, args: argparse.Namespace) -> tuple[float, Any]:
    src = StacProvider(api_url=front.url, collection=COLLECTION, read_workers=args.read_workers)
    windows = frame_windows(2019, args.frames)
    t0 = time.perf_counter()
    stack = src.fetch(area, windows, SensorSpec(), CloudMask())
    return time.perf_counter() - t0, stack


def _fetch_task(job: tuple[str, str, int, int]) -> dict[str, Any]:
    """One tile-year fetched on a dask worker (the provider built there, as the
    pipeline's resource is): wall time in the task, and the stack's counters."""
    url, tile_id, frames, read_workers = job
    src = StacProvider(api_url=url, collection=COLLECTION, read_workers=read_workers)
    area = Tile.from_id(tile_id).geobox(10)
    t0 = time.perf_counter()
    stack = src.fetch(area, frame_windows(2019, frames), SensorSpec(), CloudMask())
    wall = time.perf_counter() - t0
    return {"task_wall_s": wall, "http_requests": stack.extra["http_requests"],
            "http_bytes": stack.extra["http_bytes"], "pid": os.getpid()}  # fmt: skip


def on_dask(bed: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The same tile-years as tasks of a one-worker LocalCluster (``compute.Compute``,
    one process, one task thread: the provider's own pool inside it), one at a time."""
    from agrifm_pipeline.compute import Compute

    compute = Compute(local_cluster=True, n_workers=1, threads_per_worker=1)
    t0 = time.perf_counter()
    client = compute.client()
    startup = time.perf_counter() - t0
    out: dict[str, Any] = {"cluster": compute.describe(), "startup_s": round(startup, 2),
                           "runs": []}  # fmt: skip
    warm = bed.front()
    list(compute.map(_fetch_task, [(warm.url, TILE_ID, args.frames, args.read_workers)],
                     keys=["warm-up"]))  # fmt: skip
    for rep in range(args.repeats):
        for lat in args.latency_ms:
            front = bed.front(latency_s=lat / 1000.0)
            t1 = time.perf_counter()
            (res,) = list(compute.map(_fetch_task, [(front.url, TILE_ID, args.frames,
                                                     args.read_workers)],
                                      keys=[f"tile-year-{lat}-{rep}"]))  # fmt: skip
            wall = time.perf_counter() - t1
            rec = {"latency_ms": lat, "repeat": rep, "wall_s": round(wall, 3),
                   "task_wall_s": round(res["task_wall_s"], 3),
                   "tile_years_per_hour": round(3600.0 / wall, 1),
                   "provider_http_requests": res["http_requests"],
                   "provider_http_bytes": res["http_bytes"],
                   "front_cog_bytes": front.bytes_sent(r"\.tif"),
                   "worker_pid": res["pid"], "bench_pid": os.getpid(),
                   "load_average_after": loadavg()}  # fmt: skip
            out["runs"].append(rec)
            print("dask", json.dumps(rec), flush=True)
    client.close()
    for lat in args.latency_ms:
        mine = [r["wall_s"] for r in out["runs"] if r["latency_ms"] == lat]
        out.setdefault("summary", {})[str(lat)] = {
            "median_wall_s": round(statistics.median(mine), 3),
            "tile_years_per_hour": round(3600.0 / statistics.median(mine), 1),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048, help="granule side, px at 10 m")
    ap.add_argument("--granules", type=int, default=30, help="items over the year")
    ap.add_argument("--distinct", type=int, default=4, help="distinct sets of COG files")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0, 20, 60])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--read-workers", type=int, default=8)
    ap.add_argument("--dask", action="store_true", help="also on a one-worker LocalCluster")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    env = {
        "command": "nice python bench/bench_acquisition.py " + " ".join(sys.argv[1:]),
        "device_name": cpu_name(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "niceness": os.nice(0),
        "load_average_start": loadavg(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    area = Tile.from_id(TILE_ID).geobox(10)
    result: dict[str, Any] = {"env": env}
    with tempfile.TemporaryDirectory(prefix="bench-acq-") as tmp, stac_testbed() as bed:
        t0 = time.perf_counter()
        archive, _items = build(bed, Path(tmp), args)
        build_s = time.perf_counter() - t0
        files = {k: p for k, p in archive.files.items()}
        sizes = {k: p.stat().st_size for k, p in files.items()}
        need_cache: dict[str, tuple[int, int]] = {}

        def needed(key: str) -> tuple[int, int]:
            if key not in need_cache:
                need_cache[key] = needed_block_bytes(files[key], area)
            return need_cache[key]

        b2 = next(k for k in files if k.endswith("/blue.tif"))
        scl = next(k for k in files if k.endswith("/scl.tif"))
        with rasterio.open(files[b2]) as src:
            ovr = src.overviews(1)
            b2_shape, b2_blocks = src.shape, src.block_shapes[0]
        result["archive"] = {
            "granule_px_10m": args.size,
            "granule_px_20m": args.size // 2,
            "block_px": 1024,
            "compress": "DEFLATE, predictor 2",
            "overviews_10m": ovr,
            "granules_per_year": args.granules,
            "distinct_file_sets": args.distinct,
            "cloud_cover_cycle": list(CLOUD_COVER),
            "cloudy_pct": SensorSpec().cloudy_pct,
            "file_bytes_blue_10m": sizes[b2],
            "file_bytes_scl_20m": sizes[scl],
            "mean_file_bytes_10m_band": int(
                statistics.mean(
                    v
                    for k, v in sizes.items()
                    if k.rsplit("/", 1)[1] in ("blue.tif", "green.tif", "red.tif", "nir.tif")
                )
            ),
            "blue_shape": list(b2_shape),
            "blue_block_shape": list(b2_blocks),
            "tile": TILE_ID,
            "tile_px": list(area.shape),
            "frames": args.frames,
            "build_s": round(build_s, 1),
        }
        print(json.dumps(result["archive"], indent=1), flush=True)
        by_url = {f"/s3/{archive.bucket}/{k}": k for k in files}
        # Warm-up (imports, GDAL, the API's first query plan): not counted.
        ranges = _RangeLog()
        run_one(bed.front(), area, args)
        ranges.take()
        runs = []
        for rep in range(args.repeats):
            for lat in args.latency_ms:
                front = bed.front(latency_s=lat / 1000.0)
                load0 = loadavg()
                wall, stack = run_one(front, area, args)
                served = front.requests()
                tif = [r for r in served if r[1].split("?")[0] in by_url]
                sent = sum(r[3] for r in tif)
                got = ranges.take()
                # one read of an asset = one header request (offset 0) of its file
                asked = [by_url[urlsplit(u).path] for u, start, _ in got if start == 0]
                need = [needed(k) for k in asked]
                need_bytes = sum(n for n, _ in need)
                block_requests = len(got) - len(asked)
                x = stack.extra
                rec = {
                    "latency_ms": lat,
                    "repeat": rep,
                    "wall_s": round(wall, 3),
                    "tile_years_per_hour": round(3600.0 / wall, 1),
                    "provider_http_requests": x["http_requests"],
                    "provider_http_bytes": x["http_bytes"],
                    "retries": x["http_retries"],
                    "front_requests": len(served),
                    "front_search_requests": len([r for r in served if r[1].startswith("/search")]),
                    "front_cog_requests": len(tif),
                    "front_cog_bytes": sent,
                    "asset_reads": len(asked),
                    "asset_reads_scl": sum(1 for k in asked if k.endswith("/scl.tif")),
                    "header_requests": len(asked),
                    "block_requests": block_requests,
                    "needed_blocks": sum(b for _, b in need),
                    "needed_block_bytes": need_bytes,
                    "bytes_over_needed": round(sent / need_bytes, 3),
                    "bytes_over_needed_plus_headers": round(
                        sent / (need_bytes + sum(min(HEADER_BYTES, sizes[k]) for k in asked)), 3
                    ),
                    "items_found": x["items_found"],
                    "items_by_status": x["items_by_status"],
                    "load_average_before": load0,
                    "load_average_after": loadavg(),
                }
                runs.append(rec)
                print(json.dumps(rec), flush=True)
        if args.dask:
            result["dask_worker"] = on_dask(bed, args)
    summary = {}
    for lat in args.latency_ms:
        mine = [r for r in runs if r["latency_ms"] == lat]
        wall = statistics.median(r["wall_s"] for r in mine)
        summary[str(lat)] = {
            "median_wall_s": round(wall, 3),
            "tile_years_per_hour": round(3600.0 / wall, 1),
            "requests": mine[0]["provider_http_requests"],
            "bytes": mine[0]["provider_http_bytes"],
            "needed_block_bytes": mine[0]["needed_block_bytes"],
            "bytes_over_needed": mine[0]["bytes_over_needed"],
        }
    base = summary[str(args.latency_ms[0])]["median_wall_s"]
    for v in summary.values():
        v["wall_over_first_latency"] = round(v["median_wall_s"] / base, 2)
    result["runs"] = runs
    result["summary"] = summary
    env["load_average_end"] = loadavg()
    env["read_workers"] = args.read_workers
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
