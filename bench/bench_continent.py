#!/usr/bin/env python
"""The control plane at a continent-year: ``--tiles`` tile-years of one year, seeded as a
finished production run leaves them, then registered, ticked, audited and browsed.

    python bench/bench_continent.py --tiles 125000 --postgres postgresql+psycopg2://postgres@127.0.0.1:5432/cp_125k \
        [--year 2024] [--ui] [--json bench/results/bench_continent_125k.json]

What is seeded (writing records directly; no array is computed beyond one real tile-year):

* one real tile-year (synthetic source, the tiny reference checkpoint, one 32 px chip per
  tile: tiles of 320 m, so that a region of 125,000 tiles is a box of 113 x 113 km; the
  control plane's work depends on the number of tiles, not on their size);
* the store: for every other tile, each of the six tile-year assets' pointer and manifest
  (the lineage of the real tile-year rewritten for the tile, every fingerprint current),
  and each asset-year's index written once from them (what `verify` would rebuild);
* the Dagster instance (Postgres): one materialisation event per partition, written with
  the event log's batch insert (``store_event_batch``), runless;
* the registry and the ``tiles`` dynamic partitions: **measured**, through the region
  sensor over one GeoJSON covering exactly the tiles, the partitions added as the daemon
  does with the tick's request.

Then measured: the stale sensor's tick with nothing stale (twice, the cursor carried),
the stale sensor's tick after a checkpoint change that makes every grid stale (a copy of
the tiny checkpoint with one weight changed), the audit of the year (time, peak RSS of a
child process that does only the audit), and with ``--ui`` the webserver's pages in
headless Chromium (``bench/ui_timing.js``, playwright-core). ``uptime`` is recorded beside
every figure. Results are written after every phase (a killed run keeps what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ZARR = ("s2_frame_stack", "normalized_tensors", "agrifm_embedding_grid", "agrifm_embedding_int8")
FILES = {"chip_embeddings": "chips.parquet", "embedding_preview": "preview.png"}
TILE_M = 320  # 32 px chips at 10 m, one chip per tile


def load() -> str:
    return " ".join(os.getloadavg().__repr__().strip("()").split(", ")[:3])


def rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Out(dict):
    def __init__(self, path: str | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.path = path

    def put(self, key: str, value: Any) -> None:
        if isinstance(value, dict):
            value = {**value, "load": load()}
        self[key] = value
        print(key, json.dumps(value), flush=True)
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps(self, indent=1))


def region_box(n: int) -> tuple[Any, int, int]:
    """A box in EPSG:32632 of about ``n`` tiles (cols x rows), its tiles' interiors only."""
    import math

    import shapely

    cols = max(1, round(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    c0, r0 = 1500, 16000  # 480 km E, 5,120 km N: central Europe in zone 32
    box = shapely.box(
        c0 * TILE_M + 1, r0 * TILE_M + 1, (c0 + cols) * TILE_M - 1, (r0 + rows) * TILE_M - 1
    )
    return box, cols, rows


def instance_yaml(home: Path, postgres: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_url: " + json.dumps(postgres) + "\n"
        "run_coordinator:\n  module: dagster.core.run_coordinator\n"
        "  class: QueuedRunCoordinator\n"
        "concurrency:\n  runs:\n    max_concurrent_runs: 8\n"
        "telemetry:\n  enabled: false\n"
    )


def changed_checkpoint(src: Path, dst: Path) -> None:
    """The tiny checkpoint with one weight nudged: usable, another sha256."""
    import torch

    obj = torch.load(src, map_location="cpu", weights_only=False)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    for _k, v in sd.items():
        if hasattr(v, "dtype") and v.dtype.is_floating_point and v.numel():
            v.view(-1)[0] += 1e-3
            break
    torch.save(obj, dst)


def seed_store(storage: Any, ids: list[str], year: int, template: dict[str, Any]) -> dict:
    """Pointers and manifests of every tile's six partitions, then each index once."""
    import hashlib

    from agrifm_pipeline.lineage import lineage_record
    from agrifm_pipeline.storage.fs import _loads  # noqa: F401
    from agrifm_pipeline.storage.index import _index_entry, shards_for
    from agrifm_pipeline.storage.versions import MANIFEST, POINTER, new_version_id

    entries: dict[str, dict[str, Any]] = {a: {} for a in (*ZARR, *FILES)}
    versions: dict[tuple[str, str], str] = {}
    for tile in ids:
        for asset in (*ZARR, *FILES):
            store = storage.stage_store(asset)
            manifest0, pointer0 = template[asset]
            if tile == ids[0]:
                entries[asset][tile] = _index_entry(pointer0)
                versions[(asset, tile)] = pointer0["version"]
                continue
            lin = json.loads(json.dumps(manifest0["lineage"]))
            lin.update(tile=tile, year=year)
            for rec in lin.get("inputs", {}).values():
                if isinstance(rec, dict) and rec.get("version") and rec.get("asset") in ZARR:
                    rec["version"] = versions[(rec["asset"], tile)]
            vid = new_version_id()
            manifest = {**manifest0, "tile": tile, "version": vid, "lineage": lin}
            raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
            part = Path(store.partition_path(year, tile))
            (part / vid).mkdir(parents=True, exist_ok=True)
            (part / vid / MANIFEST).write_bytes(raw)
            pointer = {
                **pointer0,
                "version": vid,
                "manifest_sha256": hashlib.sha256(raw).hexdigest(),
                "summary": lineage_record(lin),
                "history": [],
            }
            (part / POINTER).write_bytes(json.dumps(pointer).encode())
            entries[asset][tile] = _index_entry(pointer)
            versions[(asset, tile)] = vid
    for asset, ent in entries.items():
        store = storage.stage_store(asset)
        store._merge_index(str(year), ent, shards=shards_for(len(ent)), complete=True, replace=True)
    return versions


def seed_events(
    instance: Any, ids: list[str], year: int, versions: dict, block_side: int = 1
) -> int:
    """One materialisation per partition (a tile's, or a block's naming each of its
    tiles' versions, as a block run records them); returns how many per asset."""
    import dagster as dg
    from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
    from dagster._core.events.log import EventLogEntry
    from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID

    from agrifm_pipeline.defs.partitions import tile_year_key
    from agrifm_pipeline.tiles import partition_unit

    units: dict[str, list[str]] = {}
    for tile in ids:
        units.setdefault(partition_unit(tile, block_side), []).append(tile)
    for asset in (*ZARR, *FILES):
        batch = []
        for unit, tiles in units.items():
            if block_side == 1:
                metadata: dict[str, Any] = {"version": versions[(asset, unit)]}
            else:
                made = {t: versions[(asset, t)] for t in tiles}
                metadata = {
                    "tiles_made": len(made),
                    "versions": dg.MetadataValue.json(made),
                    "tiles": dg.MetadataValue.json({t: {"version": v} for t, v in made.items()}),
                }
            mat = dg.AssetMaterialization(
                dg.AssetKey(asset), partition=str(tile_year_key(unit, year)), metadata=metadata
            )
            batch.append(
                EventLogEntry(
                    error_info=None,
                    level="debug",
                    user_message="",
                    run_id=RUNLESS_RUN_ID,
                    timestamp=time.time(),
                    dagster_event=DagsterEvent(
                        event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
                        job_name=RUNLESS_JOB_NAME,
                        event_specific_data=StepMaterializationData(mat),
                    ),
                )
            )
            if len(batch) == 2000:
                instance.event_log_storage.store_event_batch(batch)
                batch = []
        if batch:
            instance.event_log_storage.store_event_batch(batch)
    return len(units)


def audit_child(home: str, tmp: str, year: int, q: Any) -> None:
    """The audit of the year streamed to a CSV file, as ``agrifm-pipeline audit --format
    csv > file`` does it, counting statuses on the way."""
    import dagster as dg

    from agrifm_pipeline.audit import write_rows
    from agrifm_pipeline.defs.audit import iter_audit_rows
    from agrifm_pipeline.defs.staleness import current_fingerprints, stage_stores

    resources = _resources(Path(tmp), TINY)
    statuses: dict[str, int] = {}

    def counted(rows: Any) -> Any:
        for r in rows:
            statuses[r.status] = statuses.get(r.status, 0) + 1
            yield r

    with dg.DagsterInstance.from_config(home) as instance:
        current, unknown, _ = current_fingerprints(
            resources["tile_year"], resources["s2"], resources["model"]
        )
        t = time.perf_counter()
        rows = iter_audit_rows(
            instance, stage_stores(resources["storage"]), current, unknown=unknown, year=year
        )
        with open(Path(tmp) / "audit.csv", "w", newline="") as fh:
            n = write_rows(counted(rows), "csv", fh)
        s = time.perf_counter() - t
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a spawned child would
    # report its parent's peak when that is higher.
    q.put({"s": round(s, 1), "rows": n, "statuses": statuses, "peak_rss_mb": peak_rss(os.getpid())})


TINY = ROOT / "agrifm_pipeline_tests" / "fixtures" / "agrifm" / "tiny_p444.pth"


def _resources(tmp: Path, ckpt: Path, block_side: int = 1) -> dict[str, Any]:
    from agrifm_pipeline.defs.resources import AgriFMModel, S2Source, TileYearConfig, ZarrStorage

    os.environ["RS_EMBED_AGRIFM_CKPT_MIN_BYTES"] = "1000"
    return {
        "tile_year": TileYearConfig(
            chip_px=32, chips_per_side=1, image_size=32, n_frames=4, block_side=block_side
        ),
        "s2": S2Source(backend="synthetic"),
        "model": AgriFMModel(checkpoint=str(ckpt), device="cpu"),
        "storage": ZarrStorage(root=str(tmp / "store"), regions_dir=str(tmp / "regions")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--year", type=int, default=2024)
    ap.add_argument("--postgres", required=True, help="an empty database's URL")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dir", default=None, help="work directory (default: a new temporary one)")
    ap.add_argument("--ui", action="store_true", help="time the webserver's pages in Chromium")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip")
    ap.add_argument(
        "--block-side",
        type=int,
        default=1,
        help="tiles per side of a partition (1: tile partitions; 8: 64-tile blocks)",
    )
    ap.add_argument(
        "--reuse", action="store_true", help="judge what an earlier run seeded in --dir again"
    )
    ap.add_argument(
        "--reindex", action="store_true", help="rebuild each asset-year's index first (verify)"
    )
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    os.environ.setdefault("AGRIFM_PIPELINE_MAX_REGION_TILES", str(max(10_000, 2 * args.tiles)))

    import dagster as dg
    import geopandas as gpd

    from agrifm_pipeline.definitions import build_defs
    from agrifm_pipeline.defs.partitions import TILES_TAG, tile_year_key
    from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
    from agrifm_pipeline.defs.sensors import region_files_sensor, stale_partitions_sensor
    from agrifm_pipeline.storage.versions import POINTER  # noqa: F401
    from agrifm_pipeline.tiles import partition_unit

    tmp = Path(args.dir or tempfile.mkdtemp(prefix="agrifm-continent-"))
    tmp.mkdir(parents=True, exist_ok=True)
    home = tmp / "dagster"
    instance_yaml(home, args.postgres)
    out = Out(
        args.json,
        tiles=args.tiles,
        block_side=args.block_side,
        year=args.year,
        dir=str(tmp),
        command=" ".join(["python", *sys.argv]),
        machine={"platform": platform.platform(), "cpus": os.cpu_count()},
        load_at_start=load(),
    )
    resources = _resources(tmp, TINY, args.block_side)
    storage = resources["storage"]
    year = args.year
    with dg.DagsterInstance.from_config(str(home)) as instance:
        if not args.reuse:
            # 1. Register the region through the region sensor, as the daemon would.
            box, _cols, _rows = region_box(args.tiles)
            regions = Path(storage.regions_dir)
            regions.mkdir(parents=True, exist_ok=True)
            gpd.GeoDataFrame({"name": ["continent"]}, geometry=[box], crs="EPSG:32632").to_file(
                regions / "continent.geojson", driver="GeoJSON"
            )
            t = time.perf_counter()
            result = region_files_sensor(
                dg.build_sensor_context(instance=instance, resources=resources)
            )
            tick_s = time.perf_counter() - t
            t = time.perf_counter()
            for req in getattr(result, "dynamic_partitions_requests", None) or []:
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
            add_s = time.perf_counter() - t
            t = time.perf_counter()
            again = region_files_sensor(
                dg.build_sensor_context(instance=instance, resources=resources)
            )
            next_s = time.perf_counter() - t
            ids = storage.registry().tiles_of("continent")
            unit = partition_unit(ids[0], args.block_side)  # the template tile's partition
            out.put(
                "register_region",
                {
                    "tiles": len(ids),
                    "partition_keys": len(instance.get_dynamic_partitions("tiles")),
                    "sensor_tick_s": round(tick_s, 2),
                    "add_partitions_s": round(add_s, 2),
                    "whole_s": round(tick_s + add_s, 2),
                    "next_tick_s": round(next_s, 2),
                    "next_tick": getattr(again, "skip_message", None) or str(again)[:100],
                },
            )
            if "seed" in skip:  # registration only (e.g. at 125,000 tiles on a busy host)
                out.put("load_at_end", {"uptime": load()})
                return
            # 2. One real tile-year, the template.
            t = time.perf_counter()
            defs = build_defs(resources)
            res = defs.resolve_job_def("embed_tile_years").execute_in_process(
                instance=instance,
                tags={
                    RANGE_START: str(tile_year_key(unit, year)),
                    RANGE_END: str(tile_year_key(unit, year)),
                    **({TILES_TAG: ids[0]} if unit != ids[0] else {}),
                },
            )
            assert res.success
            template = {}
            for asset in (*ZARR, *FILES):
                store = storage.stage_store(asset)
                pointer = store.pointer(year, ids[0])
                v = store.current(year, ids[0])
                template[asset] = (store.manifest(v), pointer)
            real_s = time.perf_counter() - t
            # 3. The store and the instance, as the finished run leaves them.
            t = time.perf_counter()
            versions = seed_store(storage, ids, year, template)
            store_s = time.perf_counter() - t
            t = time.perf_counter()
            n_events = seed_events(instance, ids, year, versions, args.block_side)
            events_s = time.perf_counter() - t
            out.put(
                "seed",
                {
                    "real_tile_year_s": round(real_s, 1),
                    "store_s": round(store_s, 1),
                    "events_s": round(events_s, 1),
                    "store_partitions": len(ZARR + tuple(FILES)) * len(ids),
                    "dagster_events": len(ZARR + tuple(FILES)) * n_events,
                },
            )
        else:  # an instance and store seeded by an earlier run, as they are
            ids = storage.registry().tiles_of("continent")
            unit = partition_unit(ids[0], args.block_side)
        if args.reindex:  # what `agrifm-pipeline verify` does to each index: rebuilt
            from agrifm_pipeline.storage.index import _INDEXED_YEARS

            t = time.perf_counter()
            counts = {a: storage.stage_store(a).rebuild_index(year) for a in (*ZARR, *FILES)}
            shards = {
                a: _INDEXED_YEARS.get((storage.stage_store(a).url, str(year))) for a in counts
            }
            out.put(
                "reindex",
                {"s": round(time.perf_counter() - t, 1), "partitions": counts, "shards": shards},
            )
        # 4. The stale sensor, nothing stale; twice, the cursor carried.
        cursor = None
        for name in ("stale_tick_nothing_stale_1", "stale_tick_nothing_stale_2"):
            ctx = dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor)
            t = time.perf_counter()
            r = stale_partitions_sensor(ctx)
            s = time.perf_counter() - t
            cursor = r.cursor if isinstance(r, dg.SensorResult) else cursor
            out.put(
                name,
                {
                    "s": round(s, 2),
                    "run_requests": len(getattr(r, "run_requests", None) or []),
                    "skip": str(getattr(getattr(r, "skip_reason", None), "skip_message", ""))[:120],
                    "rss_mb": rss_mb(),
                },
            )
        # 5. The audit of the year, in a child process (its own peak memory).
        if "audit" not in skip:
            import multiprocessing as mp

            q = mp.get_context("spawn").Queue()
            p = mp.get_context("spawn").Process(
                target=audit_child, args=(str(home), str(tmp), year, q)
            )
            t = time.perf_counter()
            p.start()
            got = q.get()
            p.join()
            got["wall_s_with_start"] = round(time.perf_counter() - t, 1)
            out.put("audit", got)
        # 6. The UI.
        if args.ui:
            out.put("ui", ui(home, tmp, unit, year))
        # 7. A checkpoint change: every grid stale.
        if "stale" not in skip:
            ck = tmp / "changed.pth"
            changed_checkpoint(TINY, ck)
            changed = _resources(tmp, ck, args.block_side)
            ctx = dg.build_sensor_context(instance=instance, resources=changed, cursor=cursor)
            t = time.perf_counter()
            r = stale_partitions_sensor(ctx)
            s = time.perf_counter() - t
            reqs = getattr(r, "run_requests", None) or []
            assets = sorted({a.to_user_string() for q in reqs for a in q.asset_selection or []})
            n = sum(int(q.tags.get("agrifm/n_tile_years", 0)) for q in reqs)
            out.put(
                "stale_tick_checkpoint_changed",
                {
                    "s": round(s, 2),
                    "run_requests": len(reqs),
                    "tile_years_requested": n,
                    "assets": assets,
                    "max_tile_years_per_run": max(
                        (int(q.tags.get("agrifm/n_tile_years", 0)) for q in reqs), default=0
                    ),
                    "cursor_bytes": len(r.cursor or "") if isinstance(r, dg.SensorResult) else 0,
                    "rss_mb": rss_mb(),
                },
            )
    out.put("load_at_end", {"uptime": load()})


def ui(home: Path, tmp: Path, tile: str, year: int) -> dict[str, Any]:
    """Start the webserver on loopback over the instance; time pages in headless Chromium."""
    import socket
    import urllib.request

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "DAGSTER_HOME": str(home), "AGRIFM_BENCH_TMP": str(tmp)}
    log = open(tmp / "webserver.log", "w")  # noqa: SIM115 - the webserver writes it until it stops
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dagster_webserver",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-m",
            "bench_continent_defs",
            "-d",
            str(ROOT / "bench"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    out: dict[str, Any] = {}
    try:
        t = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5)
                break
            except Exception:
                if proc.poll() is not None or time.perf_counter() - t > 300:
                    raise RuntimeError((tmp / "webserver.log").read_text()[-2000:]) from None
                time.sleep(1)
        out["webserver_start_s"] = round(time.perf_counter() - t, 1)
        from agrifm_pipeline.defs.partitions import tile_year_key

        key = str(tile_year_key(tile, year))
        js = subprocess.run(
            ["node", str(ROOT / "bench" / "ui_timing.js"), f"http://127.0.0.1:{port}", key],
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, "NODE_PATH": os.environ.get("NODE_PATH", "/tmp/pw/node_modules")},
        )
        out["pages"] = json.loads(js.stdout.strip().splitlines()[-1]) if js.stdout else None
        if js.returncode:
            out["pages_error"] = js.stderr[-1500:]
        out["webserver_peak_rss_mb"] = peak_rss(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return out


def peak_rss(pid: int) -> float | None:
    """VmHWM of a process and its children (the code server is a child of the webserver)."""
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return round(total, 1) if total else None


if __name__ == "__main__":
    main()
