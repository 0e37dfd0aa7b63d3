"""One tile-year, stage by stage: the science the Dagster assets call.

Nothing here knows about Dagster. Each function takes plain inputs and
returns arrays plus the record of how they were made:

    acquire            provider -> FrameStack (T, 10, H, W) uint16 on the tile grid
    tile_chips         (T, 10, H, W) -> (rows, cols, T, 10, chip, chip) view, rows from the top
    normalise_tile     chips -> (chips, T, 10, S, S) float32 (clip, normalise, resize)
    normalized_dataset the normalised tile as stored: per-chip statistics, the tensors if kept
    model_input        the encoder's input again: stored tensors, or the frames re-normalised
    valid_frames       frames -> how many frames hold data (not fill) at each pixel
    chip_coverage      valid frames -> each chip's valid fraction; chips below
                       ``min_chip_coverage`` are not encoded (NaN in the grid)
    embedding_grid     encoder features (chips, D, h, w) -> georeferenced (band, y, x) tile grid
    chip_table         tile grid -> pooled mean/max per chip with geometry and valid fraction
    band_frames        named bands of a stored frame stack, read as one band range
    preview_png        median RGB of the input beside a 3-component PCA of the grid
    mosaic             tile grids of one CRS -> one grid
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr
from affine import Affine

from agrifm_pipeline.errors import InputContractError, NoCoverageError, SettingsError
from agrifm_pipeline.frames import frame_windows
from agrifm_pipeline.lineage import Fingerprints, stage_fingerprints
from agrifm_pipeline.preprocess import preprocess_chips
from agrifm_pipeline.providers.base import (
    DEFAULT_MASKED_SCL,
    CloudMask,
    FrameStack,
    Provider,
    SceneIndexed,
)
from agrifm_pipeline.settings import (
    AgriFMSettings,
    canonical_norm_mode,
    check_tile_geometry,
    load_settings,
)
from agrifm_pipeline.specs import AGRIFM_S2_BANDS, SensorSpec
from agrifm_pipeline.tiles import DEFAULT_CHIP_PX, DEFAULT_CHIPS_PER_SIDE, Tile, tile_size_m

DEFAULT_MIN_CHIP_COVERAGE = 0.05


@dataclass(frozen=True)
class TileYearSettings:
    """Everything that decides what a tile-year's arrays contain.

    Defaults follow the ``RS_EMBED_AGRIFM_*`` settings (frames, image size,
    normalisation) and the design's tile geometry (4 x 4 chips of 224 px at
    10 m).
    """

    n_frames: int = 8
    image_size: int = 224
    norm_mode: str = "agrifm_stats"
    chip_px: int = DEFAULT_CHIP_PX
    chips_per_side: int = DEFAULT_CHIPS_PER_SIDE
    scale_m: float = 10.0
    collection: str = "COPERNICUS/S2_SR_HARMONIZED"
    bands: tuple[str, ...] = AGRIFM_S2_BANDS
    cloudy_pct: float = 30.0
    composite: str = "median"
    fill_value: float = 0.0
    cloud_mask: str = "scl"
    scl_classes: tuple[int, ...] = DEFAULT_MASKED_SCL
    # A chip is encoded only when at least this share of its pixel-frames hold data (not
    # fill); below it, its grid cells are NaN and it costs no encoder time. 5 % of a 224 px
    # chip at 10 m is about 25 ha (a few fields): less than that, and the chip's vectors
    # describe the fill more than the land. The grid's per-cell ``valid_fraction`` masks
    # finer than whole chips.
    min_chip_coverage: float = DEFAULT_MIN_CHIP_COVERAGE

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm_mode", canonical_norm_mode(self.norm_mode))
        object.__setattr__(self, "bands", tuple(self.bands))
        object.__setattr__(self, "scl_classes", tuple(sorted(set(self.scl_classes))))
        if self.n_frames < 1:
            raise SettingsError(f"n_frames={self.n_frames}; use a whole number >= 1")
        check_tile_geometry(self.chip_px, self.chips_per_side)
        if not 0.0 <= self.min_chip_coverage <= 1.0:
            raise SettingsError(
                f"min_chip_coverage={self.min_chip_coverage}; use a share between 0 and 1 "
                "(0 encodes every chip, even all-fill ones)"
            )
        tile_size_m(self.chip_px, self.chips_per_side, self.scale_m)
        self.sensor()
        self.mask()

    @classmethod
    def from_settings(
        cls, settings: AgriFMSettings | None = None, **overrides: Any
    ) -> TileYearSettings:
        s = settings or load_settings()
        base = {"n_frames": s.n_frames, "image_size": s.image_size, "norm_mode": s.norm_mode}
        return cls(**{**base, **overrides})

    @property
    def tile_size_m(self) -> int:
        return tile_size_m(self.chip_px, self.chips_per_side, self.scale_m)

    def sensor(self) -> SensorSpec:
        return SensorSpec(
            collection=self.collection,
            bands=self.bands,
            scale_m=self.scale_m,
            cloudy_pct=self.cloudy_pct,
            composite=self.composite,
            fill_value=self.fill_value,
        )

    def mask(self) -> CloudMask:
        return CloudMask(mode=self.cloud_mask, scl_classes=self.scl_classes)

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> TileYearSettings:
        """Settings from :meth:`as_record` (e.g. a partition's lineage)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in rec.items() if k in names})

    def as_record(self) -> dict[str, Any]:
        rec = asdict(self)
        rec["bands"], rec["scl_classes"] = list(self.bands), list(self.scl_classes)
        return rec

    def check_tile(self, tile: Tile) -> None:
        if tile.size_m != self.tile_size_m:
            raise SettingsError(
                f"tile {tile.id} is {tile.size_m} m but the settings make {self.tile_size_m} m tiles "
                f"({self.chips_per_side} x {self.chip_px} px at {self.scale_m} m); "
                "register regions again with these settings or restore them"
            )

    # -- what each stage depends on (see agrifm_pipeline.lineage) -------------------------
    def fingerprints(
        self,
        *,
        provider: Mapping[str, Any],
        checkpoint_sha256: str,
        precision: str,
        encoder: str = "ours",
    ) -> Fingerprints:
        return stage_fingerprints(
            acquisition={
                "provider": dict(provider),
                "collection": self.collection,
                "bands": list(self.bands),
                "scale_m": self.scale_m,
                "n_frames": self.n_frames,
                "cloudy_pct": self.cloudy_pct,
                "composite": self.composite,
                "fill_value": self.fill_value,
                "cloud_mask": self.cloud_mask,
                "scl_classes": list(self.scl_classes) if self.cloud_mask == "scl" else [],
                "tile_px": self.chip_px * self.chips_per_side,
            },
            normalisation={
                "norm_mode": self.norm_mode,
                "image_size": self.image_size,
                "chip_px": self.chip_px,
            },
            embedding={
                "checkpoint_sha256": checkpoint_sha256,
                "precision": precision,
                "encoder": encoder,
                "min_chip_coverage": self.min_chip_coverage,
            },
        )


# -- acquisition --------------------------------------------------------------------------
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
    from agrifm_pipeline.compositing import fill_dn

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


# -- chips and normalisation ----------------------------------------------------------------
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


# -- coverage -------------------------------------------------------------------------------
def valid_frames(values: np.ndarray, fill_value: float = 0.0) -> np.ndarray:
    """(T, C, H, W) raw frames -> (H, W) uint8: how many frames hold data at each pixel.

    A pixel holds data in a frame unless every band there is the fill value (what the
    providers write where no clear observation exists). One frame at a time, so the
    temporary stays one frame's size.
    """
    from agrifm_pipeline.compositing import fill_dn

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
    made_from = lineage.get("inputs", {}).get("s2_frame_stack", {}).get("version")
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


# -- embeddings -----------------------------------------------------------------------------
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


def chip_table(
    grid: xr.DataArray,
    tile: Tile,
    year: int,
    cfg: TileYearSettings,
    coverage: Mapping[str, Any] | None = None,
) -> Any:
    """Pooled vectors per chip (spatial mean and max) with the chip's footprint.

    Geometry is in WGS84 (one CRS for every zone, as GeoParquet wants one per
    column); the chip's UTM bounds and EPSG code are columns beside it.
    ``coverage`` (the grid dataset's attributes, :func:`coverage_attrs`) adds each
    chip's ``valid_fraction``, whether it was ``encoded``, and a ``status`` that
    says why not; a chip that was not encoded has NaN vectors.
    """
    import geopandas as gpd
    import shapely

    per = cfg.chips_per_side
    values = np.asarray(grid.values)
    d, gh, gw = values.shape
    h, w = gh // per, gw // per
    blocks = values.reshape(d, per, h, per, w).transpose(1, 3, 0, 2, 4).reshape(per * per, d, h * w)
    x0, _, _, y1 = tile.bounds
    side = cfg.chip_px * cfg.scale_m
    rows = np.arange(per * per) // per
    cols = np.arange(per * per) % per
    minx, maxy = x0 + cols * side, y1 - rows * side
    boxes = shapely.box(minx, maxy - side, minx + side, maxy)
    gdf = gpd.GeoDataFrame(
        {
            "tile": tile.id,
            "year": int(year),
            "chip": np.arange(per * per),
            "chip_row": rows,
            "chip_col": cols,
            "epsg": tile.epsg,
            "utm_minx": minx,
            "utm_miny": maxy - side,
            "utm_maxx": minx + side,
            "utm_maxy": maxy,
            "mean": list(blocks.mean(axis=2).astype(np.float32)),
            "max": list(blocks.max(axis=2).astype(np.float32)),
        },
        geometry=gpd.GeoSeries(boxes, crs=tile.crs).to_crs("EPSG:4326"),
    )
    attrs = dict(coverage or {})
    encoded = encoded_mask(attrs, per * per)
    cov = attrs.get("chip_valid_fraction")
    frac = np.asarray(cov, dtype=np.float64) if cov is not None else np.full(per * per, np.nan)
    floor = float(attrs.get("min_chip_coverage", 0.0))
    gdf["valid_fraction"] = frac
    gdf["encoded"] = encoded
    gdf["status"] = [
        "encoded"
        if e
        else f"not encoded: {f:.1%} of its pixel-frames hold data < min_chip_coverage {floor:.0%}"
        for e, f in zip(encoded, frac, strict=True)
    ]
    return gdf


# -- preview --------------------------------------------------------------------------------
def _stretch(rgb: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per-channel 2-98 % stretch (over ``valid`` pixels) to uint8; the rest dark grey."""
    valid = np.ones(rgb.shape[:2], dtype=bool) if valid is None else valid
    out = np.full(rgb.shape, 40, dtype=np.uint8)
    if not valid.any():
        return out
    for i in range(rgb.shape[-1]):
        ch = rgb[..., i].astype(np.float64)
        lo, hi = np.percentile(ch[valid], [2, 98])
        scaled = np.full(ch.shape, 128.0) if hi <= lo else (ch - lo) / (hi - lo) * 255
        out[..., i] = np.where(valid, np.clip(scaled, 0, 255), 40).astype(np.uint8)
    return out


def pca3(grid: np.ndarray) -> np.ndarray:
    """(D, h, w) -> (h, w, 3): the first three principal components, per-pixel.

    Randomised (``torch.svd_lowrank`` of the centred data: 8 directions, 4 power
    iterations, a fixed seed in a forked RNG, so repeatable and the caller's RNG
    untouched): it matches the exact eigendecomposition's components to a
    correlation of 1 - 1e-13 at a fraction of its cost. The SVD is taken of the
    (D, pixels) matrix as the grid stores it, not of its transpose: the power
    iterations' skinny matmuls are faster that way round with MKL (the preview stage
    of bench/bench_pipeline.py), and its right singular vectors are the pixels'
    components.
    """
    d, h, w = grid.shape
    flat = np.asarray(grid).reshape(d, h * w)
    finite = np.isfinite(flat).all(axis=0)
    if not finite.all():  # cells of chips that were not encoded: NaN in the components
        out = np.full((h * w, 3), np.nan)
        if finite.any():
            out[finite] = pca3(flat[:, finite].reshape(d, 1, -1)).reshape(-1, 3)
        return out.reshape(h, w, 3)
    if h * w < 2:
        return np.zeros((h, w, 3))
    x = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    x = x - x.mean(dim=1, keepdim=True)  # (D, pixels), centred over the pixels
    q = min(8, *x.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _, s, v = torch.svd_lowrank(x, q=q, niter=4)  # (q,), (pixels, q)
    comps = (v[:, :3] * s[:3]).numpy().astype(np.float64)
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    return comps.reshape(h, w, 3)


def band_frames(frames: xr.DataArray, bands: Sequence[str]) -> np.ndarray:
    """(T, len(bands), H, W) of the named bands from a (time, band, y, x) frame stack.

    Reads the contiguous band range that holds them and picks them in memory: a
    list index over a Zarr-backed array reads band by band.
    """
    names = [str(b) for b in frames["band"].values]
    missing = [b for b in bands if b not in names]
    if missing:
        raise InputContractError(f"frame stack has no band(s) {missing}; it has {names}")
    idx = [names.index(b) for b in bands]
    lo = min(idx)
    block = np.asarray(frames.isel(band=slice(lo, max(idx) + 1)).values)
    return block[:, [i - lo for i in idx]]


# Up to this many frames the median is taken by a sorting network (below); more by a sort,
# whose cost grows more slowly than the network's T (T - 1) / 2 compare-exchanges.
_NETWORK_FRAMES_MAX = 64


def _median_frame(frames: np.ndarray) -> np.ndarray:
    """(T, ...) -> (...) float32: ``np.median`` over the frame axis, same values.

    Integer frames (what the stores hold) are sorted plane against plane by an
    odd-even transposition network: T rounds of elementwise min/max over whole
    planes, T (T - 1) / 2 compare-exchanges, then the mean of the middle two:
    cheaper than ``torch.sort`` over the frame axis or ``np.median`` for a
    preview's few frames (the preview stage of bench/bench_pipeline.py). Float
    input (NaN would travel through min/max differently) and series of more than
    64 frames take the sort.
    """
    t = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
    n = t.shape[0]
    if frames.dtype.kind in "ui" and n <= _NETWORK_FRAMES_MAX:
        planes = list(t.unbind(0))
        for r in range(n):
            for i in range(r % 2, n - 1, 2):
                a, b = planes[i], planes[i + 1]
                planes[i], planes[i + 1] = torch.minimum(a, b), torch.maximum(a, b)
    else:
        planes = list(t.sort(dim=0).values.unbind(0))
    return ((planes[(n - 1) // 2] + planes[n // 2]) / 2).numpy()


FILL_RGB = (205, 205, 205)  # the preview's fill: neutral grey, hatched
HATCH_RGB = (170, 170, 170)


def _with_fill(rgb: np.ndarray, valid: np.ndarray, size: int, smooth: bool) -> Any:
    """An RGB panel of ``size`` px: the image where ``valid``, hatched grey elsewhere."""
    from PIL import Image

    how = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    img = np.asarray(Image.fromarray(rgb).resize((size, size), how), dtype=np.uint8).copy()
    mask = Image.fromarray(valid.astype(np.uint8) * 255).resize(
        (size, size), Image.Resampling.NEAREST
    )
    m = np.asarray(mask) > 0
    yy, xx = np.mgrid[0:size, 0:size]
    hatch = np.where(((yy + xx) % 10 < 2)[..., None], HATCH_RGB, FILL_RGB).astype(np.uint8)
    img[~m] = hatch[~m]
    return Image.fromarray(img)


def coverage_caption(coverage: Mapping[str, Any] | None) -> str:
    """One line on what share of the tile holds data and how many chips were encoded."""
    attrs = dict(coverage or {})
    if "chip_valid_fraction" not in attrs:
        return "coverage not recorded (grid written before coverage was kept)"
    n, k = int(attrs.get("n_chips", 0)), int(attrs.get("n_chips_encoded", 0))
    return (
        f"data in {float(attrs.get('valid_fraction', 0.0)):.1%} of the tile's pixel-frames; "
        f"{k} of {n} chip(s) encoded (min_chip_coverage {float(attrs.get('min_chip_coverage', 0)):.0%})"
    )


def preview_png(
    frames: np.ndarray,
    grid: np.ndarray,
    bands: Sequence[str],
    size: int = 320,
    *,
    coverage: Mapping[str, Any] | None = None,
    nodata: float = 0,
) -> bytes:
    """PNG: the input's median frame in true colour beside a PCA of the embedding grid,
    over a caption that states the coverage. Fill (pixels with no data in any frame,
    cells of chips that were not encoded) is hatched grey in both panels."""
    from PIL import Image, ImageDraw

    idx = [list(bands).index(b) for b in ("B4", "B3", "B2")]
    step = max(1, frames.shape[-1] // size)  # the median only at the pixels the PNG shows
    sample = frames[:, idx, ::step, ::step]
    median = _median_frame(sample)  # (3, h, w)
    has_data = np.asarray((sample != nodata).any(axis=(0, 1)))
    rgb = _stretch(np.moveaxis(median, 0, -1), valid=has_data)
    comps = pca3(grid)
    cells = np.isfinite(comps).all(axis=-1)
    pca = _stretch(np.nan_to_num(comps), valid=cells)
    caption = 34
    canvas = Image.new("RGB", (2 * size + 8, size + caption), (255, 255, 255))
    canvas.paste(_with_fill(rgb, has_data, size, True), (0, 0))
    canvas.paste(_with_fill(pca, cells, size, False), (size + 8, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (4, size + 4),
        "left: input median (true colour)   right: embedding PCA   hatched grey: no data",
        fill=(0, 0, 0),
    )
    draw.text((4, size + 19), coverage_caption(coverage), fill=(0, 0, 0))
    buf = io.BytesIO()
    # zlib's default level: a few percent larger than optimize=True, at a fraction of
    # its time.
    canvas.save(buf, format="PNG")
    return buf.getvalue()


# -- mosaics --------------------------------------------------------------------------------
def mosaic(grids: Sequence[xr.DataArray]) -> xr.DataArray:
    """Tile grids that share a CRS and cell size -> one grid over their union (NaN elsewhere)."""
    from rioxarray.merge import merge_arrays

    if not grids:
        raise InputContractError("no tile grids to mosaic")
    crs = {str(g.rio.crs) for g in grids}
    if len(crs) != 1:
        raise InputContractError(
            f"tile grids in several CRSs {sorted(crs)}; mosaic one zone at a time"
        )
    nodata = [g.rio.write_nodata(np.nan) for g in grids]
    merged = merge_arrays(list(nodata), nodata=np.nan)
    merged.name = "embedding"
    return merged
