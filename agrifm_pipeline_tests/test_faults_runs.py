"""Issue 17, item 2: the stale sensor never waits forever on a run that is no longer running.

A run the sensor requested that fails, is canceled or is marked failed from outside
(what run monitoring does to a run whose process died) releases its tile-years, and
the next tick requests them again. While work is in flight the skip message counts
what is current, stale but already requested, and not judged, separately: it used to
say "every materialised tile-year is current" while the audit showed stale partitions.
"""

from __future__ import annotations

import dagster as dg
from dagster._core.utils import make_new_run_id

from agrifm_pipeline.defs.partitions import split_key
from agrifm_pipeline.defs.requests import RANGE_START
from agrifm_pipeline.defs.sensors import REQUEST_TAG

from . import test_staleness
from .pipeline_helpers import TILES, YEARS
from .test_staleness import NORM, _everything, _resources, _skip_reason

world = test_staleness.world  # the materialised 2 x 2 tile-years, their ticker and checkpoint


def _started(instance: dg.DagsterInstance, request: dg.RunRequest) -> dg.DagsterRun:
    """The run the daemon launched for ``request``, still running (or with a dead process)."""
    run = dg.DagsterRun(
        job_name="embed_tile_years",
        run_id=make_new_run_id(),
        tags=dict(request.tags),
        status=dg.DagsterRunStatus.STARTED,
    )
    return instance.add_run(run)


def test_failed_canceled_or_marked_failed_runs_release_their_tile_years(world) -> None:
    pipe, ticker, ckpt = world
    changed = _resources(pipe, ckpt, norm_mode="unit_scale")
    reqs = ticker.tick(changed)
    assert ticker.covered(reqs) == _everything(NORM) and len(reqs) == 2
    by_year = {split_key(r.tags[RANGE_START])[1]: r for r in reqs}
    runs = {year: _started(pipe.instance, r) for year, r in by_year.items()}
    # In flight: nothing is requested again, and the message says what waits on what.
    reason = _skip_reason(ticker, changed)
    assert "every materialised tile-year is current" not in reason
    assert "0 current" in reason and "4 stale and already requested" in reason, reason
    assert "2 run(s) queued or running" in reason and "not judged" not in reason, reason
    # The 2019 run's process dies and it is marked failed (by run monitoring, or by hand).
    pipe.instance.report_run_failed(runs[2019])
    again = ticker.tick(changed)
    assert ticker.covered(again) == {(a, t, 2019) for a in NORM for t in TILES}
    assert all(r.tags[REQUEST_TAG] != by_year[2019].tags[REQUEST_TAG] for r in again)
    failed = f"stale normalized_tensors (again after run {runs[2019].run_id[:8]} FAILURE): "
    assert all(r.tags["agrifm/reason"].startswith(failed) for r in again), again
    # The new request is in flight; the 2018 run is canceled and released in turn.
    (retry,) = again
    _started(pipe.instance, retry)
    pipe.instance.report_run_canceled(runs[2018])
    third = ticker.tick(changed)
    assert ticker.covered(third) == {(a, t, 2018) for a in NORM for t in TILES}
    # Both retries run to completion: everything is current, and the message says so.
    assert ticker.execute([retry, *third], changed) == [True, True]
    reason = _skip_reason(ticker, changed)
    assert reason.startswith("every materialised tile-year is current (4)"), reason


def test_a_run_that_raises_releases_its_tile_years_on_the_next_tick(world, tmp_path) -> None:
    pipe, ticker, ckpt = world
    changed = _resources(pipe, ckpt, norm_mode="unit_scale")
    reqs = ticker.tick(changed)
    # Runs with an unreadable checkpoint: the normalise-and-embed step raises.
    broken = _resources(pipe, tmp_path / "nowhere" / "AgriFM.pth", norm_mode="unit_scale")
    assert ticker.execute(reqs, broken) == [False, False]
    assert ticker.covered(ticker.tick(changed)) == _everything(NORM)


def test_skip_message_counts_tile_years_not_judged_separately(world, tmp_path) -> None:
    pipe, ticker, _ = world
    res = _resources(pipe, tmp_path / "nowhere" / "AgriFM.pth")
    reason = _skip_reason(ticker, res)
    n = len(TILES) * len(YEARS)
    assert f"{n} not judged" in reason and "0 current" in reason, reason
    assert "embeddings not judged" in reason and "no such file" in reason
