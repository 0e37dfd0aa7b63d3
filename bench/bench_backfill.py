#!/usr/bin/env python
"""A large backfill launched over a seeded instance (``bench_continent.py --dir DIR``), the
daemon killed while it creates the runs and started again: how fast runs are queued,
the daemon's longest stall and its memory, and that nothing is requested twice or lost.

    python bench/bench_backfill.py --dir /tmp/cont_125k --n 100000 [--kill-after 60]
        [--json bench/results/bench_backfill_125k.json]

The instance's ``max_concurrent_runs`` is set to 0 for the test: the backfill daemon
creates and queues the runs (what is measured), none is launched, so no work is done
(the simulated work of a cluster is the queue draining at its own rate; a run's
duration does not change how the backfill daemon requests). The backfill is the UI's:
an asset backfill of every tile-year asset over the ``--n`` first tile-years (tiles, or
blocks with ``--block-side``, in partition order, years from the seeded year down), each
run at most what the assets' backfill policy allows (16 tiles, or one 8 x 8 block).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_continent import TINY, Out, _resources, load, peak_rss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--year", type=int, default=2024)
    ap.add_argument("--kill-after", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--block-side",
        type=int,
        default=1,
        help="the seeded instance's block side (8 for a continent seeded with blocks)",
    )
    ap.add_argument(
        "--submit-workers",
        type=int,
        default=0,
        help="the daemon's threads submitting a backfill's runs (backfills: num_submit_workers)",
    )
    args = ap.parse_args()
    tmp = Path(args.dir)
    home = tmp / "dagster"
    os.environ["AGRIFM_BENCH_TMP"] = str(tmp)
    os.environ["DAGSTER_HOME"] = str(home)
    # The definitions' backfill policy (tile-years per run) follows the block side; the
    # daemon's code server inherits it.
    os.environ["AGRIFM_PIPELINE_BLOCK_SIDE"] = str(args.block_side)
    yaml = (home / "dagster.yaml").read_text().split("\n# bench_backfill\n")[0]
    yaml = yaml.replace("max_concurrent_runs: 8", "max_concurrent_runs: 0")
    if args.submit_workers:
        yaml += (
            "\n# bench_backfill\nbackfills:\n  use_threads: true\n"
            f"  num_submit_workers: {args.submit_workers}\n"
        )
    (home / "dagster.yaml").write_text(yaml)
    (tmp / "workspace.yaml").write_text(
        "load_from:\n  - python_module:\n      module_name: bench_continent_defs\n"
        f"      working_directory: {ROOT / 'bench'}\n"
    )
    import dagster as dg
    from dagster._core.execution.backfill import BulkActionStatus

    from agrifm_pipeline.definitions import build_defs
    from agrifm_pipeline.defs.assets import tile_year_assets
    from agrifm_pipeline.defs.partitions import TileUnits, tile_year_key
    from agrifm_pipeline_tests.daemon_helpers import add_asset_backfill

    out = Out(
        args.json,
        n=args.n,
        block_side=args.block_side,
        submit_workers=args.submit_workers,
        dir=str(tmp),
        command=" ".join(["python", *sys.argv]),
    )
    resources = _resources(tmp, TINY, args.block_side)
    defs = build_defs(resources)
    graph = defs.resolve_asset_graph()
    with dg.DagsterInstance.get() as instance:
        units = instance.get_dynamic_partitions("tiles")
        size = TileUnits(resources["storage"].registry().owners(), units)
        keys: list[str] = []
        tile_years = 0
        year = args.year
        while tile_years < args.n:  # the first units, years from the seeded one down
            for u in units:
                if tile_years >= args.n:
                    break
                keys.append(str(tile_year_key(u, year)))
                tile_years += len(size.tiles(u))
            year -= 1
        selection = [k for a in tile_year_assets for k in a.keys]
        t = time.perf_counter()
        backfill_id = add_asset_backfill(instance, graph, keys, selection, "bench")
        out.put(
            "launch_backfill",
            {
                "s": round(time.perf_counter() - t, 1),
                "partitions": len(keys),
                "tile_years": tile_years,
            },
        )

        def start() -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-m", "dagster._daemon", "run", "-w", str(tmp / "workspace.yaml")],
                stdout=open(tmp / "daemon.log", "a"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def n_runs() -> int:
            return instance.get_runs_count(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))

        daemon = start()
        t0 = time.perf_counter()
        series: list[tuple[float, int]] = []
        killed_at = None
        peak = 0.0
        done = False
        while time.perf_counter() - t0 < args.timeout:
            time.sleep(5)
            now = time.perf_counter() - t0
            n = n_runs()
            series.append((round(now, 1), n))
            peak = max(peak, peak_tree(daemon.pid))
            if killed_at is None and now >= args.kill_after:
                os.killpg(daemon.pid, signal.SIGKILL)  # the daemon and its code server
                daemon.wait()
                killed_at = (round(now, 1), n)
                time.sleep(5)
                daemon = start()
                continue
            bf = instance.get_backfill(backfill_id)
            data = bf.asset_backfill_data
            requested = data.requested_subset.num_partitions_and_non_partitioned_assets
            target = data.target_subset.num_partitions_and_non_partitioned_assets
            if requested >= target or bf.status != BulkActionStatus.REQUESTED:
                done = True
                break
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(60)
        total = time.perf_counter() - t0
        # Nothing twice, nothing lost: every run's range, expanded.
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        pdef = graph.get(selection[0]).partitions_def
        seen: dict[tuple[str, str], int] = {}
        for r in runs:
            start_key = r.tags.get("dagster/asset_partition_range_start")
            end_key = r.tags.get("dagster/asset_partition_range_end")
            if start_key is None:
                pks = [r.tags["dagster/partition"]]
            else:
                pks = pdef.get_partition_keys_in_range(
                    dg.PartitionKeyRange(start_key, end_key), dynamic_partitions_store=instance
                )
            for a in r.asset_selection or []:
                for pk in pks:
                    seen[(a.to_user_string(), str(pk))] = (
                        seen.get((a.to_user_string(), str(pk)), 0) + 1
                    )
        want = {(k.to_user_string(), pk) for k in selection for pk in keys}
        # What the backfill has marked requested: each must have its run (else it is lost:
        # marked, never launched); what it has not is still to come, not lost.
        data = instance.get_backfill(backfill_id).asset_backfill_data
        marked = {
            (akpk.asset_key.to_user_string(), str(akpk.partition_key))
            for akpk in data.requested_subset.iterate_asset_partitions()
        }
        tile_years_queued = sum(
            len(size.tiles(str(pk).split("|")[0])) for pk in {p for _, p in seen}
        )
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(series) if b[1] == a[1]]
        steps = [b for a, b in itertools.pairwise(series) if b[1] > a[1]]
        rate = None
        if len(series) > 2 and series[-1][1]:
            t0_, n0_ = killed_at if killed_at else (0.0, 0)
            rate = round(60 * (series[-1][1] - n0_) / max(series[-1][0] - t0_, 1.0), 1)
        out.put(
            "backfill",
            {
                "completed_requesting": done,
                "s_until_every_run_queued": round(total, 1),
                "runs": len(runs),
                "killed_at_s_runs": killed_at,
                "runs_per_minute_overall": round(60 * len(runs) / total, 1),
                "runs_per_minute_after_restart": rate,
                "longest_stretch_without_a_new_run_s": max(gaps, default=0),
                "tile_years_queued": tile_years_queued,
                "tile_years_per_minute": round(60 * tile_years_queued / total, 1),
                "partitions_requested_twice": sum(1 for v in seen.values() if v > 1),
                "partitions_marked_requested_without_a_run": len(marked - set(seen)),
                "partitions_in_runs_not_marked": len(set(seen) - marked),
                "partitions_still_to_request": len(want - marked),
                "partitions_lost": len(want - set(seen)) if done else len(marked - set(seen)),
                "partitions_outside_target": len(set(seen) - want),
                "daemon_peak_rss_mb": round(peak, 1),
                "series_tail": series[-5:],
                "steps": len(steps),
            },
        )
        out.put("load_at_end", {"uptime": load()})


def peak_tree(pid: int) -> float:
    """Current VmHWM of the daemon and its children (its code server, its daemons' threads)."""
    total = 0.0
    try:
        kids = subprocess.run(
            ["pgrep", "-s", str(pid)], capture_output=True, text=True
        ).stdout.split()
    except OSError:
        kids = []
    for p in {str(pid), *kids}:
        got = peak_rss(int(p))
        total += got or 0
    return total


if __name__ == "__main__":
    main()
