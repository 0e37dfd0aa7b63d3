"""The main job on the embedded defaults: the bundled demo region, 2019, every asset.

* Dagster instance: SQLite under ``<home>/dagster`` (``DAGSTER_HOME`` if set),
  so the runs and their lineage appear in ``dagster dev`` afterwards;
* storage: local Zarr under ``<home>/store``;
* data: the real Sentinel-2 sample in ``data/s2_sample`` and the region
  files in ``data/regions``;
* model: the checkpoint chain (``RS_EMBED_AGRIFM_CKPT`` -> cache -> download
  of the official weights), or explicitly untrained weights when asked.

``<home>`` is ``AGRIFM_PIPELINE_HOME`` or ``.agrifm`` in the working directory.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

DEMO_REGION = "flanders_demo"
DEMO_YEAR = 2019
POOL_LIMITS = {"agrifm_encoder": 1, "s2_acquisition": 4}


def prepare_home(home: str | Path | None = None) -> Path:
    """A project-local Dagster home with an instance config; returns DAGSTER_HOME."""
    from agrifm_pipeline.settings import pipeline_home

    dagster_home = Path(os.environ.get("DAGSTER_HOME") or pipeline_home(home) / "dagster").resolve()
    dagster_home.mkdir(parents=True, exist_ok=True)
    cfg = dagster_home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(
            "# written by agrifm-pipeline demo\n"
            "telemetry:\n  enabled: false\n"
            "run_queue:\n  max_concurrent_runs: 4\n"
        )
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dagster_home


def set_pool_limits(instance: Any, limits: dict[str, int] | None = None) -> None:
    """Pool limits (concurrent steps): the encoder one at a time, acquisition a few."""
    for pool, limit in (limits or POOL_LIMITS).items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)


def init_home(home: str | Path | None = None) -> Path:
    """Create the project-local Dagster home with its config and pool limits."""
    import dagster as dg

    dagster_home = prepare_home(home)
    with dg.DagsterInstance.get() as instance:
        set_pool_limits(instance)
    return dagster_home


def _run_with_progress(job: Any, instance: Any, label: str, total_steps: int, **kwargs: Any) -> Any:
    """Execute a job in process while a progress bar follows its steps."""
    from dagster import DagsterEventType
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    run_id = str(uuid.uuid4())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = job.execute_in_process(
                instance=instance,
                run_id=run_id,
                raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                **kwargs,
            )
        except BaseException as exc:  # reported on the main thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    done_types = {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
    ) as progress:
        task = progress.add_task(label, total=total_steps)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            events = instance.all_logs(run_id, of_type=done_types)
            steps = [e.step_key for e in events]
            current = f"{label}: {steps[-1]} done" if steps else label
            progress.update(task, completed=len(steps), description=current)
        events = instance.all_logs(run_id, of_type=done_types)
        progress.update(task, completed=len(events), description=f"{label}: finished")
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_demo(
    *,
    checkpoint: str | None = None,
    device: str = "auto",
    precision: str = "float32",
    year: int = DEMO_YEAR,
    region: str = DEMO_REGION,
    home: str | Path | None = None,
) -> dict[str, Any]:
    """Register the demo region, materialise its tile-years and mosaic; return where things are."""
    from agrifm_pipeline.settings import pipeline_home

    home = pipeline_home(home)
    dagster_home = prepare_home(home)

    import dagster as dg

    from agrifm_pipeline.definitions import build_defs, default_resources
    from agrifm_pipeline.defs.resources import AgriFMModel, ZarrStorage

    resources = default_resources()
    resources["model"] = AgriFMModel(checkpoint=checkpoint, device=device, precision=precision)
    resources["storage"] = ZarrStorage(root=str((home / "store").resolve()))
    storage = resources["storage"]
    defs = build_defs(resources)
    with dg.DagsterInstance.get() as instance:
        return _materialise(defs, instance, resources, storage, dagster_home, region, year)


def _materialise(
    defs: Any,
    instance: Any,
    resources: dict[str, Any],
    storage: Any,
    dagster_home: Path,
    region: str,
    year: int,
) -> dict[str, Any]:
    from agrifm_pipeline.defs.partitions import region_year_key, tile_year_key
    from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
    from agrifm_pipeline.defs.sensors import register_regions
    from agrifm_pipeline.errors import RegionError

    set_pool_limits(instance)

    # 1. Regions -> partitions (what the region sensor does on every tick).
    resolved = resources["model"].resolved()  # fail early: download or a clear error
    _, new_tiles, new_regions = register_regions(instance, resources["tile_year"], storage)
    if new_tiles:
        instance.add_dynamic_partitions("tiles", new_tiles)
    if new_regions:
        instance.add_dynamic_partitions("regions", new_regions)
    active = storage.registry().active_regions()
    if region not in active:
        raise RegionError(
            f"demo region {region!r} is not registered; expected {storage.regions_dir}/{region}.geojson"
        )
    tiles = sorted(active[region]["tiles"])
    order = instance.get_dynamic_partitions("tiles")
    tiles.sort(key=order.index)

    # 2. Every tile-year asset for the region's tiles, one run (the model loads once).
    t0 = time.perf_counter()
    job = defs.resolve_job_def("embed_tile_years")
    n_checks = 5
    result = _run_with_progress(
        job,
        instance,
        f"{region} {year}: {len(tiles)} tile(s)",
        total_steps=5 + n_checks,
        tags={
            RANGE_START: str(tile_year_key(tiles[0], year)),
            RANGE_END: str(tile_year_key(tiles[-1], year)),
            "agrifm/reason": "demo",
        },
    )
    if not result.success:
        raise RuntimeError(
            f"the tile-year run failed; see `dagster dev` (DAGSTER_HOME={dagster_home})"
        )
    # 3. The region's mosaic.
    mjob = defs.resolve_job_def("mosaic_regions")
    mres = _run_with_progress(
        mjob,
        instance,
        f"{region} {year}: mosaic",
        1,
        partition_key=str(region_year_key(region, year)),
    )
    if not mres.success:
        raise RuntimeError(
            f"the mosaic run failed; see `dagster dev` (DAGSTER_HOME={dagster_home})"
        )
    elapsed = time.perf_counter() - t0
    checks = {
        e.check_name: "pass" if e.passed else ("warn" if e.severity.value == "WARN" else "FAIL")
        for e in result.get_asset_check_evaluations()
    }
    grids, chips, previews = (
        storage.store("agrifm_embedding_grid"),
        storage.files("chip_embeddings"),
        storage.files("embedding_preview"),
    )

    def current(store: Any, name: str, suffix: str = "") -> str:
        version = store.current(year, name)
        return f"{version.url}{suffix}" if version is not None else ""

    return {
        "region": region,
        "year": year,
        "tiles": tiles,
        "seconds": elapsed,
        "checkpoint": resolved.as_record(),
        "checks": checks,
        "dagster_home": str(dagster_home),
        "store": storage.root,
        "catalog": f"{storage.root.rstrip('/')}/catalog.json",
        "grid": [current(grids, t) for t in tiles],
        "mosaic": current(storage.store("region_mosaic"), region),
        "chips": [current(chips, t, "/chips.parquet") for t in tiles],
        "previews": [current(previews, t, "/preview.png") for t in tiles],
    }
