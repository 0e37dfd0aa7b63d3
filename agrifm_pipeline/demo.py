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

from agrifm_pipeline import stages

DEMO_REGION = "flanders_sample"
DEMO_YEAR = 2019
# The demo's grid is fitted to the bundled sample (64 x 64 px at 10 m): one chip of 64 px
# per tile (640 m), resized to the contract's image_size (224) as RS_EMBED_AGRIFM_IMG
# does for any chip. Tiles are anchored at the zone's origin, so the tile holding most of
# the sample (32631_640m_E0898_N8784) has data in 60 x 60 of its 64 x 64 px; the strips
# on its right and bottom edges are fill. The default grid (4 x 4 chips of 224 px) stays
# the default for real use.
DEMO_CHIP_PX = 64
DEMO_CHIPS_PER_SIDE = 1
DEMO_DATA = Path(__file__).resolve().parent.parent / "data"
DEMO_REGIONS_DIR = DEMO_DATA / "regions" / "demo"
DEMO_ENV_FILE = "demo.env"


def demo_env() -> dict[str, str]:
    """The environment that makes a code location use the demo's grid and region files
    (``make ui`` reads it from ``<home>/demo.env``)."""
    return {
        "AGRIFM_PIPELINE_CHIP_PX": str(DEMO_CHIP_PX),
        "AGRIFM_PIPELINE_CHIPS_PER_SIDE": str(DEMO_CHIPS_PER_SIDE),
        "AGRIFM_PIPELINE_REGIONS_DIR": str(DEMO_REGIONS_DIR),
        "AGRIFM_PIPELINE_S2_LOCAL_ROOT": str(DEMO_DATA / "s2_sample"),
    }


def demo_checkpoint(checkpoint: str | None = None) -> str | None:
    """The checkpoint setting the demo ran with, for ``<home>/demo.env``: ``--checkpoint``,
    else ``RS_EMBED_AGRIFM_CKPT`` (a file as an absolute path, so the commands that read the
    home work from anywhere); None when the demo used the chain's cache or download, which
    the UI and the audit find again the same way."""
    given = checkpoint or os.environ.get("RS_EMBED_AGRIFM_CKPT") or None
    if given is None or given.startswith("untrained:"):
        return given
    path = Path(given).expanduser()
    return str(path.resolve()) if path.exists() else given


def load_home_env(home: str | Path | None = None) -> dict[str, str]:
    """The settings ``<home>/demo.env`` records (written by the demo), set in this
    process's environment where not already set; returns what it set."""
    from agrifm_pipeline.settings import pipeline_home

    path = pipeline_home(home) / DEMO_ENV_FILE
    if not path.is_file():
        return {}
    set_now: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#") and not os.environ.get(key):
            os.environ[key] = set_now[key] = value
    return set_now


POOL_LIMITS = {"agrifm_encoder": 1, "s2_acquisition": 4}


# The instance the project writes (``agrifm-pipeline home``, the demo). Rewritten while its
# first line is this header; delete the line to keep hand edits.
HOME_HEADER = "# written by agrifm-pipeline"
# A run whose process died is marked failed by the code server that launched it (it polls
# its run processes); the monitoring daemon then frees the pool slots that run still holds
# after FREE_SLOTS_AFTER_S, on a poll every MONITOR_POLL_S: a dead run blocks the encoder
# pool for at most about FREE_SLOTS_AFTER_S + MONITOR_POLL_S (+ the launcher's own poll).
MONITOR_POLL_S = 10
FREE_SLOTS_AFTER_S = 10
MAX_CONCURRENT_RUNS = 4


def run_monitoring_config(
    poll_s: int = MONITOR_POLL_S, free_slots_after_s: int = FREE_SLOTS_AFTER_S
) -> dict[str, Any]:
    """``run_monitoring`` for dagster.yaml: dead runs marked failed, their pool slots freed."""
    return {
        "enabled": True,
        "start_timeout_seconds": 180,
        "cancel_timeout_seconds": 180,
        # Resuming needs a launcher that supports it; a dead tile-year run is simply failed
        # and its partitions are requested again (the stale sensor, a backfill retry).
        "max_resume_run_attempts": 0,
        "poll_interval_seconds": poll_s,
        "free_slots_after_run_end_seconds": free_slots_after_s,
    }


def home_instance_config() -> dict[str, Any]:
    """The local (SQLite) instance: queued runs, op-granularity pools, run monitoring on."""
    return {
        "telemetry": {"enabled": False},
        "concurrency": {
            "runs": {"max_concurrent_runs": MAX_CONCURRENT_RUNS},
            "pools": {"granularity": "op"},
        },
        "run_monitoring": run_monitoring_config(),
    }


def write_instance_config(dagster_home: Path) -> Path:
    """Write ``dagster.yaml`` under ``dagster_home``: the project's template while the file
    is the project's (it starts with HOME_HEADER) or absent; a hand-written file only
    gains ``run_monitoring`` when it has none (and is otherwise left alone)."""
    import yaml

    cfg = dagster_home / "dagster.yaml"
    text = cfg.read_text() if cfg.exists() else ""
    if not text or text.startswith(HOME_HEADER):
        body = yaml.safe_dump(home_instance_config(), sort_keys=False)
        cfg.write_text(
            f"{HOME_HEADER} (agrifm_pipeline.demo.home_instance_config); delete this line\n"
            "# to keep your own edits. Pool limits are set by `agrifm-pipeline home`.\n" + body
        )
        return cfg
    loaded = yaml.safe_load(text) or {}
    if isinstance(loaded, dict) and "run_monitoring" not in loaded:
        cfg.write_text(
            text.rstrip("\n")
            + "\n# added by agrifm-pipeline: a dead run is marked failed and frees its pool slots\n"
            + yaml.safe_dump({"run_monitoring": run_monitoring_config()}, sort_keys=False)
        )
    return cfg


def prepare_home(home: str | Path | None = None) -> Path:
    """A project-local Dagster home with an instance config; returns DAGSTER_HOME."""
    from agrifm_pipeline.settings import pipeline_home

    dagster_home = Path(os.environ.get("DAGSTER_HOME") or pipeline_home(home) / "dagster").resolve()
    dagster_home.mkdir(parents=True, exist_ok=True)
    write_instance_config(dagster_home)
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


def _step_labels(job: Any) -> dict[str, str]:
    """Step keys as users read them: an asset check's step ``<asset>_<check>`` (whose
    name may repeat the asset's) as ``check <check>``."""
    try:
        keys = job.asset_layer.asset_graph.asset_check_keys
    except AttributeError:  # a job without assets
        return {}
    return {f"{k.asset_key.to_python_identifier()}_{k.name}": f"check {k.name}" for k in keys}


class _Progress:
    """A bar on a terminal; plain periodic lines (every ``every_s`` and at each change of
    step) when the output is a file or a pipe."""

    def __init__(self, label: str, total: int, every_s: float = 10.0) -> None:
        import sys

        self.label, self.total, self.every_s = label, max(1, total), every_s
        self.t0 = time.monotonic()
        self.last_line = -1e9
        self.last_text = ""
        self.bar: Any = None
        if sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
            )
            self.task = self.bar.add_task(label, total=self.total)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, done: int, text: str, *, force: bool = False) -> None:
        done = min(done, self.total)
        if self.bar is not None:
            self.bar.update(
                self.task, total=self.total, completed=done, description=f"{self.label}: {text}"
            )
            return
        now = time.monotonic()
        if force or text != self.last_text or now - self.last_line >= self.every_s:
            pct = 100 * done // self.total
            print(f"[{now - self.t0:5.0f} s] {self.label}: {text} ({pct} %)", flush=True)
            self.last_line, self.last_text = now, text


def _run_with_progress(job: Any, instance: Any, label: str, chips: int = 0, **kwargs: Any) -> Any:
    """Execute a job in process while a progress display follows it: steps done of the
    run's planned steps, and chips through the encoder of the ``chips`` expected (one
    unit each), so it moves while the encoder works; 100 % when the run ends."""
    from dagster import DagsterEventType

    from agrifm_pipeline.inference import chips_embedded

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

    def planned_steps() -> int | None:
        run = instance.get_run_by_id(run_id)
        if run is None or not run.execution_plan_snapshot_id:
            return None
        snap = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
        return len(snap.steps)

    thread = threading.Thread(target=target, daemon=True)
    kinds = {
        DagsterEventType.STEP_START,
        DagsterEventType.STEP_SUCCESS,
        DagsterEventType.STEP_FAILURE,
    }
    labels = _step_labels(job)
    chips0 = chips_embedded()
    steps_total: int | None = None
    with _Progress(label, 1 + chips) as progress:
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            steps_total = steps_total or planned_steps()
            events = instance.all_logs(run_id, of_type=kinds)
            started = DagsterEventType.STEP_START
            finished = [e.step_key for e in events if e.dagster_event.event_type != started]
            running = [
                e.step_key
                for e in events
                if e.dagster_event.event_type == started and e.step_key not in finished
            ]
            n = steps_total or max(1, len(finished) + len(running))
            progress.total = n + chips
            done_chips = min(chips, chips_embedded() - chips0)
            text = f"step {len(finished)}/{n}"
            if running:
                text += f", running {labels.get(running[-1], running[-1])}"
            if chips:
                text += f", chips {done_chips}/{chips}"
            progress.update(len(finished) + done_chips, text)
        progress.update(progress.total, f"finished, {steps_total or '?'} steps", force=True)
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
    # The demo's grid and region, for this process and (through <home>/demo.env, which
    # `make ui` and the audit read) for the UI's code location: the stale sensor and the
    # region sensor then judge the demo's partitions with the settings that made them,
    # the checkpoint included (offline, untrained:0 is found again, not the download).
    os.environ.update(demo_env())
    recorded = dict(demo_env())
    ckpt = demo_checkpoint(checkpoint)
    if ckpt is not None:
        recorded["RS_EMBED_AGRIFM_CKPT"] = ckpt
    home.mkdir(parents=True, exist_ok=True)
    (home / DEMO_ENV_FILE).write_text(
        "# written by `agrifm-pipeline demo`: the demo's grid, region files and checkpoint;\n"
        "# `make ui` and `agrifm-pipeline audit` read this file (a variable already set in\n"
        "# the environment wins). Delete it to open the UI on the default settings.\n"
        + "".join(f"{k}={v}\n" for k, v in recorded.items())
    )

    import dagster as dg

    from agrifm_pipeline.definitions import build_defs, default_resources
    from agrifm_pipeline.defs.resources import AgriFMModel, ZarrStorage

    resources = default_resources()
    resources["model"] = AgriFMModel(checkpoint=checkpoint, device=device, precision=precision)
    resources["storage"] = ZarrStorage(
        root=str((home / "store").resolve()), regions_dir=str(DEMO_REGIONS_DIR)
    )
    storage = resources["storage"]
    defs = build_defs(resources)
    with dg.DagsterInstance.get() as instance:
        out = _materialise(defs, instance, resources, storage, dagster_home, region, year)
    out["home"] = str(home.resolve())
    out["checkpoint_setting"] = ckpt
    return out


def _materialise(
    defs: Any,
    instance: Any,
    resources: dict[str, Any],
    storage: Any,
    dagster_home: Path,
    region: str,
    year: int,
) -> dict[str, Any]:
    import dagster as dg

    from agrifm_pipeline.defs.partitions import region_year_key, tile_year_key
    from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
    from agrifm_pipeline.defs.sensors import register_regions
    from agrifm_pipeline.errors import RegionError
    from agrifm_pipeline.tileyear import coverage_caption

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
    per = resources["tile_year"].chips_per_side
    result = _run_with_progress(
        job,
        instance,
        f"{region} {year}: {len(tiles)} tile-year(s)",
        chips=len(tiles) * per * per,  # at most; chips without data are left out
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
        partition_key=str(region_year_key(region, year)),
    )
    if not mres.success:
        raise RuntimeError(
            f"the mosaic run failed; see `dagster dev` (DAGSTER_HOME={dagster_home})"
        )
    # 4. The lineage audit (every stored partition, current or stale and why).
    ajob = defs.resolve_implicit_global_asset_job_def()
    ares = _run_with_progress(
        ajob, instance, "lineage audit", asset_selection=[dg.AssetKey(stages.AUDIT_ASSET)]
    )
    if not ares.success:
        raise RuntimeError(
            f"the {stages.AUDIT_ASSET} run failed; see `dagster dev` (DAGSTER_HOME={dagster_home})"
        )
    elapsed = time.perf_counter() - t0
    # One evaluation per check and partition: each check shows its worst partition.
    rank = {"pass": 0, "warn": 1, "FAIL": 2}
    checks: dict[str, str] = {}
    for e in result.get_asset_check_evaluations():
        verdict = "pass" if e.passed else ("warn" if e.severity.value == "WARN" else "FAIL")
        if rank[verdict] >= rank[checks.get(e.check_name, "pass")]:
            checks[e.check_name] = verdict
    grids, chips, previews = (
        storage.store(stages.GRID.asset),
        storage.files(stages.CHIPS.asset),
        storage.files(stages.PREVIEW.asset),
    )

    def _cogs(store: Any, year: int, name: str) -> list[str]:
        """The current COGs of a region-year (one per UTM zone), as paths GDAL opens."""
        version = store.current(year, name)
        if version is None:
            return []
        names = sorted(store.manifest(version)["objects"])
        return [f"{version.gdal_path}/{n}" for n in names if n.endswith(".tif")]

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
        "mosaic": current(storage.store(stages.MOSAIC.asset), region),
        "mosaic_cogs": _cogs(storage.files(stages.MOSAIC_COG.asset), year, region),
        "chips": [current(chips, t, f"/{stages.CHIPS.file}") for t in tiles],
        "previews": [current(previews, t, f"/{stages.PREVIEW.file}") for t in tiles],
        "coverage": [coverage_caption(grids.open(year, t).attrs) for t in tiles],
    }
