"""The audit's comparison on stores written by hand: what is stale, and that it flows down.

The pipeline tests reach the audit through settings changes, where every stage's
own fingerprint moves too, so a stage below a stale one would look stale even if
nothing carried the staleness down. Here only the top stage is stale — its scenes
changed at the source (recorded on the frame stack alone), or its stored version
is corrupt — and the stages below record fingerprints equal to the current ones:
they are stale only because what they were made from is, and the audit must say
so, through :func:`agrifm_pipeline.audit.tile_year_state` and the table
(:func:`agrifm_pipeline.defs.audit.audit_rows`) alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from agrifm_pipeline.audit import downstream_of, tile_year_state
from agrifm_pipeline.defs.audit import audit_rows
from agrifm_pipeline.defs.resources import ZarrStorage
from agrifm_pipeline.lineage import Fingerprints, scene_index_record, stage_fingerprints
from agrifm_pipeline.storage import PartitionStore, Problem

TILE, YEAR = "32631_1280m_E0449_N4392", 2019
SCENES = {"2019-04-21.tif": "1000:1", "2019-05-01.tif": "1000:2"}
STAGE_ASSETS = ("s2_frame_stack", "normalized_tensors", "agrifm_embedding_grid")
DERIVED_ASSETS = ("chip_embeddings", "embedding_preview", "agrifm_embedding_int8")
ALL = (*STAGE_ASSETS, *DERIVED_ASSETS)


def _current(norm_mode: str = "agrifm_stats") -> Fingerprints:
    return stage_fingerprints(
        acquisition={"provider": {"name": "local", "root": "/scenes"}, "n_frames": 8},
        normalisation={"norm_mode": norm_mode, "image_size": 224},
        embedding={"checkpoint_sha256": "ab" * 32},
    )


class World:
    """Every tile-year asset of one tile-year, committed by run ``r1`` from ``fps``."""

    def __init__(self, root: Path, fps: Fingerprints):
        storage = ZarrStorage(root=str(root / "store"), regions_dir=str(root / "regions"))
        self.stores: dict[str, PartitionStore] = {
            **{a: storage.store(a) for a in STAGE_ASSETS},
            "chip_embeddings": storage.files("chip_embeddings"),
            "embedding_preview": storage.files("embedding_preview"),
            "agrifm_embedding_int8": storage.store("agrifm_embedding_int8"),
        }
        self.versions: dict[str, str] = {}
        records = fps.as_record()
        frames = self.put(
            "s2_frame_stack",
            {
                "fingerprints": {"acquisition": records["acquisition"]},
                "acquisition": {"scene_index": scene_index_record(SCENES)},
                "settings": {"n_frames": 8},
            },
        )
        norm = self.put(
            "normalized_tensors",
            {
                "fingerprints": {s: records[s] for s in ("acquisition", "normalisation")},
                "inputs": {"s2_frame_stack": {"version": frames}},
                "settings": {"n_frames": 8, "norm_mode": "agrifm_stats", "image_size": 224},
            },
        )
        grid = self.put(
            "agrifm_embedding_grid",
            {"fingerprints": records, "inputs": {"normalized_tensors": {"version": norm}}},
        )
        for derived in DERIVED_ASSETS:
            self.put(derived, {"inputs": {"agrifm_embedding_grid": {"version": grid}}})

    def put(self, asset: str, lineage: dict[str, Any], run_id: str = "r1") -> str:
        v = self.stores[asset].put_objects(
            YEAR, TILE, {"x.bin": asset.encode()}, {**lineage, "run_id": run_id}
        )
        self.versions[asset] = v.id
        return v.id

    def state(self, current: Fingerprints, scenes: Mapping[str, str] | None = None) -> Any:
        lister = None if scenes is None else (lambda tile, year: dict(scenes))
        return tile_year_state(self.stores, TILE, YEAR, current, scenes=lister)

    def rows(
        self, current: Fingerprints, scenes: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        lister = None if scenes is None else (lambda tile, year: dict(scenes))
        with dg.instance_for_test() as instance:
            rows = audit_rows(instance, self.stores, current, scenes=lister)
        assert all(r.tile == TILE and r.year == YEAR for r in rows)
        return {r.asset: r for r in rows}


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path, _current())


def test_everything_current_when_nothing_changed(world: World) -> None:
    state = world.state(_current(), SCENES)
    assert state.first_stale() is None and state.stale_assets() == ()
    assert not any(st.stale for st in [*state.stages.values(), *state.derived.values()])
    assert {a: r.status for a, r in world.rows(_current(), SCENES).items()} == dict.fromkeys(
        ALL, "current"
    )


def test_changed_scenes_make_every_stage_below_the_frames_stale(world: World) -> None:
    """A scene re-delivered at the source: only the frame stack records scenes, and the
    normalised tensors and the grid record fingerprints equal to the current ones."""
    now = {**SCENES, "2019-05-01.tif": "1000:3"}
    state = world.state(_current(), now)
    frames, norm, grid = (state.stages[s] for s in ("acquisition", "normalisation", "embedding"))
    assert frames.reasons == ["scene 2019-05-01.tif changed"]
    assert norm.recorded == norm.current and grid.recorded == grid.current
    assert norm.stale and norm.reasons == ["s2_frame_stack is stale"]
    assert grid.stale and grid.reasons == ["normalized_tensors is stale"]
    for derived in DERIVED_ASSETS:
        assert state.derived[derived].reasons == ["agrifm_embedding_grid is stale"]
    assert state.first_stale() == "acquisition" and state.stale_assets() == ALL
    rows = world.rows(_current(), now)
    assert {a: r.status for a, r in rows.items()} == dict.fromkeys(ALL, "stale")
    assert rows["s2_frame_stack"].why == "scene 2019-05-01.tif changed"
    assert rows["normalized_tensors"].why == "s2_frame_stack is stale"
    assert rows["agrifm_embedding_grid"].why == "normalized_tensors is stale"
    assert rows["chip_embeddings"].why == "agrifm_embedding_grid is stale"


def test_a_corrupt_frame_stack_makes_the_stages_below_it_stale(world: World) -> None:
    store = world.stores["s2_frame_stack"]
    v = store.current(YEAR, TILE)
    assert v is not None
    store.mark_integrity(v, [Problem(v.asset, v.year, v.tile, v.id, "frames/0.0.0.0", "mismatch")])
    state = world.state(_current())
    assert state.stages["acquisition"].corrupt
    assert state.stages["normalisation"].reasons == ["s2_frame_stack is stale"]
    assert state.stages["embedding"].reasons == ["normalized_tensors is stale"]
    rows = world.rows(_current())
    assert rows["s2_frame_stack"].status == "corrupt" and "mismatch" in rows["s2_frame_stack"].why
    assert rows["normalized_tensors"].status == "stale"
    assert rows["agrifm_embedding_grid"].status == "stale"


def test_a_stale_middle_stage_leaves_the_top_current_and_flows_down(world: World) -> None:
    """norm_mode changed: the frames stay current; the tensors say why; the grid (whose own
    fingerprint moves with the upstream link) and what was read from it are stale."""
    changed = _current("unit_scale")
    state = world.state(changed)
    assert not state.stages["acquisition"].stale
    assert state.stages["normalisation"].reasons == [
        "norm_mode changed ('agrifm_stats' -> 'unit_scale')"
    ]
    assert state.stages["embedding"].stale
    assert state.stale_assets() == downstream_of("normalisation") == ALL[1:]
    rows = world.rows(changed)
    assert rows["s2_frame_stack"].status == "current"
    assert {rows[a].status for a in ALL[1:]} == {"stale"}


def test_a_chip_table_made_from_an_older_grid_version_is_stale_alone(world: World) -> None:
    """The grid re-made (same settings) after the chip table was read from it: the table is
    stale, naming both versions; the preview and the int8 grid, re-made too, are current."""
    old = world.versions["agrifm_embedding_grid"]
    grid = world.put(
        "agrifm_embedding_grid",
        {
            "fingerprints": _current().as_record(),
            "inputs": {"normalized_tensors": {"version": world.versions["normalized_tensors"]}},
        },
        run_id="r2",
    )
    for remade in ("embedding_preview", "agrifm_embedding_int8"):
        world.put(remade, {"inputs": {"agrifm_embedding_grid": {"version": grid}}})
    state = world.state(_current())
    assert state.first_stale() is None
    assert state.stale_assets() == ("chip_embeddings",)
    assert state.derived["chip_embeddings"].reasons == [
        f"made from agrifm_embedding_grid version {old}; the current one is {grid}"
    ]
    assert not state.derived["embedding_preview"].stale
    rows = world.rows(_current())
    assert rows["chip_embeddings"].status == "stale" and old in rows["chip_embeddings"].why
    assert rows["embedding_preview"].status == "current"


def test_an_unjudged_stage_is_unknown_and_says_why(world: World) -> None:
    with dg.instance_for_test() as instance:
        rows = audit_rows(
            instance, world.stores, _current(), unknown=("embedding",), not_judged="no checkpoint"
        )
    by = {r.asset: r for r in rows}
    assert by["agrifm_embedding_grid"].status == "unknown"
    assert by["agrifm_embedding_grid"].why == "embedding not judged: no checkpoint"
    assert by["normalized_tensors"].status == "current"
