"""Acquisition: a tile-year's raw frame stack from a provider, and the scenes it would use.

acquire              provider -> FrameStack (T, 10, H, W) uint16 on the tile grid
scene_index          the scenes acquire would consider (id -> stamp), from headers
frame_stack_dataset  the frame stack as stored (frames, clear fraction per frame)
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from agrifm_pipeline.errors import NoCoverageError
from agrifm_pipeline.frames import frame_windows
from agrifm_pipeline.providers.base import FrameStack, Provider, SceneIndexed
from agrifm_pipeline.tiles import Tile
from agrifm_pipeline.tileyear.settings import TileYearSettings


def acquire(provider: Provider, tile: Tile, year: int, cfg: TileYearSettings) -> FrameStack:
    """The tile-year's raw frame stack from ``provider`` on the tile's UTM grid."""
    cfg.check_tile(tile)
    windows = frame_windows(int(year), cfg.n_frames)
    try:
        return provider.fetch(tile.geobox(cfg.scale_m), windows, cfg.sensor(), cfg.mask())
    except NoCoverageError as exc:  # the provider knows the grid; the tile's id is ours
        raise NoCoverageError(f"tile {tile.id}", exc.source, exc.extent) from exc


def scene_index(
    provider: Provider, tile: Tile, year: int, cfg: TileYearSettings
) -> dict[str, str] | None:
    """The scenes :func:`acquire` would consider for the tile-year (id -> stamp), listed
    from headers without acquiring; None when the provider cannot list them cheaply
    (see :class:`~agrifm_pipeline.providers.base.SceneIndexed`)."""
    if not isinstance(provider, SceneIndexed):
        return None
    windows = frame_windows(int(year), cfg.n_frames)
    return provider.scene_index(tile.geobox(cfg.scale_m), windows, cfg.sensor())


def frame_stack_dataset(stack: FrameStack, fill_value: float = 0.0) -> xr.Dataset:
    """The frame stack as a self-describing dataset (clear fraction per frame beside it).

    ``fill_value`` (the digital number of a pixel with no clear observation) is declared
    as the frames' ``nodata`` attribute: rioxarray's ``.rio.nodata`` reads it, and the
    values stay uint16 (a CF ``_FillValue`` would make xarray decode them to float).
    """
    from agrifm_pipeline.providers.compositing import fill_dn

    da = stack.data
    clear = xr.DataArray(
        np.array([f.clear_fraction for f in stack.frames], dtype="float32"),
        dims=("time",),
        coords={"time": da.coords["time"]},
        name="clear_fraction",
    )
    ds = da.rename("frames").to_dataset()
    ds["clear_fraction"] = clear
    ds["frames"].attrs.update(
        long_name="Sentinel-2 L2A surface reflectance composites",
        units="reflectance x 10000",
        nodata=int(fill_dn(fill_value)),
        nodata_meaning="no clear observation in the frame's window (outside the source's "
        "coverage, or every observation masked as cloud, shadow or snow)",
    )
    # One chunk per frame: the frames of a tile-year are compressed and read back in
    # parallel (a single 128 MB chunk is one thread's work).
    ds["frames"].encoding["chunks"] = (1, *da.shape[1:])
    return ds
