"""Schedules: keep the current season fresh for every registered region."""

import datetime as dt

import dagster as dg

from agrifm_pipeline.defs.assets import tile_year_assets
from agrifm_pipeline.defs.partitions import tiles_partitions
from agrifm_pipeline.defs.requests import tile_year_run_requests
from agrifm_pipeline.defs.resources import ZarrStorage


@dg.schedule(
    cron_schedule="0 3 * * 1",
    target=dg.AssetSelection.assets(*tile_year_assets),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description=(
        "Weekly (Monday 03:00): the current year of every registered region's tiles, "
        "from acquisition down — new acquisitions arrive all season. Batched like a backfill."
    ),
)
def current_year_refresh(
    context: dg.ScheduleEvaluationContext, storage: ZarrStorage
) -> list[dg.RunRequest] | dg.SkipReason:
    year = (context.scheduled_execution_time or dt.datetime.now(dt.UTC)).year
    tiles = sorted(storage.registry().owners())
    order = context.instance.get_dynamic_partitions(tiles_partitions.name or "tiles")
    known = set(order)
    wanted = [(t, year) for t in tiles if t in known]
    if not wanted:
        return dg.SkipReason(
            "no registered region has tiles yet; add a file under the regions directory"
        )
    return tile_year_run_requests(
        order,
        wanted,
        asset_selection=[k for a in tile_year_assets for k in a.keys],
        reason=f"weekly refresh of {year}",
    )


all_schedules = [current_year_refresh]
