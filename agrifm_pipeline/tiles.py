"""Tiles: the pipeline's unit of work, squares on a fixed grid in the local UTM zone.

A tile is anchored at its zone's origin (easting 0, northing 0 — the false
northing of 10,000,000 m is part of southern-zone coordinates), and its side is
a whole number of chips. Its id alone gives the CRS and the bounds::

    32631_8960m_E0064_N0627   EPSG:32631, 8960 m side, column 64, row 627
                              -> x 573440..582400, y 5617920..5626880

Ids contain neither ``|`` nor ``,`` (Dagster multi-partition keys and UI
backfills reserve them).

A *block* is an aligned square of ``side`` x ``side`` tiles of one zone and size, the
unit a continent is partitioned by in Dagster (each tile keeps its own versions in the
store). Its id says so, and is never a tile id::

    32631_8960m_8x8_E0008_N0078   the 8 x 8 tiles of columns 64..71, rows 624..631
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from odc.geo.geobox import GeoBox

from agrifm_pipeline.errors import RegionError

DEFAULT_CHIP_PX = 224
DEFAULT_CHIPS_PER_SIDE = 4
DEFAULT_SCALE_M = 10.0

_TILE_ID = re.compile(
    r"^(?P<epsg>327\d\d|326\d\d)_(?P<size>\d+)m_E(?P<col>\d{4,})_N(?P<row>\d{4,})$"
)
_BLOCK_ID = re.compile(
    r"^(?P<epsg>327\d\d|326\d\d)_(?P<size>\d+)m_(?P<side>\d+)x(?P=side)"
    r"_E(?P<col>\d{4,})_N(?P<row>\d{4,})$"
)
MAX_BLOCK_SIDE = 64


def _parse(pattern: re.Pattern[str], text: str, what: str, form: str, eg: str) -> dict[str, int]:
    """The id's numbers by name, else a RegionError giving its form and an example."""
    m = pattern.match(text.strip())
    if not m:
        raise RegionError(
            f"{what} id {text!r} is not of the form <epsg>_<size>m_{form}, e.g. 32631_8960m_{eg}"
        )
    return {k: int(v) for k, v in m.groupdict().items()}


def tile_size_m(chip_px: int = DEFAULT_CHIP_PX, chips_per_side: int = DEFAULT_CHIPS_PER_SIDE,
                scale_m: float = DEFAULT_SCALE_M) -> int:  # fmt: skip
    size = chip_px * chips_per_side * scale_m
    if size != int(size) or size <= 0:
        raise RegionError(f"tile side {size} m is not a whole positive number of metres")
    return int(size)


@dataclass(frozen=True, order=True)
class Tile:
    """A square of ``size_m`` metres at grid column ``col``, row ``row`` of UTM zone ``epsg``."""

    epsg: int
    size_m: int
    col: int
    row: int

    def __post_init__(self) -> None:
        if not (32601 <= self.epsg <= 32660 or 32701 <= self.epsg <= 32760):
            raise RegionError(f"EPSG:{self.epsg} is not a WGS84 UTM zone (326xx / 327xx)")
        if self.size_m <= 0 or self.col < 0 or self.row < 0:
            raise RegionError(f"tile {self} has a non-positive size or a negative index")

    @property
    def id(self) -> str:
        return f"{self.epsg}_{self.size_m}m_E{self.col:04d}_N{self.row:04d}"

    @classmethod
    def from_id(cls, tile_id: str) -> Tile:
        m = _parse(_TILE_ID, tile_id, "tile", "E<col>_N<row>", "E0064_N0627")
        return cls(m["epsg"], m["size"], m["col"], m["row"])

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) in the zone's metres."""
        x0, y0 = self.col * self.size_m, self.row * self.size_m
        return (float(x0), float(y0), float(x0 + self.size_m), float(y0 + self.size_m))

    def geobox(self, scale_m: float = DEFAULT_SCALE_M) -> GeoBox:
        """The tile's pixel grid at ``scale_m`` (north-up, top-left anchored)."""
        n = self.size_m / scale_m
        if n != int(n):
            raise RegionError(
                f"tile side {self.size_m} m is not a whole number of {scale_m} m pixels"
            )
        return GeoBox.from_bbox(self.bounds, self.crs, resolution=scale_m)

    def chip_geoboxes(
        self, chip_px: int = DEFAULT_CHIP_PX, scale_m: float = DEFAULT_SCALE_M
    ) -> list[GeoBox]:
        """Chips in row-major order from the top-left; they tile the tile exactly."""
        gbox = self.geobox(scale_m)
        ny, nx = gbox.shape
        if ny % chip_px or nx % chip_px:
            raise RegionError(
                f"tile {self.id} ({nx} px) is not a whole number of {chip_px} px chips"
            )
        return [
            gbox[r : r + chip_px, c : c + chip_px]
            for r in range(0, ny, chip_px)
            for c in range(0, nx, chip_px)
        ]

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True, order=True)
class Block:
    """The ``side`` x ``side`` tiles of size ``size_m`` at block column ``col``, row ``row``
    of zone ``epsg``: tiles ``col * side .. col * side + side - 1`` (rows likewise)."""

    epsg: int
    size_m: int
    side: int
    col: int
    row: int

    def __post_init__(self) -> None:
        if not 2 <= self.side <= MAX_BLOCK_SIDE:
            raise RegionError(
                f"block side {self.side} is outside 2..{MAX_BLOCK_SIDE} tiles (1 is a tile)"
            )

    @property
    def id(self) -> str:
        s = self.side
        return f"{self.epsg}_{self.size_m}m_{s}x{s}_E{self.col:04d}_N{self.row:04d}"

    @classmethod
    def of(cls, tile: Tile, side: int) -> Block:
        return cls(tile.epsg, tile.size_m, side, tile.col // side, tile.row // side)

    @classmethod
    def from_id(cls, block_id: str) -> Block:
        m = _parse(_BLOCK_ID, block_id, "block", "<n>x<n>_E<col>_N<row>", "8x8_E0008_N0078")
        return cls(m["epsg"], m["size"], m["side"], m["col"], m["row"])

    def contains(self, tile: Tile) -> bool:
        return (tile.epsg, tile.size_m, tile.col // self.side, tile.row // self.side) == (
            self.epsg,
            self.size_m,
            self.col,
            self.row,
        )

    def __str__(self) -> str:
        return self.id


def is_block_id(key: str) -> bool:
    """Whether a tiles-dimension key names a block (else it names one tile)."""
    return _BLOCK_ID.match(key) is not None


def partition_unit(tile_id: str, side: int) -> str:
    """The key a tile is partitioned under: itself (``side`` 1), else its block's id."""
    return tile_id if side == 1 else Block.of(Tile.from_id(tile_id), side).id
