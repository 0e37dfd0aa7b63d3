"""Schedules: keep the current season fresh for every registered region."""

import datetime as dt

import dagster as dg

from agrifm_pipeline.defs.assets import tile_year_assets
from agrifm_pipeline.defs.partitions import TileUnits, tiles_partitions
from agrifm_pipeline.defs.requests import range_run_request, tile_year_run_requests
from agrifm_pipeline.defs.resources import ZarrStorage
from agrifm_pipeline.tiles import is_block_id


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
    order = context.instance.get_dynamic_partitions(tiles_partitions.name or "tiles")
    units = TileUnits(storage.registry().owners(), order)
    # Each registered tile under its partition: itself, or its block (one block a run).
    keys = {u for t in units.registered if (u := units.unit(t)) is not None}
    if not keys:
        return dg.SkipReason(
            "no registered region has tiles yet; add a file under the regions directory"
        )
    selection = [k for a in tile_year_assets for k in a.keys]
    blocks = {k for k in keys if is_block_id(k)}
    requests = tile_year_run_requests(
        order,
        [(k, year) for k in keys - blocks],
        asset_selection=selection,
        reason=f"weekly refresh of {year}",
    )
    return requests + [
        range_run_request(
            year,
            [b],
            asset_selection=selection,
            reason=f"weekly refresh of {year}",
            n_tile_years=len(units.tiles(b)),
        )
        for b in sorted(blocks)
    ]


all_schedules = [current_year_refresh]
