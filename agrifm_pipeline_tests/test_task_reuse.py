"""A compute task run again keeps its own run's version, and never adopts another run's.

The distributed tests kill a worker and see the run finish with one version per
partition; they cannot tell a task that re-uses *its own* run's commit from one
that re-uses *any* commit. Here the task functions are called in this process (as
the step calls them without a cluster) on a store that already holds versions:
the same run's commit is returned as it is (``reused``, nothing written), another
run's is not — the task writes its own version, as a new run must.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from agrifm_pipeline.compute import committed_by_run
from agrifm_pipeline.defs import tasks
from agrifm_pipeline.defs.partitions import tile_year_key
from agrifm_pipeline.storage import ZarrStore
from agrifm_pipeline_tests.pipeline_helpers import TILES, make_resources

TILE, YEAR = TILES[1], 2019
KEY = str(tile_year_key(TILE, YEAR))
FRAMES = "s2_frame_stack"


def test_committed_by_run_names_only_this_runs_commit(tmp_path: Path) -> None:
    store = ZarrStore(str(tmp_path), FRAMES)
    assert committed_by_run(store, YEAR, TILE, "run-a") is None  # nothing committed
    va = store.put_objects(YEAR, TILE, {"x.bin": b"a"}, {"run_id": "run-a"})
    got = committed_by_run(store, YEAR, TILE, "run-a")
    assert got is not None and got.id == va.id
    assert committed_by_run(store, YEAR, TILE, "run-b") is None
    # Once run-b commits, run-a's version is no longer current: run-a's task re-does its work.
    vb = store.put_objects(YEAR, TILE, {"x.bin": b"b"}, {"run_id": "run-b"})
    assert committed_by_run(store, YEAR, TILE, "run-a") is None
    got = committed_by_run(store, YEAR, TILE, "run-b")
    assert got is not None and got.id == vb.id
    # A version without a run id (written outside the pipeline) is nobody's.
    store.put_objects(YEAR, TILE, {"x.bin": b"c"}, {})
    assert committed_by_run(store, YEAR, TILE, "") is None
    assert committed_by_run(store, YEAR, TILE, "run-b") is None


@pytest.fixture
def resources(tmp_path: Path) -> dict:
    return make_resources(tmp_path, n_frames=4)


def _acquire(resources: dict, run_id: str) -> tasks.TaskRecord:
    spec = tasks.StepSpec.of(run_id, resources["tile_year"], resources["s2"], resources["storage"])
    return tasks.acquire((KEY, TILE, YEAR), spec)


def test_an_acquisition_task_reuses_its_own_runs_version_only(resources: dict) -> None:
    store = resources["storage"].store(FRAMES)
    first = _acquire(resources, "run-a")
    made = store.current(YEAR, TILE)
    assert not first.reused and made is not None
    assert store.lineage(YEAR, TILE, made.id)["run_id"] == "run-a"
    # The same run's task again (its worker died after the commit): the same version back.
    again = _acquire(resources, "run-a")
    assert again.reused
    assert store.versions(YEAR, TILE) == [made.id]
    (meta,) = again.metadata
    assert meta[0] == dg.AssetKey(FRAMES) and meta[1] == KEY
    assert meta[2]["version"] == made.id
    assert {e.check_name for e in again.checks} == {
        "frame_stack_shape_and_dtype",
        "frame_stack_clear_fraction",
    }
    assert all(e.partition == KEY for e in again.checks)
    # Another run's task: run-a's version is not its own; it writes one and makes it current.
    other = _acquire(resources, "run-b")
    assert not other.reused
    now = store.current(YEAR, TILE)
    assert now is not None and now.id != made.id
    assert store.lineage(YEAR, TILE, now.id)["run_id"] == "run-b"
    assert sorted(store.versions(YEAR, TILE)) == sorted([made.id, now.id])
    (meta,) = other.metadata
    assert meta[2]["version"] == now.id
    assert {e.metadata["version"].value for e in other.checks} == {now.id}


def test_an_encoding_task_is_reused_only_when_its_run_committed_every_asset(
    resources: dict,
) -> None:
    """normalise_and_embed writes two assets: a run that committed only the tensors before
    its worker died (the grid is another run's) does the tile-year again, both assets."""
    import numpy as np
    import torch
    import xarray as xr

    from agrifm_pipeline.tileyear import normalized_dataset

    spec = tasks.StepSpec.of("run-a", resources["tile_year"], resources["s2"], resources["storage"])
    assets = [tasks.NORMALIZED, tasks.EMBEDDING]
    settings = {"n_frames": 4, "norm_mode": "agrifm_stats", "image_size": 64}

    cfg = resources["tile_year"].resolve()
    made = {
        tasks.NORMALIZED: normalized_dataset(
            torch.zeros(4, 4, 10, 64, 64), cfg, keep_tensors=False
        ),
        tasks.EMBEDDING: xr.Dataset(
            {"embedding": (("band", "y", "x"), np.ones((8, 4, 4), np.float32))}
        ),
    }

    def write(asset: dg.AssetKey, run_id: str, stage: str) -> str:
        ds = made[asset]
        lineage = {"run_id": run_id, "stage": stage, "settings": settings}
        return resources["storage"].store(asset.path[-1]).write(YEAR, TILE, ds, lineage).id

    norm = write(tasks.NORMALIZED, "run-a", "normalisation")
    assert tasks._reused(spec, KEY, TILE, YEAR, assets) is None  # no grid at all
    write(tasks.EMBEDDING, "run-b", "embedding")
    assert tasks._reused(spec, KEY, TILE, YEAR, assets) is None  # the grid is run-b's
    grid = write(tasks.EMBEDDING, "run-a", "embedding")
    record = tasks._reused(spec, KEY, TILE, YEAR, assets)
    assert record is not None and record.reused
    assert [(a, k, m["version"]) for a, k, m in record.metadata] == [
        (tasks.NORMALIZED, KEY, norm),
        (tasks.EMBEDDING, KEY, grid),
    ]
    assert {e.asset_key for e in record.checks} == set(assets)
