"""Change re-runs exactly what it invalidates: fingerprints, the stale sensor, the checkpoint watch, the audit."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import torch

from agrifm_pipeline.cli import main as cli_main
from agrifm_pipeline.definitions import build_defs
from agrifm_pipeline.defs.audit import audit_rows
from agrifm_pipeline.defs.partitions import split_key
from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
from agrifm_pipeline.defs.resources import S2Source, TileYearConfig
from agrifm_pipeline.defs.sensors import checkpoint_sensor, stale_partitions_sensor
from agrifm_pipeline.defs.staleness import current_fingerprints, stage_stores

from .pipeline_helpers import TILES, TINY, YEARS, Pipeline, make_pipeline, make_resources

EMBED = {"agrifm_embedding_grid", "chip_embeddings", "embedding_preview", "agrifm_embedding_int8"}
NORM = {"normalized_tensors", *EMBED}
ALL = {"s2_frame_stack", *NORM}


def _everything(assets: set[str]) -> set[tuple[str, str, int]]:
    return {(a, t, y) for a in assets for t in TILES for y in YEARS}


class Ticker:
    """Evaluates the stale sensor like the daemon does, carrying its cursor."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.cursor: str | None = None

    def tick(self, resources: dict[str, Any]) -> list[dg.RunRequest]:
        ctx = dg.build_sensor_context(
            instance=self.pipe.instance, cursor=self.cursor, resources=resources
        )
        result = stale_partitions_sensor(ctx)
        assert isinstance(result, dg.SensorResult)
        self.cursor = result.cursor
        return list(result.run_requests or [])

    def covered(self, requests: list[dg.RunRequest]) -> set[tuple[str, str, int]]:
        order = self.pipe.instance.get_dynamic_partitions("tiles")
        out = set()
        for r in requests:
            (t0, y0), (t1, y1) = split_key(r.tags[RANGE_START]), split_key(r.tags[RANGE_END])
            assert y0 == y1
            tiles = order[order.index(t0) : order.index(t1) + 1]
            out |= {(k.path[-1], t, y0) for k in r.asset_selection or [] for t in tiles}
        return out

    def execute(self, requests: list[dg.RunRequest], resources: dict[str, Any]) -> list[bool]:
        defs = build_defs(resources)
        job = defs.resolve_job_def("embed_tile_years")
        return [
            job.execute_in_process(
                instance=self.pipe.instance,
                tags=r.tags,
                asset_selection=list(r.asset_selection or []),
                raise_on_error=False,
            ).success
            for r in requests
        ]


@pytest.fixture
def world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Pipeline, Ticker, Path]]:
    # The tiny reference checkpoint is far below the full one's minimum size.
    monkeypatch.setenv("RS_EMBED_AGRIFM_CKPT_MIN_BYTES", "1000")
    ckpt = tmp_path / "weights" / "AgriFM.pth"
    ckpt.parent.mkdir()
    shutil.copy(TINY, ckpt)
    with dg.instance_for_test() as instance:
        pipe = make_pipeline(tmp_path, instance=instance, checkpoint=ckpt)
        assert pipe.materialise(TILES, YEARS).success
        yield pipe, Ticker(pipe), ckpt


def _resources(pipe: Pipeline, ckpt: Path, **tile_year: Any) -> dict[str, Any]:
    return make_resources(pipe.root, checkpoint=ckpt, **tile_year)


def _replace_checkpoint(ckpt: Path) -> None:
    """Same path, new content (same keys and shapes)."""
    state = torch.load(ckpt, weights_only=True)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, ckpt)


def test_nothing_changed_requests_nothing(world) -> None:
    pipe, ticker, ckpt = world
    assert ticker.tick(_resources(pipe, ckpt)) == []


def test_norm_mode_change_reruns_normalised_tensors_and_below_then_settles(world) -> None:
    pipe, ticker, ckpt = world
    changed = _resources(pipe, ckpt, norm_mode="unit_scale")
    reqs = ticker.tick(changed)
    assert ticker.covered(reqs) == _everything(NORM)
    assert len(reqs) == 2  # batched: one run per year with both tiles, not one per partition
    assert all("norm_mode changed" in r.tags["agrifm/reason"] for r in reqs)
    # A second tick while that work is pending asks for nothing new.
    assert ticker.tick(changed) == []
    # The audit names the reason before, and the state after.
    current, unknown, _ = current_fingerprints(
        changed["tile_year"], changed["s2"], changed["model"]
    )
    before = audit_rows(pipe.instance, stage_stores(pipe.storage), current, unknown=unknown)
    by = {(r.asset, r.tile, r.year): r for r in before}
    assert by[("s2_frame_stack", TILES[0], 2019)].status == "current"
    row = by[("normalized_tensors", TILES[0], 2019)]
    assert row.status == "stale" and "norm_mode changed ('agrifm_stats' -> 'unit_scale')" in row.why
    assert by[("agrifm_embedding_grid", TILES[0], 2019)].status == "stale"
    chips = by[("chip_embeddings", TILES[0], 2019)]  # made from a stale grid
    assert chips.status == "stale" and chips.why == "agrifm_embedding_grid is stale"
    assert ticker.execute(reqs, changed) == [True, True]
    assert ticker.tick(changed) == []
    after = audit_rows(pipe.instance, stage_stores(pipe.storage), current, unknown=unknown)
    assert {r.status for r in after} == {"current"} and len(after) == 24  # 6 assets x 4
    assert all(r.norm_mode in ("", "unit_scale") for r in after)


def observe_requested(pipe: Pipeline, res: dict[str, Any], result: dg.SensorResult) -> Any:
    """Run the observation checkpoint_sensor requested (as the daemon would: an asset job
    of its selection, with its tags); the observation event it recorded."""
    (req,) = result.run_requests or []
    return run_observation(req, res["model"], pipe.instance)


def run_observation(req: dg.RunRequest, model: Any, instance: dg.DagsterInstance) -> Any:
    from agrifm_pipeline.defs.assets import agrifm_checkpoint

    assert req.asset_selection == [dg.AssetKey("agrifm_checkpoint")]
    job = dg.define_asset_job("observe_checkpoint", selection=req.asset_selection)
    defs = dg.Definitions(assets=[agrifm_checkpoint], jobs=[job], resources={"model": model})
    out = defs.resolve_job_def("observe_checkpoint").execute_in_process(
        instance=instance, tags=req.tags
    )
    assert out.success
    (event,) = [e for e in out.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    return event.event_specific_data.asset_observation


def test_replaced_checkpoint_reruns_only_the_embedding_assets(world) -> None:
    pipe, ticker, ckpt = world
    res = _resources(pipe, ckpt)
    watch = dg.build_sensor_context(instance=pipe.instance, resources=res)
    first = checkpoint_sensor(watch)
    assert isinstance(first, dg.SensorResult)
    old_sha = first.cursor
    _replace_checkpoint(ckpt)
    # The watch sees new content behind the same path and records a new data version.
    seen = checkpoint_sensor(
        dg.build_sensor_context(instance=pipe.instance, cursor=old_sha, resources=res)
    )
    assert isinstance(seen, dg.SensorResult) and seen.cursor != old_sha
    # It requests an observation; the source asset's own function records the data version.
    obs = observe_requested(pipe, res, seen)
    assert obs.metadata["sha256"].value == seen.cursor
    assert obs.metadata["previous_sha256"].value == old_sha
    assert obs.tags["dagster/data_version"] == seen.cursor  # set by Dagster, not by us
    reqs = ticker.tick(res)
    assert ticker.covered(reqs) == _everything(EMBED)
    assert all("checkpoint changed" in r.tags["agrifm/reason"] for r in reqs)
    assert ticker.execute(reqs, res) == [True, True]
    assert ticker.tick(res) == []
    grid = pipe.storage.store("agrifm_embedding_grid").lineage(2019, TILES[0])
    assert grid["embedding"]["checkpoint"]["sha256"] == seen.cursor
    # Acquisition was never re-run: its partitions still carry the first run's id.
    frames = pipe.storage.store("s2_frame_stack").lineage(2019, TILES[0])
    assert frames["run_id"] != grid["run_id"]


def test_n_frames_change_reruns_everything_and_a_failed_partition_is_retried(
    world, tmp_path: Path
) -> None:
    pipe, ticker, ckpt = world
    changed = _resources(pipe, ckpt, n_frames=6)
    reqs = ticker.tick(changed)
    assert ticker.covered(reqs) == _everything(ALL)
    assert ticker.tick(changed) == []
    # The 2018 run fails (its source is unreadable); 2019 succeeds.
    broken = {**changed, "s2": S2Source(local_root=str(tmp_path / "nowhere"))}
    by_year = {split_key(r.tags[RANGE_START])[1]: r for r in reqs}
    assert ticker.execute([by_year[2018]], broken) == [False]
    assert ticker.execute([by_year[2019]], changed) == [True]
    again = ticker.tick(changed)
    assert ticker.covered(again) == {(a, t, 2018) for a in ALL for t in TILES}


HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>login</body></html>\n"


def _skip_reason(ticker: Ticker, resources: dict[str, Any]) -> str:
    """One stale-sensor tick that must request nothing; its skip message."""
    ctx = dg.build_sensor_context(
        instance=ticker.pipe.instance, cursor=ticker.cursor, resources=resources
    )
    result = stale_partitions_sensor(ctx)
    assert isinstance(result, dg.SensorResult) and not result.run_requests
    ticker.cursor = result.cursor
    assert result.skip_reason is not None
    return str(result.skip_reason.skip_message)


def test_html_checkpoint_is_reported_once_and_nothing_is_requested(world, capfd) -> None:
    """It used to be recorded as a new version, and every stale tick then asked for a
    re-embedding run that failed."""
    pipe, ticker, ckpt = world
    res = _resources(pipe, ckpt)

    def watch(cursor: str | None) -> dg.SensorResult | dg.SkipReason:
        ctx = dg.build_sensor_context(instance=pipe.instance, cursor=cursor, resources=res)
        return checkpoint_sensor(ctx)

    first = watch(None)
    assert isinstance(first, dg.SensorResult) and first.run_requests
    recorded = first.cursor
    ckpt.write_bytes(HTML * 40)  # a login page saved in place of the weights

    def reports() -> list[str]:  # the sensor's error lines in the log (dagster writes stderr)
        return [line for line in capfd.readouterr().err.splitlines() if "is not usable;" in line]

    reports()
    seen = watch(recorded)
    assert isinstance(seen, dg.SensorResult) and not seen.run_requests  # not recorded
    assert seen.skip_reason is not None and "is an HTML page" in seen.skip_reason.skip_message
    (report,) = reports()
    assert "ERROR" in report and "HTML page" in report
    # Later ticks: nothing new to report, recorded or requested, and they say why.
    again = watch(seen.cursor)
    assert isinstance(again, dg.SkipReason) and "still not usable" in again.skip_message
    assert reports() == []
    for _ in range(3):
        reason = _skip_reason(ticker, res)
        assert "embeddings not judged" in reason and "HTML page" in reason
        assert "every materialised tile-year is current" not in reason
    # Good weights again (new content): recorded, with the last good version as previous.
    shutil.copy(TINY, ckpt)
    _replace_checkpoint(ckpt)
    fixed = watch(seen.cursor)
    assert isinstance(fixed, dg.SensorResult) and fixed.cursor not in (recorded, seen.cursor)
    obs = observe_requested(pipe, res, fixed)
    assert obs.metadata["previous_sha256"].value == recorded
    assert ticker.covered(ticker.tick(res)) == _everything(EMBED)


def test_unusable_checkpoint_with_changed_settings_requests_only_what_it_does_not_need(
    world,
) -> None:
    pipe, ticker, ckpt = world
    ckpt.write_bytes(HTML)
    changed = _resources(pipe, ckpt, norm_mode="unit_scale")
    reqs = ticker.tick(changed)
    # The normalised tensors are re-made; the embeddings wait for usable weights.
    assert ticker.covered(reqs) == {("normalized_tensors", t, y) for t in TILES for y in YEARS}


def test_unresolvable_checkpoint_says_embeddings_were_not_judged(world, tmp_path: Path) -> None:
    """It used to say every materialised tile-year is current."""
    pipe, ticker, _ = world
    res = _resources(pipe, tmp_path / "nowhere" / "AgriFM.pth")
    reason = _skip_reason(ticker, res)
    assert "embeddings not judged" in reason and "no such file" in reason
    assert "every materialised tile-year is current" not in reason


def test_partition_deleted_outside_the_pipeline_is_reported_and_remade(world) -> None:
    pipe, ticker, ckpt = world
    res = _resources(pipe, ckpt)
    # Deleted by hand, the whole partition (every version and its pointer).
    shutil.rmtree(Path(pipe.storage.root) / "normalized_tensors.zarr" / "2019" / TILES[1])
    current, unknown, _ = current_fingerprints(res["tile_year"], res["s2"], res["model"])
    rows = audit_rows(pipe.instance, stage_stores(pipe.storage), current, unknown=unknown)
    (row,) = [r for r in rows if r.status != "current"]
    assert (row.asset, row.tile, row.year, row.status) == (
        "normalized_tensors", TILES[1], 2019, "missing-in-store"
    )  # fmt: skip
    assert "store has no partition" in row.disagreement
    reqs = ticker.tick(res)
    assert ticker.covered(reqs) == {(a, TILES[1], 2019) for a in NORM}


def test_damaged_pointer_is_repaired_by_the_stale_sensor_after_verify(world) -> None:
    """A pointer that is not JSON: the audit (which reads every pointer) names it, `verify`
    sets it aside with its bytes kept beside it, and the stale sensor then re-makes that
    tile-year and nothing else, with no hand work. (The sensor judges from the indexes,
    which still name the last good version until `verify` rebuilds them.)"""
    pipe, ticker, ckpt = world
    res = _resources(pipe, ckpt)
    part = Path(pipe.storage.root) / "s2_frame_stack.zarr" / "2019" / TILES[0]
    (part / "_current.json").write_bytes(b'{"version": "v2026')
    current, unknown, _ = current_fingerprints(res["tile_year"], res["s2"], res["model"])
    rows = audit_rows(pipe.instance, stage_stores(pipe.storage), current, unknown=unknown)
    bad = {(r.asset, r.tile, r.year, r.status) for r in rows if r.status != "current"}
    assert ("s2_frame_stack", TILES[0], 2019, "corrupt") in bad
    assert {(a, t, y) for a, t, y, _ in bad} <= {(a, TILES[0], 2019) for a in ALL}
    assert cli_main(["verify", "--store", pipe.storage.root]) == 1
    assert not (part / "_current.json").exists()
    reqs = ticker.tick(res)
    assert ticker.covered(reqs) == {(a, TILES[0], 2019) for a in ALL}
    assert all(ticker.execute(reqs, res))
    assert ticker.tick(res) == []
    assert [p.name for p in part.iterdir() if ".damaged-" in p.name]
    assert cli_main(["verify", "--store", pipe.storage.root]) == 0


def test_fingerprints_depend_on_exactly_their_settings() -> None:
    base = TileYearConfig(chip_px=64, chips_per_side=2).resolve()
    kw: dict[str, Any] = {
        "provider": {"name": "local"},
        "checkpoint_sha256": "a",
        "precision": "float32",
    }
    f0 = base.fingerprints(**kw)
    f_ck = base.fingerprints(**{**kw, "checkpoint_sha256": "b"})
    f_norm = (
        TileYearConfig(chip_px=64, chips_per_side=2, norm_mode="none").resolve().fingerprints(**kw)
    )
    f_t = TileYearConfig(chip_px=64, chips_per_side=2, n_frames=4).resolve().fingerprints(**kw)
    f_bf = base.fingerprints(**{**kw, "precision": "bfloat16"})

    def moved(f) -> list[str]:  # type: ignore[no-untyped-def]
        return [
            s
            for s in ("acquisition", "normalisation", "embedding")
            if f.for_stage(s).value != f0.for_stage(s).value
        ]

    assert moved(f_ck) == ["embedding"]
    assert moved(f_bf) == ["embedding"]
    assert moved(f_norm) == ["normalisation", "embedding"]
    assert moved(f_t) == ["acquisition", "normalisation", "embedding"]


def test_audit_command(world, capsys, monkeypatch) -> None:
    pipe, _, ckpt = world
    monkeypatch.setenv("DAGSTER_HOME", pipe.instance.root_directory)
    args = ["audit", "--store", pipe.storage.root, "--checkpoint", str(ckpt), "--format", "json"]
    # Judge with this test's resources (64 px chips) instead of the product defaults.
    monkeypatch.setattr(
        "agrifm_pipeline.cli.pipeline_resources",
        lambda *_: _resources(pipe, ckpt, norm_mode="unit_scale"),
    )
    assert cli_main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 24  # frames, tensors, grids, chip tables, previews, int8 grids
    stale = {(r["asset"], r["status"]) for r in rows}
    assert ("s2_frame_stack", "current") in stale and ("normalized_tensors", "stale") in stale
    assert all(r["run_id"] for r in rows) and all(r["dagster_run_id"] == r["run_id"] for r in rows)


def test_audit_table_is_an_asset_in_the_ui(world) -> None:
    pipe, _, ckpt = world
    res = _resources(pipe, ckpt, norm_mode="unit_scale")
    defs = build_defs(res)
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=pipe.instance, asset_selection=[dg.AssetKey("lineage_audit")]
    )
    (mat,) = result.asset_materializations_for_node("lineage_audit")
    md = mat.metadata
    assert md["partitions"].value == 24
    # tensors, grids, chip tables, previews and int8 grids stale; frames current
    assert md["n_stale"].value == 20 and md["n_current"].value == 4
    assert md["source_scenes"].value == "compared with the source"
    table = md["audit"].value
    assert "norm_mode changed" in table and TILES[0] in table


def test_a_tick_judges_from_the_indexes_not_per_partition(world, monkeypatch) -> None:
    """Each tick reads one index object and one listing per asset and year: no pointer
    and no manifest per tile-year, except a partition materialised since the last tick
    whose index entry names another version than Dagster recorded."""
    from agrifm_pipeline import storage as storage_module
    from agrifm_pipeline.storage import PartitionStore

    pipe, ticker, ckpt = world
    storage_module._MANIFEST_CACHE.clear()
    # "_shard_head": the first read of a year's index (shard 00; then the shards its
    # tiles are in, in one batch): once per asset and year.
    reads = {"pointer": 0, "manifest": 0, "_shard_head": 0}
    for name in reads:
        original = getattr(PartitionStore, name)

        def counted(self, *a, _name=name, _original=original, **k):  # type: ignore[no-untyped-def]
            reads[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(PartitionStore, name, counted)
    res = _resources(pipe, ckpt)
    first = ticker.tick(res)
    assert first == [], [r.tags.get("agrifm/reason") for r in first]  # trusts the indexes
    assert reads == {"pointer": 0, "manifest": 0, "_shard_head": 6 * len(YEARS)}
    # A change makes the stale stages' manifests read, to say why (and nothing else).
    changed = _resources(pipe, ckpt, norm_mode="unit_scale")
    reads.update(pointer=0, manifest=0, _shard_head=0)
    storage_module._MANIFEST_CACHE.clear()  # as in the daemon's process: nothing cached
    reqs = ticker.tick(changed)
    assert ticker.covered(reqs) == _everything(NORM)
    # the two stages whose fingerprints moved (normalisation, embedding), per tile-year
    assert reads["pointer"] == 0 and reads["manifest"] == 2 * len(TILES) * len(YEARS)
    # After the re-runs, the partitions they made are fresh: their index entries agree
    # with the versions Dagster recorded, so no pointer is read either.
    assert all(ticker.execute(reqs, changed))
    reads.update(pointer=0, manifest=0, _shard_head=0)
    assert ticker.tick(changed) == []
    assert reads["pointer"] == 0 and reads["manifest"] == 0
