"""A backfill survives its daemon: on the instance of ``deploy/dagster.yaml`` (PostgreSQL,
the queued run coordinator, run monitoring and retries, the backfill daemon's submit
threads), a UI-style asset backfill of the tile-year assets runs through a real
``dagster-daemon``; the daemon is SIGKILLed while runs are in flight and others still
queued, then started again. Every asset-partition is made exactly once, by one run, and
the backfill completes. The steps' work is simulated (``backfill_sim_defs``): the daemon
sees the pipeline's own assets, partitions and backfill policy.

The same at a continent (1,611 runs of 8 x 8-tile blocks, the daemon killed while it
creates them) is ``bench/bench_backfill.py``; docs/scaling.md has its figures.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from agrifm_pipeline.defs.partitions import tile_year_key
from agrifm_pipeline_tests.backfill_sim_defs import LOG_ENV, WORK_ENV
from agrifm_pipeline_tests.daemon_helpers import add_asset_backfill, wait_for
from agrifm_pipeline_tests.postgres_server import fresh_database
from agrifm_pipeline_tests.process_group import stop_group

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TILES = [f"32631_1280m_E{col:04d}_N4392" for col in range(400, 440)]
YEARS = (2018, 2019)
postgres_url = pytest.fixture(scope="module", name="postgres_url")(fresh_database)

pytestmark = pytest.mark.postgres


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:  # each daemon's session: its code server and the runs it launched
        if proc.poll() is None:
            stop_group(proc)
        else:  # the killed daemon's code server may outlive it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def test_a_backfill_resumes_after_its_daemon_is_killed(
    tmp_path: Path,
    postgres_url: str,
    started: list[subprocess.Popen],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dagster._core.execution.backfill import BulkActionStatus

    import agrifm_pipeline_tests.backfill_sim_defs as sim

    home = tmp_path / "dagster_home"
    home.mkdir()
    cfg = yaml.safe_load((REPO_ROOT / "deploy" / "dagster.yaml").read_text())
    cfg["concurrency"]["runs"]["max_concurrent_runs"] = 2  # a queue builds up behind them
    (home / "dagster.yaml").write_text(yaml.safe_dump(cfg))
    ws = tmp_path / "workspace.yaml"
    ws.write_text(
        yaml.safe_dump(
            {
                "load_from": [
                    {
                        "python_module": {
                            "module_name": "agrifm_pipeline_tests.backfill_sim_defs",
                            "working_directory": str(REPO_ROOT),
                            "location_name": "backfill_sim",
                        }
                    }
                ]
            }
        )
    )
    made = tmp_path / "made.log"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DAGSTER_POSTGRES_URL": postgres_url,
        LOG_ENV: str(made),
        WORK_ENV: "2",
        "AGRIFM_PIPELINE_BLOCK_SIDE": "1",
    }
    log = tmp_path / "daemon.log"

    def start_daemon() -> subprocess.Popen:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(BIN / "dagster-daemon"), "run", "-w", str(ws)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=tmp_path,
            )  # fmt: skip
        started.append(proc)
        return proc

    monkeypatch.setenv("DAGSTER_POSTGRES_URL", postgres_url)  # this process's instance
    graph = sim.defs.resolve_asset_graph()
    selection = [k for k in graph.get_all_asset_keys() if graph.get(k).partitions_def is not None]
    keys = [str(tile_year_key(t, y)) for y in YEARS for t in TILES]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("tiles", TILES)
        backfill_id = add_asset_backfill(instance, graph, keys, selection, "resume")

        def runs() -> list[dg.DagsterRun]:
            return list(instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id})))

        def backfill() -> Any:
            """The backfill; an AssertionError at once where it failed."""
            bf = instance.get_backfill(backfill_id)
            if bf is None or bf.status not in (
                BulkActionStatus.REQUESTED,
                BulkActionStatus.COMPLETED_SUCCESS,
            ):
                raise AssertionError(f"backfill {bf and bf.status}\n{log.read_text()[-6000:]}")
            return bf

        def statuses() -> collections.Counter:
            backfill()
            return collections.Counter(r.status for r in runs())

        daemon = start_daemon()
        # Killed once a run has finished while others are still queued or running.
        wait_for(
            "a finished run with others still to go",
            lambda: (
                (s := statuses())[dg.DagsterRunStatus.SUCCESS] >= 1
                and s[dg.DagsterRunStatus.QUEUED] >= 1
            ),
            300,
            log,
        )
        before = statuses()
        daemon.send_signal(signal.SIGKILL)  # the daemon alone: its runs go on, as on k8s
        daemon.wait(30)
        time.sleep(3)
        start_daemon()

        def finished() -> bool:
            return backfill().status != BulkActionStatus.REQUESTED and all(
                r.is_finished for r in runs()
            )

        wait_for("the backfill to complete after the restart", finished, 600, log)
        assert backfill().status == BulkActionStatus.COMPLETED_SUCCESS
        done = runs()
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in done), statuses()
        assert not any("dagster/retry_number" in r.tags for r in done)  # nothing re-run
        assert before[dg.DagsterRunStatus.QUEUED] >= 1  # the kill left work in the queue
        # Every asset-partition made exactly once, by one run of this backfill.
        lines = [ln.split(" ") for ln in made.read_text().splitlines()]
        count = collections.Counter((asset, pk) for _, asset, pk in lines)
        want = {(k.to_user_string(), pk) for k in selection for pk in keys}
        assert set(count) == want
        assert [item for item, n in count.items() if n > 1] == []
        assert {run_id for run_id, _, _ in lines} == {r.run_id for r in done}
        for key in selection:  # and Dagster's record agrees
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key), limit=10 * len(keys)
            ).records
            assert sorted(r.partition_key for r in records) == sorted(keys), key
