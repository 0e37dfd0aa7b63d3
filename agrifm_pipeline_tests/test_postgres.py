"""The instance the project writes, on SQLite (``agrifm-pipeline home``) and on a real
PostgreSQL (``deploy/dagster.yaml``): the pipeline runs on it, and a run whose process
is killed with SIGKILL is marked failed and frees its pool slot, so the next run completes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

from agrifm_pipeline.demo import (
    FREE_SLOTS_AFTER_S,
    MONITOR_POLL_S,
    POOL_LIMITS,
    prepare_home,
    set_pool_limits,
)
from agrifm_pipeline_tests.daemon_helpers import wait_for
from agrifm_pipeline_tests.dagster_pool_job import HOLD_TAG
from agrifm_pipeline_tests.postgres_server import fresh_database
from agrifm_pipeline_tests.process_group import stop_group

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY_YAML = REPO_ROOT / "deploy" / "dagster.yaml"
BIN = Path(sys.executable).parent
postgres_url = pytest.fixture(scope="session", name="postgres_url")(fresh_database)


def _instance_env(home: Path, url: str | None) -> dict[str, str]:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    if url is not None:
        env["DAGSTER_POSTGRES_URL"] = url
    return env


@pytest.fixture
def deploy_home(tmp_path: Path, postgres_url: str, monkeypatch) -> Path:
    """$DAGSTER_HOME holding deploy/dagster.yaml as shipped, on the session's database."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY_YAML, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", postgres_url)
    return home


@pytest.mark.postgres
def test_deploy_instance_is_postgres_queued_and_monitored(deploy_home: Path) -> None:
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_monitoring_enabled
        settings = instance.run_monitoring_settings
        assert settings["free_slots_after_run_end_seconds"] > 0
        queue = instance.get_concurrency_config().run_queue_config
        assert queue is not None and queue.max_concurrent_runs == 8
        # A continent's backfill is submitted on threads (docs/scaling.md).
        backfills = instance.get_settings("backfills")
        assert backfills["use_threads"] is True and backfills["num_submit_workers"] == 4
        # `agrifm-pipeline home` sets the pool limits on this instance too.
        set_pool_limits(instance)
        for pool, limit in POOL_LIMITS.items():
            assert instance.event_log_storage.get_concurrency_info(pool).slot_count == limit
    # The driver is named in the URL the file reads; the psycopg 3 default is never used.
    cfg = yaml.safe_load(DEPLOY_YAML.read_text())
    assert cfg["storage"]["postgres"]["postgres_url"] == {"env": "DAGSTER_POSTGRES_URL"}


@pytest.mark.postgres
def test_pipeline_materialises_on_postgres(deploy_home: Path, tmp_path: Path) -> None:
    """A run over two partitions: each partition's metadata recorded, and each check's
    evaluation stored against its own partition; no evaluation is left PLANNED."""
    from dagster._core.storage.asset_check_execution_record import (
        AssetCheckExecutionRecordStatus,
    )

    from agrifm_pipeline_tests.pipeline_helpers import TILES, make_pipeline

    with dg.DagsterInstance.get() as instance:
        pipe = make_pipeline(tmp_path, instance=instance)
        result = pipe.materialise(TILES, [2019])
        assert result.success
        keys = [str(dg.MultiPartitionKey({"tile": t, "year": "2019"})) for t in TILES]
        stores = {
            "s2_frame_stack": pipe.storage.store("s2_frame_stack"),
            "agrifm_embedding_grid": pipe.storage.store("agrifm_embedding_grid"),
            "chip_embeddings": pipe.storage.files("chip_embeddings"),
        }
        for asset, store in stores.items():
            for tile, key in zip(TILES, keys, strict=True):
                records = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]),
                    limit=5,
                ).records
                assert len(records) == 1, asset
                meta = records[0].asset_materialization.metadata  # type: ignore[union-attr]
                current = store.current(2019, tile)
                assert current is not None and meta["version"].value == current.id, asset
        graph = pipe.defs.resolve_asset_graph()
        for check_key in graph.asset_check_keys:
            history = instance.event_log_storage.get_asset_check_execution_history(
                check_key, limit=20
            )
            mine = [r for r in history if r.run_id == result.run_id]
            assert sorted(str(r.partition) for r in mine) == sorted(keys), check_key
            for r in mine:
                assert r.status != AssetCheckExecutionRecordStatus.PLANNED, check_key
                evaluation = r.event.dagster_event.asset_check_evaluation_data  # type: ignore[union-attr]
                want = (
                    AssetCheckExecutionRecordStatus.SUCCEEDED
                    if evaluation.passed
                    else AssetCheckExecutionRecordStatus.FAILED
                )
                assert r.status == want and evaluation.partition == r.partition


# -- a dead run frees its pool slot ------------------------------------------------------------
def _workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace.yaml"
    ws.write_text(
        yaml.safe_dump(
            {
                "load_from": [
                    {
                        "python_file": {
                            "relative_path": str(
                                REPO_ROOT / "agrifm_pipeline_tests" / "dagster_pool_job.py"
                            ),
                            "working_directory": str(REPO_ROOT),
                            "location_name": "pool_job",
                        }
                    }
                ]
            }
        )
    )
    return ws


def _launch(ws: Path, env: dict[str, str], tags: dict[str, str]) -> None:
    subprocess.run(
        [str(BIN / "dagster"), "job", "launch", "-w", str(ws), "-j", "encoder_pool_job",
         "--tags", json.dumps(tags)],
        env=env, check=True, capture_output=True, timeout=180,
    )  # fmt: skip


@pytest.fixture
def daemon() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:  # the daemon and the code servers it started (its own session)
        stop_group(proc)


def _killed_run_frees_its_slot(
    tmp_path: Path, home: Path, env: dict[str, str], daemon: list[subprocess.Popen]
) -> None:
    ws = _workspace(tmp_path)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        set_pool_limits(instance)  # as `agrifm-pipeline home` does: agrifm_encoder = 1
        poll = instance.run_monitoring_settings["poll_interval_seconds"]
        free_after = instance.run_monitoring_settings["free_slots_after_run_end_seconds"]
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        daemon.append(
            subprocess.Popen(
                [str(BIN / "dagster-daemon"), "run", "-w", str(ws)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        )  # fmt: skip
    pidfile = tmp_path / "held.pid"
    _launch(ws, env, {HOLD_TAG: str(pidfile)})
    with dg.DagsterInstance.from_config(str(home)) as instance:
        pid = int(
            wait_for(
                "the first run to hold the slot",
                lambda: pidfile.exists() and pidfile.read_text(),
                240,
                log,
            )
        )
        claimed = wait_for(
            "the slot claim",
            lambda: instance.event_log_storage.get_concurrency_info("agrifm_encoder").claimed_slots,
            60,
            log,
        )
        held_by = claimed[0].run_id
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _launch(ws, env, {})
        runs = instance.get_run_records(dg.RunsFilter(job_name="encoder_pool_job"))
        second = next(r.dagster_run.run_id for r in runs if r.dagster_run.run_id != held_by)

        def finished() -> dg.DagsterRunStatus | None:
            run = instance.get_run_by_id(second)
            return run.status if run is not None and run.is_finished else None

        # Marked failed, slot freed, second run launched and done: within the stated time.
        bound = poll + free_after + 60
        status = wait_for("the second run to finish", finished, bound + 120, log)
        elapsed = time.monotonic() - killed_at
        assert status == dg.DagsterRunStatus.SUCCESS
        dead = instance.get_run_by_id(held_by)
        assert dead is not None and dead.status == dg.DagsterRunStatus.FAILURE
        assert not instance.event_log_storage.get_concurrency_info("agrifm_encoder").claimed_slots
        assert elapsed < bound, f"the slot came back after {elapsed:.0f} s (bound {bound} s)"


def test_killed_run_frees_its_slot_on_the_home_instance(
    tmp_path: Path, daemon: list[subprocess.Popen], monkeypatch
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = prepare_home(tmp_path / "agrifm")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_monitoring_settings["poll_interval_seconds"] == MONITOR_POLL_S
        assert (
            instance.run_monitoring_settings["free_slots_after_run_end_seconds"]
            == FREE_SLOTS_AFTER_S
        )
    _killed_run_frees_its_slot(tmp_path, home, _instance_env(home, None), daemon)


@pytest.mark.postgres
def test_killed_run_frees_its_slot_on_postgres(
    tmp_path: Path,
    deploy_home: Path,
    postgres_url: str,
    daemon: list[subprocess.Popen],
) -> None:
    _killed_run_frees_its_slot(
        tmp_path, deploy_home, _instance_env(deploy_home, postgres_url), daemon
    )


def test_home_keeps_hand_edits_but_gains_run_monitoring(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = tmp_path / "agrifm" / "dagster"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nrun_queue:\n  max_concurrent_runs: 2\n"
    )
    assert prepare_home(tmp_path / "agrifm") == home.resolve()
    cfg = yaml.safe_load((home / "dagster.yaml").read_text())
    assert cfg["run_queue"] == {"max_concurrent_runs": 2}
    assert cfg["run_monitoring"]["enabled"] is True
    # An old file the project wrote itself is replaced by today's template.
    (home / "dagster.yaml").write_text(
        "# written by agrifm-pipeline demo\ntelemetry:\n  enabled: false\n"
    )
    prepare_home(tmp_path / "agrifm")
    cfg = yaml.safe_load((home / "dagster.yaml").read_text())
    assert cfg["concurrency"]["pools"]["granularity"] == "op"
    assert cfg["run_monitoring"]["free_slots_after_run_end_seconds"] == FREE_SLOTS_AFTER_S


@pytest.mark.postgres
def test_a_server_is_started_where_none_answers() -> None:
    """The fallback the fixture takes on a machine without a running PostgreSQL."""
    import psycopg2

    from agrifm_pipeline_tests.postgres_server import _binaries, _OwnServer

    bins = _binaries()
    assert bins is not None, "no initdb/pg_ctl here; the fixture would use pgserver"
    own = _OwnServer(*bins)
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=own.port, user="postgres", dbname="postgres")
        with conn.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
        conn.close()
    finally:
        own.stop()
    assert not own.dir.exists()
