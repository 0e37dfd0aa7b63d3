"""The compute engine on a real dask cluster: a scheduler and 2 worker processes on
127.0.0.1, each worker in its own working directory with its own checkpoint cache,
sharing only the store.

The shared store is a directory, or a bucket on S3 (moto on 127.0.0.1). A Dagster
run of 4 tile-years hands its tile-years to the cluster: both workers do work, the workers write the partitions themselves, and the step records what they
return. A worker killed with SIGKILL in the middle of the run loses and duplicates
nothing: the run completes and every partition has exactly one current version,
made by that run, and no partition was committed twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from agrifm_pipeline.compute import Compute
from agrifm_pipeline.definitions import build_defs
from agrifm_pipeline.defs.partitions import tile_year_key
from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
from agrifm_pipeline.defs.resources import ZarrStorage
from agrifm_pipeline_tests.pipeline_helpers import TILES, YEARS, make_resources
from agrifm_pipeline_tests.process_group import stop_group

pytestmark = pytest.mark.distributed

ASSETS = ("s2_frame_stack", "normalized_tensors", "agrifm_embedding_grid")


@dataclass
class Cluster:
    address: str
    scheduler: subprocess.Popen
    workers: dict[str, subprocess.Popen]  # name -> process
    dirs: dict[str, Path]

    def client(self):  # type: ignore[no-untyped-def]
        from distributed import Client

        return Client(self.address, set_as_default=False, timeout="30s")


def _start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("wb")
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with _cluster(tmp_path) as c:
        yield c


@contextlib.contextmanager
def _cluster(tmp_path: Path, gpu_workers: tuple[str, ...] = ()) -> Iterator[Cluster]:
    """A scheduler and workers ``worker-a`` and ``worker-b``; those named in
    ``gpu_workers`` declare the worker resource ``GPU=1`` (a resource is only a
    scheduling label to dask, so a CPU host can declare one in a test)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    sched_file = tmp_path / "scheduler.json"
    scheduler = _start(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
        tmp_path, env, tmp_path / "scheduler.log",
    )  # fmt: skip
    workers: dict[str, subprocess.Popen] = {}
    dirs: dict[str, Path] = {}
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sched_file.exists(), (tmp_path / "scheduler.log").read_text()
        for name in ("worker-a", "worker-b"):
            home = tmp_path / name
            (home / "cache").mkdir(parents=True)
            dirs[name] = home
            wenv = {**env, "RS_EMBED_AGRIFM_CACHE_DIR": str(home / "cache")}
            gpu = ["--resources", "GPU=1"] if name in gpu_workers else []
            workers[name] = _start(
                [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                 str(sched_file), "--name", name, "--nworkers", "1", "--nthreads", "1",
                 "--no-dashboard", "--no-nanny", "--local-directory", str(home / "dask"), *gpu],
                home, wenv, home / "worker.log",
            )  # fmt: skip
        import json

        address = json.loads(sched_file.read_text())["address"]
        c = Cluster(address, scheduler, workers, dirs)
        with c.client() as client:
            client.wait_for_workers(2, timeout=120)
        yield c
    finally:
        for proc in [*workers.values(), scheduler]:
            stop_group(proc)


@pytest.fixture(params=["local", "s3"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> ZarrStorage:
    """The only thing the step and the workers share: a directory, or an S3 bucket."""
    if request.param == "local":
        return ZarrStorage(root=str(tmp_path / "store"), regions_dir=str(tmp_path / "regions"))
    server = request.getfixturevalue("s3_server")
    return ZarrStorage(
        root=f"s3://{server.bucket()}/agrifm",
        storage_options=server.options(),
        regions_dir=str(tmp_path / "regions"),
    )


def _pipeline(root: Path, address: str, storage: ZarrStorage):  # type: ignore[no-untyped-def]
    resources = make_resources(root)
    resources["storage"] = storage
    resources["compute"] = Compute(address=address)
    defs = build_defs(resources)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("tiles", TILES)
    return resources, defs, instance


def _materialise(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    years: tuple[int, int] = (YEARS[0], YEARS[-1]),
) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def("embed_tile_years")
    return job.execute_in_process(
        instance=instance,
        raise_on_error=False,
        tags={
            RANGE_START: str(tile_year_key(TILES[0], years[0])),
            RANGE_END: str(tile_year_key(TILES[-1], years[-1])),
        },
    )


def _task_workers(instance: dg.DagsterInstance, run_id: str) -> dict[str, set[str]]:
    """stage -> the workers that ran its tasks, from the step's log lines."""
    out: dict[str, set[str]] = {}
    for entry in instance.all_logs(run_id):
        msg = entry.user_message or ""
        for stage in ("acquisition", "embed"):
            marker = f": {stage} on "
            if marker in msg:
                out.setdefault(stage, set()).add(msg.split(marker, 1)[1].split(" ", 1)[0])
    return out


def _assert_one_version_each(storage, run_id: str) -> None:  # type: ignore[no-untyped-def]
    for asset in ASSETS:
        store = storage.store(asset)
        for tile in TILES:
            for year in YEARS:
                current = store.current(year, tile)
                assert current is not None, (asset, tile, year)
                assert store.lineage(year, tile, current.id)["run_id"] == run_id
                # Each test starts from an empty store: one commit in all, none replaced.
                pointer = store.pointer(year, tile)
                assert pointer["run_id"] == run_id and pointer["history"] == [], (asset, pointer)


def test_a_run_is_spread_over_both_workers(
    cluster: Cluster, shared_store: ZarrStorage, tmp_path: Path
) -> None:
    resources, defs, instance = _pipeline(tmp_path, cluster.address, shared_store)
    result = _materialise(defs, instance)
    assert result.success
    used = _task_workers(instance, result.run_id)
    with cluster.client() as client:
        addresses = set(client.scheduler_info()["workers"])
    assert used["embed"] == addresses and len(addresses) == 2  # both did encoding work
    _assert_one_version_each(resources["storage"], result.run_id)
    # The step recorded the workers' metadata and one check evaluation per partition.
    wanted = {str(tile_year_key(t, y)) for t in TILES for y in YEARS}
    grids = [
        e.step_materialization_data.materialization
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("agrifm_embedding_grid")
    ]
    assert {str(m.partition) for m in grids} == wanted
    finite = [e for e in result.get_asset_check_evaluations() if e.check_name == "embedding_finite"]
    assert {str(e.partition) for e in finite} == wanted and all(e.passed for e in finite)
    # Recorded after the step's results, each names the materialization it judged (so the
    # check's Partitions tab in the UI counts it; see test_webserver).
    made = {
        r.partition_key: r.storage_id
        for r in instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("agrifm_embedding_grid")), limit=100
        ).records
        if r.run_id == result.run_id
    }
    targets = {str(e.partition): e.target_materialization_data for e in finite}
    assert {k: t.storage_id for k, t in targets.items() if t is not None} == made
    # Each worker kept its own checkpoint cache and working directory; the store is shared.
    assert not any((d / "store").exists() for d in cluster.dirs.values())
    if shared_store.root.startswith("s3://"):  # and on S3 nothing went to a local default
        assert not (tmp_path / "store").exists()
        grid = resources["storage"].store("agrifm_embedding_grid").current(YEARS[0], TILES[0])
        assert grid.url.startswith(shared_store.root + "/")


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(
    cluster: Cluster, shared_store: ZarrStorage, tmp_path: Path
) -> None:
    resources, defs, instance = _pipeline(tmp_path, cluster.address, shared_store)
    box: dict[str, dg.ExecuteInProcessResult] = {}
    run = threading.Thread(target=lambda: box.update(result=_materialise(defs, instance)))
    run.start()
    victim = None
    with cluster.client() as client:
        names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
        deadline = time.monotonic() + 300
        while victim is None and time.monotonic() < deadline and run.is_alive():
            for address, keys in client.processing().items():
                if any("agrifm-embed-" in str(k) for k in keys):
                    victim = names[address]
                    break
            time.sleep(0.1)
    assert victim is not None, "no embedding task was seen running"
    cluster.workers[victim].send_signal(signal.SIGKILL)
    run.join(600)
    assert not run.is_alive()
    result = box["result"]
    assert result.success
    assert cluster.workers[victim].wait(10) == -signal.SIGKILL
    _assert_one_version_each(resources["storage"], result.run_id)


def test_tasks_use_the_checkpoint_the_step_names(monkeypatch, tmp_path: Path) -> None:
    """A task is sent the step's checkpoint (its RS_EMBED_AGRIFM_CKPT when the resource
    names none), so a worker whose own environment names another one cannot use it."""
    import pickle

    from agrifm_pipeline.defs.resources import AgriFMModel, S2Source, TileYearConfig, ZarrStorage
    from agrifm_pipeline.defs.tasks import StepSpec

    monkeypatch.setenv("RS_EMBED_AGRIFM_CKPT", "untrained:3")
    storage = ZarrStorage(root=str(tmp_path / "store"))
    spec = StepSpec.of("run", TileYearConfig(), S2Source(), storage, AgriFMModel())
    monkeypatch.setenv("RS_EMBED_AGRIFM_CKPT", "untrained:4")  # the worker's environment
    sent = pickle.loads(pickle.dumps(spec))
    assert sent.model is not None and sent.model.checkpoint == "untrained:3"
    assert sent.model.resolved().untrained_seed == 3
    explicit = StepSpec.of(
        "run", TileYearConfig(), S2Source(), storage, AgriFMModel(checkpoint="untrained:7")
    )
    assert explicit.model is not None and explicit.model.checkpoint == "untrained:7"
    assert sent.storage.root == storage.root


def test_encoding_tasks_go_to_the_workers_that_declare_a_gpu(tmp_path: Path) -> None:
    """Where some workers declare ``GPU=1``, every encoding task runs on them (one at a
    time per GPU) and acquisition still uses every worker."""
    with _cluster(tmp_path, gpu_workers=("worker-b",)) as cluster:
        storage = ZarrStorage(root=str(tmp_path / "store"), regions_dir=str(tmp_path / "regions"))
        resources, defs, instance = _pipeline(tmp_path, cluster.address, storage)
        assert resources["compute"].has_gpu_workers()
        result = _materialise(defs, instance)
        assert result.success
        used = _task_workers(instance, result.run_id)
        with cluster.client() as client:
            by_name = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
        assert used["embed"] == {by_name["worker-b"]}
        assert used["acquisition"] <= set(by_name.values())
        logs = [e.user_message or "" for e in instance.all_logs(result.run_id)]
        assert any("2 worker(s), 2 thread(s), 1 GPU(s)" in m for m in logs)
        _assert_one_version_each(resources["storage"], result.run_id)


def test_acquisition_leases_bound_the_whole_cluster(cluster: Cluster) -> None:
    """``acquisition_slot`` is a cluster-wide semaphore: with a limit of 1, tasks on two
    worker processes never hold it at the same time (without it they overlap)."""
    from agrifm_pipeline.compute import acquisition_slot

    def hold(i: int, limit: int | None) -> tuple[float, float, str]:
        import time as t

        from distributed import get_worker

        with acquisition_slot(limit) if limit else contextlib.nullcontext():
            start = t.time()
            t.sleep(0.4)
            return start, t.time(), get_worker().address

    def most_at_once(spans: list[tuple[float, float, str]]) -> int:
        return max(sum(s <= start < e for s, e, _ in spans) for start, _, _ in spans)

    with cluster.client() as client:
        for limit, expected in ((None, 2), (1, 1)):
            futures = [client.submit(hold, i, limit, pure=False) for i in range(6)]
            spans = client.gather(futures)
            assert len({w for _, _, w in spans}) == 2  # both workers ran some
            assert most_at_once(spans) == expected, (limit, spans)


def test_the_embedded_local_cluster_runs_the_tasks_in_its_own_worker_processes(
    tmp_path: Path,
) -> None:
    """``AGRIFM_PIPELINE_DASK_ADDRESS=local``: a LocalCluster of worker processes sized
    to the machine; unset: no cluster, the step does the work in the run's process."""
    from agrifm_pipeline.compute import _CLIENTS, compute_from_env, machine_cores

    assert compute_from_env({"AGRIFM_PIPELINE_DASK_ADDRESS": "local"}) == Compute(
        local_cluster=True
    )
    assert compute_from_env({"AGRIFM_PIPELINE_DASK_ADDRESS": " tcp://h:8786 "}).address == (
        "tcp://h:8786"
    )
    assert not compute_from_env({}).uses_cluster
    compute = Compute(local_cluster=True)
    storage = ZarrStorage(root=str(tmp_path / "store"), regions_dir=str(tmp_path / "regions"))
    resources = {**make_resources(tmp_path), "compute": compute, "storage": storage}
    defs = build_defs(resources)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("tiles", TILES)
    try:
        result = _materialise(defs, instance)
        assert result.success
        workers = compute.client().scheduler_info()["workers"]
        assert len(workers) == 1  # no GPU here: one worker with every core
        used = _task_workers(instance, result.run_id)
        assert used["acquisition"] == used["embed"] == set(workers)
        logs = [e.user_message or "" for e in instance.all_logs(result.run_id)]
        cores = machine_cores()
        assert any(
            f"embedded LocalCluster: 1 worker(s), {cores} thread(s), 0 GPU(s)" in m for m in logs
        )
        _assert_one_version_each(storage, result.run_id)
    finally:
        client = _CLIENTS.pop(compute._key(), None)
        if client is not None:
            cluster = client.cluster
            client.close()
            cluster.close()


def test_an_address_without_a_scheduler_is_a_settings_error() -> None:
    import socket

    from agrifm_pipeline.errors import SettingsError

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    compute = Compute(address=f"tcp://127.0.0.1:{port}", connect_timeout_s=2)
    with pytest.raises(SettingsError, match=f"tcp://127.0.0.1:{port}.*no dask scheduler"):
        compute.client()


def test_each_worker_loads_the_model_once_for_every_run(cluster: Cluster, tmp_path: Path) -> None:
    """Workers outlive runs: the second run's tasks use the engine each worker process
    loaded in the first (keyed by the checkpoint's sha256), none is loaded again."""
    storage = ZarrStorage(root=str(tmp_path / "store"), regions_dir=str(tmp_path / "regions"))
    resources, defs, instance = _pipeline(tmp_path, cluster.address, storage)

    def engines() -> list[tuple[str, int]]:
        from agrifm_pipeline import inference

        return [(str(key[0]), id(engine)) for key, engine in inference._ENGINES.items()]

    loaded = []
    for year in YEARS:
        result = _materialise(defs, instance, (year, year))
        assert result.success
        assert _task_workers(instance, result.run_id)["embed"]
        with cluster.client() as client:
            loaded.append(client.run(engines))
    sha = resources["model"].resolved().sha256
    for worker, held in loaded[0].items():  # a worker's engine of run 1 is the one of run 2
        assert not held or loaded[1][worker] == held, worker
    assert all(held == [] or [k for k, _ in held] == [sha] for held in loaded[1].values())
    assert any(loaded[0].values())


def test_a_block_partition_on_the_cluster_puts_each_tile_on_its_block(
    cluster: Cluster, tmp_path: Path
) -> None:
    """With block partitions, the tasks still do one tile-year each; what they return is
    recorded on the block (each tile's version in ``versions``, one check evaluation per
    block), as a run in the step's own process records it."""
    from agrifm_pipeline.defs.sensors import region_files_sensor

    from .pipeline_helpers import write_region

    write_region(tmp_path / "regions" / "pair.geojson", 573500, 5621800, 575900, 5623000)
    storage = ZarrStorage(root=str(tmp_path / "store"), regions_dir=str(tmp_path / "regions"))
    resources = {
        **make_resources(tmp_path, block_side=2),
        "storage": storage,
        "compute": Compute(address=cluster.address),
    }
    instance = dg.DagsterInstance.ephemeral()
    tick = region_files_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert isinstance(tick, dg.SensorResult)
    for req in tick.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    block = "32631_1280m_2x2_E0224_N2196"
    assert instance.get_dynamic_partitions("tiles") == [block]
    key = str(tile_year_key(block, YEARS[0]))
    result = (
        build_defs(resources)
        .resolve_job_def("embed_tile_years")
        .execute_in_process(
            instance=instance, raise_on_error=False, tags={RANGE_START: key, RANGE_END: key}
        )
    )
    assert result.success
    assert _task_workers(instance, result.run_id)["embed"]  # the tiles went to the workers
    for asset in ASSETS:
        store = storage.store(asset)
        made = {t: store.current(YEARS[0], t) for t in TILES}
        assert all(v is not None for v in made.values()), asset
        rec = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1
        ).records[0]
        meta = rec.asset_materialization.metadata
        assert meta["versions"].value == {t: v.id for t, v in made.items()}, asset
    finite = [e for e in result.get_asset_check_evaluations() if e.check_name == "embedding_finite"]
    assert [str(e.partition) for e in finite] == [key]
    assert finite[0].passed and finite[0].metadata["tiles_judged"].value == 2
