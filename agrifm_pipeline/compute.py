"""The compute engine: dask.distributed, with the tile-year as the task.

A Dagster step hands its tile-years to a dask cluster and gets back one small
record per tile-year (the partition's metadata); the tasks themselves read their
inputs from the store and commit their partitions' versions there
(:mod:`agrifm_pipeline.storage`). The cluster is either

* none (the default): the step does the work itself, in its own process (the
  run's only process that imports torch; the model is cached there); or
* an embedded ``LocalCluster`` of worker processes sized to the machine
  (``local_cluster=True``; one worker per GPU, else one worker with every core); or
* any running scheduler (``address="tcp://host:8786"``): ``dask scheduler`` and
  ``dask worker`` by hand, dask-jobqueue on SLURM/PBS, dask-kubernetes, a cloud
  service. Its workers live across runs, so each worker process loads the model
  once (keyed by the checkpoint's sha256, see :func:`agrifm_pipeline.inference.get_engine`)
  and keeps it for every later task and run.

Encoding tasks ask for the worker resource ``GPU=1`` when the cluster has workers
that declare it (``dask worker --resources GPU=1``), so they land on GPU workers
and one at a time per GPU; acquisition tasks take a lease of a cluster-wide
``distributed.Semaphore`` so the whole cluster stays within the provider's limit
(Earth Engine: fewer than 40 concurrent requests).

A worker killed mid-task loses nothing: the scheduler runs the task again on
another worker, and a task that finds its partition already committed by the
same Dagster run returns that version instead of writing a second one, so every
partition ends with exactly one current version made by the run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import dagster as dg
from pydantic import Field

from agrifm_pipeline.errors import SettingsError

GPU = "GPU"
ACQUISITION_SEMAPHORE = "agrifm-acquisition"

_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def machine_cores() -> int:
    """Cores this process may use (the affinity mask where there is one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - a broken CUDA setup counts as none
        return 0


class Compute(dg.ConfigurableResource):
    """Where the tile-years' work runs: in the step, an embedded LocalCluster, or a
    dask scheduler's cluster."""

    address: str | None = Field(
        default=None,
        description=(
            "dask scheduler address (tcp://host:8786); unset = no cluster, or the "
            "embedded one with local_cluster (env AGRIFM_PIPELINE_DASK_ADDRESS; 'local' "
            "for the embedded one)"
        ),
    )
    local_cluster: bool = Field(
        default=False,
        description=(
            "without an address: start a LocalCluster of worker processes sized to this "
            "machine for the run's tasks (default off: the steps do the work themselves)"
        ),
    )
    n_workers: int | None = Field(
        default=None, description="embedded cluster: workers (default one per GPU, else one)"
    )
    threads_per_worker: int | None = Field(
        default=None, description="embedded cluster: threads per worker (default the cores)"
    )
    acquisition_limit: int = Field(
        default=32,
        description=(
            "acquisition tasks at once over the whole cluster (a distributed.Semaphore); "
            "Earth Engine allows fewer than 40 concurrent requests per project"
        ),
    )
    retries: int = Field(
        default=1, description="extra tries of a task that raised (a dead worker is retried anyway)"
    )
    connect_timeout_s: float = Field(
        default=30.0, description="how long to wait for the scheduler at address to answer"
    )

    @property
    def uses_cluster(self) -> bool:
        return bool(self.address) or self.local_cluster

    def _key(self) -> tuple[Any, ...]:
        return (self.address, self.local_cluster, self.n_workers, self.threads_per_worker)

    def client(self) -> Any:
        """This process's client for the configured cluster (created once, then reused)."""
        key = self._key()
        with _CLIENTS_LOCK:
            client = _CLIENTS.get(key)
            if client is not None and client.status == "running":
                return client
            client = self._connect()
            _CLIENTS[key] = client
            return client

    def _connect(self) -> Any:
        from distributed import Client, LocalCluster

        if self.address:
            try:
                return Client(
                    self.address, timeout=f"{self.connect_timeout_s}s", set_as_default=False
                )
            except (OSError, TimeoutError) as exc:
                raise SettingsError(
                    f"compute.address={self.address!r} (AGRIFM_PIPELINE_DASK_ADDRESS): no dask "
                    f"scheduler answers there ({exc}); start one (`dask scheduler`), or unset it "
                    "to do the work in the run's own process ('local': an embedded LocalCluster)"
                ) from None
        gpus = local_gpus()
        n_workers = self.n_workers or max(1, gpus)
        threads = self.threads_per_worker or max(1, machine_cores() // n_workers)
        resources = {GPU: 1} if gpus else None
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            resources=resources,
        )
        return Client(cluster, set_as_default=False)

    def has_gpu_workers(self) -> bool:
        info = self.client().scheduler_info()
        return any(w.get("resources", {}).get(GPU) for w in info.get("workers", {}).values())

    def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        keys: Iterable[str],
        gpu: bool = False,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """Run ``fn(item, **kwargs)`` for every item as a task; yield results as they finish.

        ``keys`` names each task (the run id and partition in them), so a task the
        scheduler re-runs after a worker died keeps its name. ``gpu`` asks for one
        unit of the ``GPU`` resource where the cluster has GPU workers. The first
        task that fails for good cancels the rest and raises its error.
        """
        from distributed import as_completed

        client = self.client()
        resources = {GPU: 1} if gpu and self.has_gpu_workers() else None
        futures = [
            client.submit(
                fn, item, key=key, resources=resources, retries=self.retries, pure=False, **kwargs
            )
            for item, key in zip(items, keys, strict=True)
        ]
        try:
            for future in as_completed(futures, loop=client.loop):
                yield future.result()
        finally:
            client.cancel([f for f in futures if not f.done()])

    def describe(self) -> str:
        info = self.client().scheduler_info()
        workers = info.get("workers", {})
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        gpus = sum(w.get("resources", {}).get(GPU, 0) for w in workers.values())
        where = self.address or "embedded LocalCluster"
        return f"{where}: {len(workers)} worker(s), {threads} thread(s), {gpus:g} GPU(s)"


def compute_from_env(env: Mapping[str, str] | None = None) -> Compute:
    """``AGRIFM_PIPELINE_DASK_ADDRESS`` (a scheduler; ``local`` for an embedded
    LocalCluster), else the steps do the work themselves."""
    env = os.environ if env is None else env
    address = (env.get("AGRIFM_PIPELINE_DASK_ADDRESS") or "").strip()
    if address == "local":
        return Compute(local_cluster=True)
    return Compute(address=address or None)


# -- inside a task -----------------------------------------------------------------------------
def worker_identity() -> dict[str, Any]:
    """Which worker ran a task: its address (embedded threads: 'in-process'), host and pid."""
    try:
        from distributed import get_worker

        address = get_worker().address
    except ValueError:
        address = "in-process"
    return {"worker": address, "host": socket.gethostname(), "pid": os.getpid()}


@contextlib.contextmanager
def acquisition_slot(limit: int) -> Iterator[None]:
    """A lease of the cluster-wide acquisition semaphore (nothing outside a worker)."""
    try:
        from distributed import Semaphore, get_worker

        get_worker()
    except (ImportError, ValueError):
        yield
        return
    sem = Semaphore(max_leases=limit, name=ACQUISITION_SEMAPHORE)
    with sem:
        yield


@dataclass(eq=False)
class TaskContext:
    """What the tile-year functions need of a Dagster step's context, inside a task:
    the run's id, the asset, and somewhere to put each partition's metadata (which
    goes back to the step in the task's result, and the step records it). Hashed by
    identity, as a step's context is (``steps`` keeps per-run state keyed by context)."""

    run_id: str
    asset_key: dg.AssetKey
    metadata: list[tuple[dg.AssetKey, str, dict[str, Any]]] = field(default_factory=list)

    @property
    def run(self) -> Any:
        return SimpleNamespace(run_id=self.run_id)

    def add_asset_metadata(
        self,
        metadata: dict[str, Any],
        partition_key: str | None = None,
        asset_key: dg.AssetKey | None = None,
    ) -> None:
        self.metadata.append((asset_key or self.asset_key, str(partition_key), metadata))


def committed_by_run(store: Any, year: int, tile: str, run_id: str) -> Any:
    """The current version of a partition when this run already committed it (a task run
    again after its worker died), else None (also when the pointer is damaged: the task's
    own commit sets it aside)."""
    from agrifm_pipeline.storage import DamagedPointerError

    try:
        version = store.current(year, tile)
    except DamagedPointerError:
        return None
    if version is None:
        return None
    if store.lineage(year, tile, version.id).get("run_id") == run_id:
        return version
    return None
