"""Normalisation: a tile's chips made model-ready, what the stored result holds, and
how many frames hold data at each pixel.

    tile_chips         (T, 10, H, W) -> (rows, cols, T, 10, chip, chip) view, rows from the top
    normalise_tile     chips -> (chips, T, 10, S, S) float32 (clip, normalise, resize)
    valid_frames       frames -> how many frames hold data (not fill) at each pixel
    chip_coverage      valid frames -> each chip's share of pixel-frames with data
    chip_statistics    (chips, T, C, S, S) -> mean, std, min, max per plane
    normalized_dataset the normalised tile as stored: per-chip statistics, the tensors if kept
    model_input        the encoder's input again: stored tensors, or the frames re-normalised
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import xarray as xr

from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.preprocess import preprocess_chips
from agrifm_pipeline.stages import FRAMES
from agrifm_pipeline.tileyear.settings import TileYearSettings


def tile_chips(values: np.ndarray, chip_px: int) -> np.ndarray:
    """(T, C, H, W) -> (rows, cols, T, C, chip_px, chip_px), rows from the top.

    A strided view of ``values`` (no copy): the conversion to float32 in
    :func:`preprocess_chips` writes the chips contiguously, row-major, in the
    same pass.
    """
    t, c, h, w = values.shape
    if h % chip_px or w % chip_px:
        raise InputContractError(
            f"a tile of {h} x {w} px is not a whole number of {chip_px} px chips"
        )
    ny, nx = h // chip_px, w // chip_px
    return values.reshape(t, c, ny, chip_px, nx, chip_px).transpose(2, 4, 0, 1, 3, 5)


def normalise_tile(
    values: np.ndarray, cfg: TileYearSettings
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Raw (T, 10, H, W) -> model-ready (chips, T, 10, S, S) and its record."""
    chips = tile_chips(np.asarray(values), cfg.chip_px)
    out = preprocess_chips(
        chips,
        n_frames=cfg.n_frames,
        image_size=cfg.image_size,
        norm_mode=cfg.norm_mode,
        fill_value=cfg.fill_value,
    )
    return out.tensor, out.record


def valid_frames(values: np.ndarray, fill_value: float = 0.0) -> np.ndarray:
    """(T, C, H, W) raw frames -> (H, W) uint8: how many frames hold data at each pixel.

    A pixel holds data in a frame unless every band there is the fill value (what the
    providers write where no clear observation exists). One frame at a time, so the
    temporary stays one frame's size.
    """
    from agrifm_pipeline.providers.compositing import fill_dn

    t, _, h, w = values.shape
    if t > 255:
        raise InputContractError(f"{t} frames; valid-frame counts are kept as uint8 (<= 255)")
    fill = fill_dn(fill_value) if np.asarray(values).dtype.kind in "ui" else fill_value
    count = np.zeros((h, w), dtype=np.uint8)
    for i in range(t):
        count += (values[i] != fill).any(axis=0)
    return count


def chip_coverage(valid: np.ndarray, n_frames: int, chip_px: int) -> np.ndarray:
    """(H, W) valid-frame counts -> (chips,) float: each chip's share of pixel-frames with
    data, chips row-major from the top-left (the order of :func:`tile_chips`)."""
    h, w = valid.shape
    ny, nx = h // chip_px, w // chip_px
    blocks = valid.reshape(ny, chip_px, nx, chip_px).astype(np.float64)
    return (blocks.sum(axis=(1, 3)) / (chip_px * chip_px * max(1, n_frames))).reshape(-1)


STATS = ("mean", "std", "min", "max")


def chip_statistics(tensor: torch.Tensor) -> torch.Tensor:
    """(chips, T, C, S, S) -> (chips, T, C, 4): mean, std (population), min, max per plane.

    Plain reductions over the last axis (torch's fused ``std_mean``/``aminmax`` over
    an axis are several times slower here); the std is two-pass, a chip at a time,
    so its temporary stays small.
    """
    flat = tensor.flatten(3)  # (chips, T, C, S*S)
    mean = flat.mean(-1)
    std = torch.empty_like(mean)
    for i in range(flat.shape[0]):
        std[i] = torch.linalg.vector_norm(flat[i] - mean[i, ..., None], dim=-1)
    std /= math.sqrt(flat.shape[-1])
    return torch.stack([mean, std, flat.amin(-1), flat.amax(-1)], dim=-1)


def normalized_dataset(
    tensor: torch.Tensor,
    cfg: TileYearSettings,
    *,
    keep_tensors: bool = True,
    valid: np.ndarray | None = None,
) -> xr.Dataset:
    """The normalised tile as stored: ``chip_stats`` (chip, time, band, stat) always, the
    (chips, T, 10, S, S) float32 ``tensors`` themselves when ``keep_tensors``, and the
    ``valid_frames`` (y, x) count of frames holding data per pixel (:func:`valid_frames`)
    when given: what the embedding step reads to leave out chips below
    ``min_chip_coverage``.

    The tensors are four times the raw frames' bytes and an exact, cheap function of
    them (:func:`model_input` recomputes them), so keeping them is a choice; the
    statistics and the value summary in the attrs are what checks and audits read.
    """
    n = tensor.shape[0]
    per_side = cfg.chips_per_side
    coords = {
        "chip": np.arange(n),
        "chip_row": ("chip", np.arange(n) // per_side),
        "chip_col": ("chip", np.arange(n) % per_side),
        "band": list(cfg.bands),
    }
    stats = xr.DataArray(
        chip_statistics(tensor).numpy(),
        dims=("chip", "time", "band", "stat"),
        coords={**coords, "stat": list(STATS)},
        name="chip_stats",
        attrs={"long_name": "per chip, frame and band statistics of the normalised input"},
    )
    ds = stats.to_dataset()
    if keep_tensors:
        da = xr.DataArray(
            tensor.numpy(),
            dims=("chip", "time", "band", "py", "px"),
            coords=coords,
            name="tensors",
            attrs={"long_name": f"normalised model input ({cfg.norm_mode}), {cfg.image_size} px"},
        )
        da.encoding["chunks"] = (1, *da.shape[1:])  # one chunk per chip
        ds["tensors"] = da
    if valid is not None:
        ds["valid_frames"] = xr.DataArray(
            np.asarray(valid, dtype=np.uint8),
            dims=("y", "x"),
            name="valid_frames",
            attrs={
                "long_name": "frames holding data (not fill) at each pixel of the tile",
                "n_frames": cfg.n_frames,
            },
        )
        ds.attrs["chip_valid_fraction"] = [
            round(float(c), 6) for c in chip_coverage(valid, cfg.n_frames, cfg.chip_px)
        ]
    # Summary the asset check reads instead of the whole array again (NaN propagates
    # through min and max, so the non-finite count is only taken when there are some).
    lo, hi = stats.sel(stat="min").values, stats.sel(stat="max").values
    finite = bool(np.isfinite(lo).all() and np.isfinite(hi).all())
    ds.attrs.update(
        n_nonfinite=0 if finite else int((~torch.isfinite(tensor)).sum()),
        value_min=float(lo.min()) if n else 0.0,
        value_max=float(hi.max()) if n else 0.0,
        tensors_kept=int(keep_tensors),
    )
    return ds


def model_input(
    normalized: xr.Dataset,
    frames: Callable[[], xr.Dataset],
    lineage: Mapping[str, Any],
    where: str,
) -> torch.Tensor:
    """The (chips, T, 10, S, S) tensor a ``normalized_tensors`` partition stands for.

    Its stored ``tensors`` when it kept them; otherwise the frame stack version it
    was made from (``frames()`` opens the version its lineage names), normalised
    again with the settings in its lineage. The opened version must be the one
    recorded, and the result must reproduce the recorded statistics; either
    mismatch names the partition to re-make.
    """
    if "tensors" in normalized:
        return torch.from_numpy(normalized["tensors"].values)
    made_from = lineage.get("inputs", {}).get(FRAMES.asset, {}).get("version")
    if not made_from:
        raise InputContractError(
            f"normalized_tensors {where} does not name the s2_frame_stack version it was "
            "made from (written by an older release); re-materialise normalized_tensors for it"
        )
    src = frames()
    now = src.encoding.get("agrifm_version")
    if made_from != now:
        raise InputContractError(
            f"normalized_tensors {where} was computed from s2_frame_stack version {made_from}, "
            f"but version {now} was opened; re-materialise normalized_tensors for this partition"
        )
    cfg = TileYearSettings.from_record(lineage["settings"])
    tensor, _ = normalise_tile(src["frames"].values, cfg)
    stats = normalized["chip_stats"].sel(stat=["min", "max"]).values
    flat = tensor.flatten(3)
    again = torch.stack([flat.amin(-1), flat.amax(-1)], dim=-1).numpy()
    if again.shape != stats.shape or not np.array_equal(again, stats, equal_nan=True):
        raise InputContractError(
            f"normalising s2_frame_stack {where} again does not reproduce the statistics "
            "recorded in normalized_tensors; re-materialise normalized_tensors for it"
        )
    return tensor
