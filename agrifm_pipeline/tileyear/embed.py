"""What embedding a tile-year needs beyond the model: which chips to encode, the encoder's
features placed on the tile's georeferenced grid, and the coverage recorded beside it.

    covered_chips      chip coverage -> the chips to encode (at least ``min_chip_coverage``)
    cell_coverage      valid frames -> each grid cell's share of pixel-frames with data
    features_with_gaps encoded chips' features back among all chips (NaN where not encoded)
    coverage_attrs     what a grid records about its coverage (its dataset's attributes)
    encoded_mask       which chips of a stored grid were encoded, from those attributes
    embedding_grid     encoder features (chips, D, h, w) -> georeferenced (band, y, x) tile grid
    with_coverage      the grid as stored: embedding beside each cell's valid fraction
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from affine import Affine

from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.tiles import Tile
from agrifm_pipeline.tileyear.normalise import chip_coverage, tile_chips
from agrifm_pipeline.tileyear.settings import TileYearSettings


def covered_chips(coverage: np.ndarray, cfg: TileYearSettings) -> np.ndarray:
    """(chips,) bool: the chips to encode, those whose valid fraction is at least
    ``min_chip_coverage`` (at 0, every chip, all-fill ones included)."""
    return np.asarray(coverage, dtype=np.float64) >= cfg.min_chip_coverage


def cell_coverage(
    valid: np.ndarray, n_frames: int, cfg: TileYearSettings, grid_hw: int
) -> np.ndarray:
    """(H, W) valid-frame counts -> (per * h, per * h) float32: each grid cell's share of
    pixel-frames with data (area-averaged over the cell's footprint in its chip)."""
    per = cfg.chips_per_side
    chips = tile_chips(valid[None, None], cfg.chip_px).reshape(
        per * per, 1, cfg.chip_px, cfg.chip_px
    )
    frac = torch.from_numpy(chips.astype(np.float32) / max(1, n_frames))
    cells = torch.nn.functional.adaptive_avg_pool2d(frac, grid_hw).numpy()  # (chips, 1, h, h)
    h = grid_hw
    return cells.reshape(per, per, h, h).transpose(0, 2, 1, 3).reshape(per * h, per * h)


def features_with_gaps(
    feats: torch.Tensor, keep: np.ndarray, feature_shape: Sequence[int]
) -> torch.Tensor:
    """Encoded chips' features (k, D, h, w) back in place among all chips; the chips that
    were not encoded (``keep`` False) are NaN."""
    keep_t = torch.from_numpy(np.asarray(keep, dtype=bool))
    if feats.shape[0] != int(keep_t.sum()):
        raise InputContractError(
            f"{feats.shape[0]} encoded chips for {int(keep_t.sum())} covered ones"
        )
    out = torch.full((len(keep_t), *feature_shape), float("nan"), dtype=torch.float32)
    if feats.shape[0]:
        out[keep_t] = feats.float()
    return out


def coverage_attrs(coverage: np.ndarray, keep: np.ndarray, cfg: TileYearSettings) -> dict[str, Any]:
    """What an embedding grid records about its coverage (its dataset's attributes)."""
    return {
        "valid_fraction": round(float(np.mean(coverage)), 6) if len(coverage) else 0.0,
        "chip_valid_fraction": [round(float(c), 6) for c in coverage],
        "min_chip_coverage": cfg.min_chip_coverage,
        "n_chips": len(keep),
        "n_chips_encoded": int(np.sum(keep)),
    }


def encoded_mask(attrs: Mapping[str, Any], n_chips: int) -> np.ndarray:
    """(chips,) bool: which chips of a stored grid were encoded (all of them for a grid
    written before coverage was recorded)."""
    cov = attrs.get("chip_valid_fraction")
    if cov is None or len(cov) != n_chips:
        return np.ones(n_chips, dtype=bool)
    return np.asarray(cov, dtype=np.float64) >= float(attrs.get("min_chip_coverage", 0.0))


def embedding_grid(
    features: torch.Tensor | np.ndarray, tile: Tile, cfg: TileYearSettings
) -> xr.DataArray:
    """Chip features (chips, D, h, w) -> the tile's grid (band, y, x) with CRS and transform.

    Chip ``i`` covers rows ``i // n`` and columns ``i % n`` of the tile; its
    ``h x w`` cells cover its footprint exactly, so the cell size is the chip's
    side divided by ``h`` (320 m for 224 px chips and the (4,4,4) patch).
    """
    import rioxarray  # noqa: F401

    f = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    n_chips, d, h, w = f.shape
    per = cfg.chips_per_side
    if n_chips != per * per:
        raise InputContractError(f"{n_chips} chips do not make a {per} x {per} tile")
    if h != w:
        raise InputContractError(f"chip grids must be square; got {h} x {w}")
    grid = f.reshape(per, per, d, h, w).transpose(2, 0, 3, 1, 4).reshape(d, per * h, per * w)
    cell = cfg.chip_px * cfg.scale_m / h
    x0, _, _, y1 = tile.bounds
    transform = Affine(cell, 0.0, x0, 0.0, -cell, y1)
    da = xr.DataArray(
        grid.astype(np.float32, copy=False),
        dims=("band", "y", "x"),
        coords={
            "band": np.arange(d),
            "y": y1 - cell * (np.arange(per * h) + 0.5),
            "x": x0 + cell * (np.arange(per * w) + 0.5),
        },
        name="embedding",
        attrs={"long_name": "AgriFM S2 encoder features", "cell_size_m": cell},
    )
    return da.rio.write_crs(tile.crs).rio.write_transform(transform)


def with_coverage(
    grid: xr.DataArray, valid: np.ndarray, n_frames: int, keep: np.ndarray, cfg: TileYearSettings
) -> xr.Dataset:
    """The grid as stored: ``embedding`` beside ``valid_fraction`` (y, x), each cell's share
    of pixel-frames with data, and the chips' coverage in the attributes
    (:func:`coverage_attrs`). Cells of chips that were not encoded are NaN in
    ``embedding``; mask cells with ``valid_fraction`` for anything finer."""
    per = cfg.chips_per_side
    cells = cell_coverage(valid, n_frames, cfg, grid.shape[-1] // per)
    ds = grid.to_dataset()
    ds["valid_fraction"] = xr.DataArray(
        cells.astype(np.float32),
        dims=("y", "x"),
        coords={"y": grid["y"], "x": grid["x"]},
        attrs={"long_name": "share of the cell's pixel-frames that hold data (not fill)"},
    )
    ds.attrs.update(coverage_attrs(chip_coverage(valid, n_frames, cfg.chip_px), keep, cfg))
    return ds
