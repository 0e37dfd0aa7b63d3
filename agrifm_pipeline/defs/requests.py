"""Batched run requests: many tile-years per run, as a UI backfill makes them.

Dagster runs a partitioned asset job over a *range* of partitions when a run
carries the ``dagster/asset_partition_range_start`` / ``_end`` tags. For the
tile x year partitions a range is a rectangle (tiles from..to in the order
they were added, years from..to), so a set of wanted tile-years is cut into
rectangles of one year and a run of consecutive wanted tiles, at most
``max_per_run`` tiles each. This is the public way to batch; Dagster's
``RunRequest.for_asset_graph_subset`` (a real backfill from a sensor) is
marked private, and every request is built by :func:`range_run_request` so it
can change in one place.
"""

from collections.abc import Iterable, Sequence

import dagster as dg

from agrifm_pipeline.defs.partitions import MAX_PARTITIONS_PER_RUN, tile_year_key

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def tile_rectangles(
    tile_order: Sequence[str], wanted: Iterable[tuple[str, int]], max_per_run: int
) -> list[tuple[int, list[str]]]:
    """(year, consecutive tiles) blocks covering exactly ``wanted``."""
    position = {t: i for i, t in enumerate(tile_order)}
    by_year: dict[int, list[str]] = {}
    for tile, year in set(wanted):
        if tile not in position:
            raise KeyError(f"tile {tile} is not a tiles partition; register its region first")
        by_year.setdefault(int(year), []).append(tile)
    blocks: list[tuple[int, list[str]]] = []
    for year in sorted(by_year):
        tiles = sorted(by_year[year], key=position.__getitem__)
        block: list[str] = []
        for t in tiles:
            contiguous = block and position[t] == position[block[-1]] + 1
            if block and (not contiguous or len(block) >= max_per_run):
                blocks.append((year, block))
                block = []
            block.append(t)
        if block:
            blocks.append((year, block))
    return blocks


def range_run_request(
    year: int,
    tiles: Sequence[str],
    *,
    asset_selection: Sequence[dg.AssetKey],
    reason: str,
    tags: dict[str, str] | None = None,
    n_tile_years: int | None = None,
) -> dg.RunRequest:
    """One run over a rectangle: ``tiles`` (consecutive tiles-dimension keys in partition
    order: tiles, or blocks doing ``n_tile_years`` tiles) x ``year``."""
    start, end = tile_year_key(tiles[0], year), tile_year_key(tiles[-1], year)
    return dg.RunRequest(
        asset_selection=list(asset_selection),
        tags={
            RANGE_START: str(start),
            RANGE_END: str(end),
            "agrifm/reason": reason[:200],
            "agrifm/n_tile_years": str(len(tiles) if n_tile_years is None else n_tile_years),
            **(tags or {}),
        },
    )


def tile_year_run_requests(
    tile_order: Sequence[str],
    wanted: Iterable[tuple[str, int]],
    *,
    asset_selection: Sequence[dg.AssetKey],
    reason: str,
    max_per_run: int = MAX_PARTITIONS_PER_RUN,
) -> list[dg.RunRequest]:
    """Run requests covering ``wanted`` (tile, year) pairs for ``asset_selection``."""
    return [
        range_run_request(year, tiles, asset_selection=asset_selection, reason=reason)
        for year, tiles in tile_rectangles(tile_order, wanted, max_per_run)
    ]
