"""Partitions: tiles (dynamic, added by the region sensor) x years, and regions x years.

A key of the tiles dimension is a tile id, or, where ``block_side`` > 1 (a continent),
a block id standing for the registered tiles of that square of the grid
(:class:`agrifm_pipeline.tiles.Block`): Dagster then counts block-years, and each tile
keeps its own versions, lineage and audit row in the store. :class:`TileUnits` maps
between the two.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from typing import Any

import dagster as dg

from agrifm_pipeline.frames import S2_L2A_FIRST_YEAR
from agrifm_pipeline.settings import BLOCK_SIDE_ENV
from agrifm_pipeline.tiles import Block, Tile, is_block_id, partition_unit

FIRST_YEAR = S2_L2A_FIRST_YEAR
TILE_DIM, YEAR_DIM, REGION_DIM = "tile", "year", "region"

tiles_partitions = dg.DynamicPartitionsDefinition(name="tiles")
regions_partitions = dg.DynamicPartitionsDefinition(name="regions")


def year_keys(last: int | None = None) -> list[str]:
    return [str(y) for y in range(FIRST_YEAR, (last or dt.date.today().year) + 1)]


years_partitions = dg.StaticPartitionsDefinition(year_keys())

tile_year_partitions = dg.MultiPartitionsDefinition(
    {TILE_DIM: tiles_partitions, YEAR_DIM: years_partitions}
)
region_year_partitions = dg.MultiPartitionsDefinition(
    {REGION_DIM: regions_partitions, YEAR_DIM: years_partitions}
)

# A UI backfill of N tile-years becomes ceil(N / 16) runs: the model loads once
# per run, and every run's chips go through the encoder in shared batches.
MAX_PARTITIONS_PER_RUN = 16


def partitions_per_run(block_side: int) -> int:
    """Partitions a backfill run covers: 16 tile-years, or as many blocks as hold about
    that many tiles, at least one (a block of 8 x 8 tiles is 64 tile-years a run)."""
    return max(1, MAX_PARTITIONS_PER_RUN // (block_side * block_side))


# The deployment's block side, read when the definitions load (a backfill's runs are cut
# by it); a bad value is reported where the resources are built from the same variable.
_SIDE = os.environ.get(BLOCK_SIDE_ENV, "").strip()
tile_year_backfill = dg.BackfillPolicy.multi_run(
    max_partitions_per_run=partitions_per_run(int(_SIDE) if _SIDE.isdigit() and int(_SIDE) else 1)
)


def split_key(key: str, first: str = TILE_DIM) -> tuple[str, int]:
    """A tile-year (or region-year) partition key -> (tile or region, year), read through
    the partitions definition's own parser. A key's string is its dimensions' keys
    joined by ``|`` in the order of their names (``tile|year``, ``region|year``), so
    the common case is split directly: a tick splits every materialised key of every
    asset, 625,000 of them at a continent-year, and the parser costs about 40 µs each."""
    if not isinstance(key, dg.MultiPartitionKey):
        head, sep, tail = str(key).partition("|")
        if sep and head and tail.isdigit() and len(tail) == 4:
            return head, int(tail)
        definition = tile_year_partitions if first == TILE_DIM else region_year_partitions
        key = definition.get_partition_key_from_str(str(key))
    dims = key.keys_by_dimension
    return dims[first], int(dims[YEAR_DIM])


def tile_year_key(tile: Tile | str, year: int | str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({TILE_DIM: str(tile), YEAR_DIM: str(year)})


def region_year_key(region: str, year: int | str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({REGION_DIM: region, YEAR_DIM: str(year)})


def recorded_versions(unit: str, metadata: Any) -> dict[str, str | None]:
    """tile -> the version a materialisation of the tiles-dimension key ``unit`` names: a
    tile's own ``version``, or each tile of a block in its ``versions``."""
    versions = metadata.get("versions")
    if versions is not None and isinstance(versions.value, dict):
        return {str(t): None if v is None else str(v) for t, v in versions.value.items()}
    if is_block_id(unit):
        return {}
    version = metadata.get("version")
    return {unit: str(version.value) if version is not None else None}


# A run over block partitions that does only some of their tiles names them here (comma-
# separated tile ids; the stale sensor's requests): the others keep their current versions.
TILES_TAG = "agrifm/tiles"


class TileUnits:
    """The tiles dimension's keys (``known``: a tile, or a block of tiles) and the
    registered tiles each stands for."""

    def __init__(self, registered: Iterable[str], known: Iterable[str] = ()) -> None:
        self.registered = sorted(set(registered))
        self.known = set(known)
        self._sides = sorted({Block.from_id(k).side for k in self.known if is_block_id(k)})
        self._by_block: dict[int, dict[str, list[str]]] = {}

    def blocks(self, side: int) -> dict[str, list[str]]:
        """block id -> its registered tiles, for blocks of ``side`` tiles."""
        if side not in self._by_block:
            out: dict[str, list[str]] = {}
            for t in self.registered:
                out.setdefault(partition_unit(t, side), []).append(t)
            self._by_block[side] = out
        return self._by_block[side]

    def tiles(self, key: str) -> list[str]:
        """The tiles a key stands for: itself, or a block's registered tiles."""
        if not is_block_id(key):
            return [key]
        return list(self.blocks(Block.from_id(key).side).get(key, []))

    def unit(self, tile: str) -> str | None:
        """The known key a tile is partitioned under: itself, else a known block holding
        it; None when neither is a partition (its region not yet registered)."""
        if tile in self.known:
            return tile
        for side in self._sides:
            block = partition_unit(tile, side)
            if block in self.known:
                return block
        return None

    def new_keys(self, side: int) -> list[str]:
        """Keys to add so that every registered tile is partitioned: each tile not yet
        under a known key, as itself (``side`` 1) or its block of ``side`` tiles."""
        new = {partition_unit(t, side) for t in self.registered if self.unit(t) is None}
        return sorted(new - self.known)
