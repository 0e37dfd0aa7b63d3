"""Change that users control: the stale sensor re-runs only the causes it is told to."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from agrifm_pipeline.defs.audit import audit_rows
from agrifm_pipeline.defs.resources import (
    DEFAULT_RERUN_ON,
    RERUN_CAUSES,
    S2Source,
    TileYearConfig,
    rerun_causes,
)
from agrifm_pipeline.defs.sensors import stale_partitions_sensor
from agrifm_pipeline.defs.staleness import current_fingerprints, stage_stores
from agrifm_pipeline.errors import SettingsError

from . import test_staleness
from .pipeline_helpers import REPO_ROOT
from .test_staleness import ALL, NORM, _everything, _resources

world = test_staleness.world  # the stale-sensor tests' materialised pipeline


def _tick(pipe: Any, resources: dict[str, Any]) -> dg.SensorResult:
    ctx = dg.build_sensor_context(instance=pipe.instance, resources=resources)
    result = stale_partitions_sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    return result


def _moved_source(pipe: Any, ckpt: Path, tmp: Path, **tile_year: Any) -> dict[str, Any]:
    """The same scenes under another root: the source's identity changed."""
    copy = tmp / "s2_copy"
    if not copy.exists():
        shutil.copytree(REPO_ROOT / "data" / "s2_sample", copy)
    res = _resources(pipe, ckpt, **tile_year)
    res["s2"] = S2Source(local_root=str(copy))
    return res


def test_rerun_on_defaults_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGRIFM_PIPELINE_RERUN_ON", raising=False)
    assert rerun_causes() == frozenset(DEFAULT_RERUN_ON)
    assert "source" not in DEFAULT_RERUN_ON and set(DEFAULT_RERUN_ON) < set(RERUN_CAUSES)
    monkeypatch.setenv("AGRIFM_PIPELINE_RERUN_ON", "all")
    assert rerun_causes() == frozenset(RERUN_CAUSES)
    monkeypatch.setenv("AGRIFM_PIPELINE_RERUN_ON", "checkpoint, code")
    assert rerun_causes() == {"checkpoint", "code"}
    assert TileYearConfig(rerun_on=[]).rerun_causes() == frozenset()
    with pytest.raises(SettingsError, match="clouds"):
        rerun_causes(["clouds"])


def test_a_changed_source_is_reported_not_rerun_unless_configured(world, tmp_path) -> None:
    pipe, ticker, ckpt = world
    moved = _moved_source(pipe, ckpt, tmp_path)
    result = _tick(pipe, moved)
    assert not result.run_requests
    skip = str(result.skip_reason)
    assert "held" in skip and "source not in rerun_on" in skip, skip
    # The audit reports it: the frames are stale because the source changed.
    current, unknown, _ = current_fingerprints(moved["tile_year"], moved["s2"], moved["model"])
    rows = audit_rows(pipe.instance, stage_stores(pipe.storage), current, unknown=unknown)
    frames = [r for r in rows if r.asset == "s2_frame_stack"]
    assert frames and all(r.status == "stale" and "provider changed" in r.why for r in frames)
    # Configured to, the sensor re-makes everything from the new source.
    allowed = _moved_source(pipe, ckpt, tmp_path, rerun_on=list(RERUN_CAUSES))
    requests = ticker.tick(allowed)
    assert ticker.covered(requests) == _everything(ALL)


def test_a_cause_left_out_of_rerun_on_is_held(world) -> None:
    pipe, ticker, ckpt = world
    held = _tick(pipe, _resources(pipe, ckpt, norm_mode="unit_scale", rerun_on=["checkpoint"]))
    assert not held.run_requests and "normalisation not in rerun_on" in str(held.skip_reason)
    requests = ticker.tick(_resources(pipe, ckpt, norm_mode="unit_scale"))  # the default
    assert ticker.covered(requests) == _everything(NORM)
