#!/usr/bin/env python
"""What a run costs through Dagster, against the same work stage by stage.

Both on the synthetic provider, the default tile geometry (16 chips of 224²), the
full-size encoder with ``untrained:0`` weights in fp32 on the CPU, measured in the
same invocation:

1. **Stages**: ``--stage-tile-years`` times, ``bench/bench_pipeline.py``'s stage-by-stage
   measurement (acquire, write frames, normalise the frames read back, write, encode
   every chip, write the grid, chip table and preview; the model built once outside
   the clock). Tile-years/hour = 3600 / mean seconds.
2. **Dagster**: ``dagster job execute`` of ``embed_tile_years`` in a fresh process on
   a temporary instance written by ``agrifm-pipeline home`` (SQLite, run monitoring),
   as a run worker would: one run of ``--tile-years`` tile-years (one run of a UI
   backfill: ``MAX_PARTITIONS_PER_RUN`` is 16), then ``--single-runs`` runs of 1
   tile-year each (each a tile-year not made before). The wall time includes starting
   Python, importing Dagster and torch, loading the model and the per-partition
   checks. Tile-years/hour of the first; the fixed cost of a run = the median wall
   time of the 1-tile-year runs minus the mean stage time (one run alone swings by
   several seconds on a shared 2-core machine, so every sample is reported too).

Target (issue 16, item 6): ratio >= 0.85 and fixed cost <= 15 s on the 2-core
machine. ``--json PATH`` writes ``dagster_tile_years_per_hour``,
``stages_tile_years_per_hour``, ``ratio`` and ``run_fixed_cost_s`` with the details.

    python bench/bench_dagster.py [--tile-years 16] [--stage-tile-years 3]
        [--single-runs 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

YEARS = (2019, 2020)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tile_ids(n: int) -> list[str]:
    """``n`` neighbouring default tiles along a row of zone 31 (the demo tile's row)."""
    return [f"32631_8960m_E{64 + i:04d}_N0627" for i in range(n)]


def stage_seconds(n: int, root: Path) -> list[float]:
    """Seconds per tile-year, stage by stage, as ``bench/bench_pipeline.py`` measures them
    (its own ``stages``: the library calls the assets make, every chip encoded, each stage
    reading its input back from the store; the model built once, outside the clock), on
    the synthetic provider: the sum of its stages, ``n`` times."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_pipeline import stages

    from agrifm_pipeline.providers import make_provider

    provider = make_provider("synthetic", seed=0)
    out = []
    for i in range(n):
        t = stages(provider, "float32", 8, root / f"stages-{i}", keep_tensors=False)
        out.append(sum(v for k, v in t.items() if not k.startswith(("x_", "faults_", "bytes_"))))
    return out


def dagster_env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DAGSTER_HOME": str(root / "dagster"),
        "AGRIFM_PIPELINE_STORAGE": str(root / "store"),
        "AGRIFM_PIPELINE_REGIONS_DIR": str(root / "regions"),
        "AGRIFM_PIPELINE_S2_BACKEND": "synthetic",
        "RS_EMBED_AGRIFM_CKPT": "untrained:0",
    }


def dagster_run(tiles: list[str], years: tuple[int, ...], env: dict[str, str]) -> float:
    """Wall seconds of one run of the tile-years ``tiles`` x ``years`` in a new process."""
    from agrifm_pipeline.defs.partitions import tile_year_key
    from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START

    tags = {
        RANGE_START: str(tile_year_key(tiles[0], years[0])),
        RANGE_END: str(tile_year_key(tiles[-1], years[-1])),
    }
    cmd = [
        str(Path(sys.executable).parent / "dagster"),
        "job",
        "execute",
        "-m",
        "agrifm_pipeline.definitions",
        "-j",
        "embed_tile_years",
        "--tags",
        json.dumps(tags),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the Dagster run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tile-years", type=int, default=16, help="tile-years in the backfill run")
    ap.add_argument("--stage-tile-years", type=int, default=3)
    ap.add_argument("--single-runs", type=int, default=3, help="1-tile-year runs (median)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    load_at_start = os.getloadavg()
    if args.single_runs < 1:
        raise SystemExit("--single-runs must be at least 1")
    if args.tile_years % len(YEARS):
        raise SystemExit(f"--tile-years must be a multiple of {len(YEARS)}")

    with tempfile.TemporaryDirectory(prefix="bench-dagster-") as tmp:
        root = Path(tmp)
        env = dagster_env(root)
        os.environ.update({k: env[k] for k in ("DAGSTER_HOME",)})
        from agrifm_pipeline.demo import init_home

        init_home(root)  # the project's own instance: SQLite, run monitoring, pool limits
        import dagster as dg

        n_backfill = args.tile_years // len(YEARS)
        tiles = tile_ids(n_backfill + args.single_runs)
        with dg.DagsterInstance.get() as instance:
            instance.add_dynamic_partitions("tiles", tiles)

        stage_s = stage_seconds(args.stage_tile_years, root)
        backfill_wall = dagster_run(tiles[:n_backfill], YEARS, env)
        single_walls = [dagster_run([t], YEARS[:1], env) for t in tiles[n_backfill:]]

    mean_stage = statistics.mean(stage_s)
    single_wall = statistics.median(single_walls)
    stages_tyh = 3600.0 / mean_stage
    dagster_tyh = args.tile_years * 3600.0 / backfill_wall
    out: dict[str, Any] = {
        "dagster_tile_years_per_hour": round(dagster_tyh, 1),
        "stages_tile_years_per_hour": round(stages_tyh, 1),
        "ratio": round(dagster_tyh / stages_tyh, 3),
        "run_fixed_cost_s": round(single_wall - mean_stage, 2),
        "backfill_run_wall_s": round(backfill_wall, 2),
        "backfill_tile_years": args.tile_years,
        "single_run_wall_s": round(single_wall, 2),
        "single_run_walls_s": [round(w, 2) for w in single_walls],
        "stage_seconds": [round(s, 3) for s in stage_s],
        "targets": {"ratio": 0.85, "run_fixed_cost_s": 15.0},
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "loadavg_at_start": load_at_start,
            "loadavg_at_end": os.getloadavg(),
        },
        "command": " ".join([sys.executable, *sys.argv]),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
