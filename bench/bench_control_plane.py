#!/usr/bin/env python
"""The control plane at scale: sensor ticks and the audit over thousands of tile-years.

One tile-year is materialised for real (synthetic source, the tiny reference
checkpoint, one 32 px chip per tile), then its committed versions are written
again, through the storage API, for ``--tiles`` x ``--years`` tile-years (lineage
rewritten for each tile and year; every fingerprint stays current), and each
partition's materialisation is reported to the Dagster instance. One region owns
all the tiles. Then each sensor is evaluated as the daemon would, and the audit is
built:

* ``stale_partitions_sensor``: everything is current, so the tick does the whole
  comparison and requests nothing;
* ``region_mosaic_sensor``: every region-year has all its grids and no mosaic yet,
  so it requests one mosaic per year;
* ``region_files_sensor``: nothing changed;
* ``audit_rows``: every partition of every stored asset.

    python bench/bench_control_plane.py [--tiles 250 --years 8] [--postgres URL] [--s3]
        [--json bench/results/bench_control_plane.json]

Above 10,000 tiles it is the continent's bench (``bench_continent.py``: one year, on
Postgres, 8 x 8-tile block partitions unless ``--block-side`` says otherwise):

    python bench/bench_control_plane.py --tiles 125000 --postgres URL [--ui] [--json …]

The instance is SQLite under a temporary directory unless ``--postgres`` gives a
database URL (``postgresql+psycopg2://…``; it must be empty). With ``--s3`` the
store, seeded locally, is uploaded to a moto S3 server on 127.0.0.1 and the sensors
and the audit read it there. The stale sensor's cursor is carried from the first
tick to the next, as the daemon does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = ROOT / "agrifm_pipeline_tests" / "fixtures" / "agrifm" / "tiny_p444.pth"
ZARR = ("s2_frame_stack", "normalized_tensors", "agrifm_embedding_grid")
FILES = {"chip_embeddings": "chips.parquet", "embedding_preview": "preview.png"}


def _instance(home: Path, postgres: str | None) -> Any:
    import dagster as dg

    home.mkdir(parents=True, exist_ok=True)
    if postgres:
        (home / "dagster.yaml").write_text(
            "storage:\n  postgres:\n    postgres_url: " + json.dumps(postgres) + "\n"
            "telemetry:\n  enabled: false\n"
        )
    else:
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.from_config(str(home))


def _s3_server() -> tuple[dict[str, Any], Any]:
    """A moto S3 server on 127.0.0.1 (the dev extra installs it) and its client options."""
    from agrifm_pipeline_tests.object_store import start_s3_server

    server = start_s3_server()
    return server.options(), server.proc


def _s3_bucket(options: dict[str, Any]) -> str:
    import s3fs

    s3fs.S3FileSystem(**options).mkdir("control-plane")
    return "control-plane"


def _resources(tmp: Path) -> dict[str, Any]:
    """The load test's resources over ``tmp``: a small tile geometry (one 32 px chip, 4
    frames), the synthetic source and the tiny reference checkpoint."""
    from agrifm_pipeline.defs.resources import AgriFMModel, S2Source, TileYearConfig, ZarrStorage

    os.environ["RS_EMBED_AGRIFM_CKPT_MIN_BYTES"] = "1000"
    return {
        "tile_year": TileYearConfig(chip_px=32, chips_per_side=1, image_size=32, n_frames=4),
        "s2": S2Source(backend="synthetic"),
        "model": AgriFMModel(checkpoint=str(TINY), device="cpu"),
        "storage": ZarrStorage(root=str(tmp / "store"), regions_dir=str(tmp / "regions")),
    }


def judge(
    tmp: Path, instance: Any, resources: dict[str, Any], s3: Any, out: dict[str, Any]
) -> None:
    """Each sensor's first and next tick, and the audit, over the store seeded under ``tmp``
    (uploaded to S3 first with ``s3``)."""
    import dagster as dg

    from agrifm_pipeline.defs.audit import audit_rows
    from agrifm_pipeline.defs.resources import ZarrStorage
    from agrifm_pipeline.defs.sensors import (
        region_files_sensor,
        region_mosaic_sensor,
        stale_partitions_sensor,
    )
    from agrifm_pipeline.defs.staleness import current_fingerprints, stage_stores

    if s3 is not None:  # the same store, uploaded to S3; the sensors and audit read it there
        t = time.perf_counter()
        bucket = _s3_bucket(s3)
        import s3fs

        fs = s3fs.S3FileSystem(**s3)
        # What the control plane reads: pointers, indexes, manifests, the registry.
        # The versions' chunks stay behind (only reading data and `verify` touch them).
        local = sorted(
            p
            for p in (tmp / "store").rglob("*")
            if p.is_file()
            and not p.name.endswith(".lock")
            and p.relative_to(tmp / "store").parts[0] not in ("stac", "catalog.json")
            and (p.name == "_manifest.json" or not any(q.startswith("v20") for q in p.parts))
        )
        fs.put(
            [str(p) for p in local],
            [f"{bucket}/store/{p.relative_to(tmp / 'store').as_posix()}" for p in local],
        )
        out["s3_upload_s"] = round(time.perf_counter() - t, 1)
        out["s3_objects"] = len(local)
        storage = ZarrStorage(
            root=f"s3://{bucket}/store", regions_dir=str(tmp / "regions"), storage_options=s3
        )
        resources["storage"] = storage
    cursors: dict[str, str | None] = {}

    def tick(sensor: Any) -> tuple[float, Any]:
        name = sensor.name
        ctx = dg.build_sensor_context(
            instance=instance, resources=resources, cursor=cursors.get(name)
        )
        t = time.perf_counter()
        result = sensor(ctx)
        if isinstance(result, dg.SensorResult) and result.cursor is not None:
            cursors[name] = result.cursor  # carried, as the daemon does
        return round(time.perf_counter() - t, 2), result

    for name, sensor in (
        ("stale_partitions_sensor", stale_partitions_sensor),
        ("region_mosaic_sensor", region_mosaic_sensor),
        ("region_files_sensor", region_files_sensor),
    ):
        cold, result = tick(sensor)
        warm, _ = tick(sensor)
        requests = len(getattr(result, "run_requests", None) or [])
        skip = getattr(result, "skip_reason", None) or (
            result if isinstance(result, dg.SkipReason) else None
        )
        out[name] = {
            "first_tick_s": cold,
            "next_tick_s": warm,
            "run_requests": requests,
            "skip": getattr(skip, "skip_message", None),
        }
    current, unknown, _ = current_fingerprints(
        resources["tile_year"], resources["s2"], resources["model"]
    )
    t = time.perf_counter()
    rows = audit_rows(instance, stage_stores(resources["storage"]), current, unknown=unknown)
    out["audit"] = {"s": round(time.perf_counter() - t, 2), "rows": len(rows)}
    out["audit"]["statuses"] = {
        s: sum(r.status == s for r in rows) for s in sorted({r.status for r in rows})
    }


def run(
    tiles: int, years: int, postgres: str | None, s3: dict[str, Any] | None = None
) -> dict[str, Any]:
    import dagster as dg

    from agrifm_pipeline.definitions import build_defs
    from agrifm_pipeline.defs.partitions import tile_year_key
    from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
    from agrifm_pipeline.defs.resources import (
        ZarrStorage,
    )
    from agrifm_pipeline.defs.sensors import region_files_sensor
    from agrifm_pipeline.tiles import Tile

    tmp = Path(tempfile.mkdtemp(prefix="agrifm-cp-"))
    resources = _resources(tmp)
    storage: ZarrStorage = resources["storage"]
    ids = [Tile(32631, 320, 1800 + i % 50, 17000 + i // 50).id for i in range(tiles)]
    year_list = list(range(2018, 2018 + years))
    out: dict[str, Any] = {"tiles": tiles, "years": years, "tile_years": tiles * years}
    with _instance(tmp / "dagster", postgres) as instance:
        instance.add_dynamic_partitions("tiles", ids)
        defs = build_defs(resources)
        # One real tile-year per year (a year's scenes are part of its record), the template.
        t0 = time.perf_counter()
        template: dict[tuple[str, int], tuple[Any, dict[str, Any]]] = {}
        for year in year_list:
            first = defs.resolve_job_def("embed_tile_years").execute_in_process(
                instance=instance,
                tags={
                    RANGE_START: str(tile_year_key(ids[0], year)),
                    RANGE_END: str(tile_year_key(ids[0], year)),
                },
            )
            assert first.success
            for asset in ZARR:
                store = storage.store(asset)
                v = store.current(year, ids[0])
                template[(asset, year)] = (
                    store.open_version(v, verify=True),
                    store.lineage(year, ids[0]),
                )
            for asset, name in FILES.items():
                fstore = storage.files(asset)
                template[(asset, year)] = (
                    fstore.read(year, ids[0], name),
                    fstore.lineage(year, ids[0]),
                )
        out["real_tile_years_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        versions: dict[tuple[str, str, int], str] = {}
        for year in year_list:
            for tile in ids[1:]:
                for asset in (*ZARR, *FILES):
                    data, lineage = template[(asset, year)]
                    lin = json.loads(json.dumps(lineage))
                    lin.update(tile=tile, year=year)
                    for rec in lin.get("inputs", {}).values():
                        if isinstance(rec, dict) and rec.get("version"):
                            up = rec.get("asset")
                            if up in ZARR:
                                rec["version"] = versions[(up, tile, year)]
                    if asset in ZARR:
                        v = storage.store(asset).write(year, tile, data, lin)
                    else:
                        v = storage.files(asset).put(year, tile, FILES[asset], data, lin)
                    versions[(asset, tile, year)] = v.id
                    instance.report_runless_asset_event(
                        dg.AssetMaterialization(
                            dg.AssetKey(asset),
                            partition=str(tile_year_key(tile, year)),
                            metadata={"version": v.id},  # as the pipeline's steps record
                        )
                    )
        out["seed_s"] = round(time.perf_counter() - t0, 1)
        index_files = list((tmp / "store").glob("*/*/_index/[0-9]*.json"))
        out["index_bytes_per_partition"] = round(
            sum(p.stat().st_size for p in index_files) / (tiles * years * (len(ZARR) + len(FILES)))
        )
        # One region file whose tiles are exactly these, registered by the region sensor.
        import geopandas as gpd
        import shapely

        boxes = [shapely.box(*Tile.from_id(t).bounds).buffer(-1.0) for t in ids]
        regions = Path(storage.regions_dir)
        regions.mkdir(parents=True)
        gpd.GeoDataFrame(geometry=[shapely.unary_union(boxes)], crs="EPSG:32631").to_file(
            regions / "load_test.geojson", driver="GeoJSON"
        )
        t = time.perf_counter()
        registered = region_files_sensor(
            dg.build_sensor_context(instance=instance, resources=resources)
        )
        out["region_files_sensor_register_s"] = round(time.perf_counter() - t, 2)
        for request in getattr(registered, "dynamic_partitions_requests", None) or []:
            instance.add_dynamic_partitions(
                request.partitions_def_name, list(request.partition_keys)
            )
        assert sorted(storage.registry().tiles_of("load_test")) == sorted(ids)

        judge(tmp, instance, resources, s3, out)
    out["instance"] = "postgres" if postgres else "sqlite"
    out["store"] = "s3 (moto server on 127.0.0.1)" if s3 is not None else "local directory"
    return out


def rejudge(tmp: Path, tiles: int, years: int, s3: Any) -> dict[str, Any]:
    """:func:`judge` again over a directory :func:`run` seeded (its SQLite instance)."""
    import dagster as dg

    resources = _resources(tmp)
    out: dict[str, Any] = {"tiles": tiles, "years": years, "tile_years": tiles * years}
    out["reused"] = str(tmp)
    with dg.DagsterInstance.from_config(str(tmp / "dagster")) as instance:
        judge(tmp, instance, resources, s3, out)
    out["instance"] = "sqlite"
    out["store"] = "s3 (moto server on 127.0.0.1)" if s3 is not None else "local directory"
    return out


# Past this many tiles the bench is the continent's (one year, Postgres, block partitions
# by default): bench_continent.py, with the arguments given here.
CONTINENT_TILES = 10_000


def main() -> None:
    if (n := _tiles_asked(sys.argv[1:])) is not None and n > CONTINENT_TILES:
        rest = sys.argv[1:]
        if not any(a.startswith("--block-side") for a in rest):
            rest += ["--block-side", "8"]
        script = Path(__file__).with_name("bench_continent.py")
        os.execv(sys.executable, [sys.executable, str(script), *rest])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiles", type=int, default=250)
    ap.add_argument("--years", type=int, default=8)
    ap.add_argument("--postgres", default=None, help="an empty database's URL")
    ap.add_argument(
        "--s3", action="store_true", help="judge the store on S3 (a moto server on 127.0.0.1)"
    )
    ap.add_argument(
        "--reuse",
        default=None,
        help="judge the store and SQLite instance an earlier run seeded in this directory",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    server = None
    options = None
    if args.s3:
        options, server = _s3_server()
    try:
        if args.reuse:
            out = rejudge(Path(args.reuse), args.tiles, args.years, options)
        else:
            out = run(args.tiles, args.years, args.postgres, options)
    finally:
        if server is not None:
            server.kill()
    out["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    out["command"] = " ".join(["python", *sys.argv])
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


def _tiles_asked(argv: list[str]) -> int | None:
    for i, a in enumerate(argv):
        if a == "--tiles" and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        if a.startswith("--tiles=") and a[8:].isdigit():
            return int(a[8:])
    return None


if __name__ == "__main__":
    main()
