"""Asset checks, evaluated for every partition of the run and reported per partition.

A check passes when every partition in the run passes; its metadata lists
each partition's value, so a failing tile-year is named.
"""

from collections.abc import Callable
from typing import Any

import dagster as dg
import numpy as np

from agrifm_pipeline.defs.assets import EMBEDDING, NORMALIZED, s2_frame_stack
from agrifm_pipeline.defs.partitions import split_key, tile_year_partitions
from agrifm_pipeline.defs.resources import TileYearConfig, ZarrStorage
from agrifm_pipeline.storage import StorageError, ZarrStore
from agrifm_pipeline.tileyear import encoded_mask

# Variance floor below which a chip's embedding is considered collapsed.
MIN_CHIP_VARIANCE = 1e-8
# Share of channels allowed to be constant over a whole tile.
MAX_CONSTANT_CHANNEL_SHARE = 0.5


Verdict = tuple[bool, dict[str, Any]]


def _evaluate(
    context: dg.AssetCheckExecutionContext,
    store: ZarrStore,
    judge: Callable[[Any, str, int], Verdict],
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
) -> dg.AssetCheckResult:
    per: dict[str, Any] = {}
    failed: list[str] = []
    for key in context.partition_keys if _has_keys(context) else []:
        tile, year = split_key(key)
        version = store.current(year, tile)
        if version is None:
            ok, info = False, {"error": "partition missing from the store"}
        else:
            # The committed version, re-hashed against its manifest before it is judged.
            try:
                ds = store.open_version(version, verify=True)
            except StorageError as exc:
                ok, info = False, {"version": version.id, "error": str(exc)}
            else:
                ok, info = judge(ds, tile, year)
                info = {"version": version.id, **info}
        per[str(key)] = {"passed": ok, **info}
        if not ok:
            failed.append(str(key))
    return dg.AssetCheckResult(
        passed=not failed,
        severity=severity,
        metadata={
            "partitions_checked": len(per),
            "failed_partitions": ", ".join(failed) or "none",
            "per_partition": dg.MetadataValue.json(per),
        },
    )


def _has_keys(context: dg.AssetCheckExecutionContext) -> bool:
    try:
        return bool(context.partition_keys)
    except Exception:  # an unpartitioned run
        return False


@dg.asset_check(
    asset=s2_frame_stack,
    partitions_def=tile_year_partitions,
    description="(T, 10, H, W) uint16 on the tile grid, T = n_frames.",
)
def frame_stack_shape_and_dtype(
    context: dg.AssetCheckExecutionContext, tile_year: TileYearConfig, storage: ZarrStorage
) -> dg.AssetCheckResult:
    cfg = tile_year.resolve()
    side = cfg.chip_px * cfg.chips_per_side

    def judge(ds: Any, tile: str, year: int) -> Verdict:
        da = ds["frames"]
        want = (cfg.n_frames, 10, side, side)
        ok = tuple(da.shape) == want and da.dtype == np.uint16
        return ok, {"shape": list(da.shape), "dtype": str(da.dtype), "expected": list(want)}

    return _evaluate(context, storage.store("s2_frame_stack"), judge)


@dg.asset_check(
    asset=s2_frame_stack,
    partitions_def=tile_year_partitions,
    description=(
        "Mean clear fraction over the frames at least TileYearConfig.min_clear_fraction; "
        "below it, the metadata says why (fill where no scene reaches, or masked clouds)."
    ),
)
def frame_stack_clear_fraction(
    context: dg.AssetCheckExecutionContext, tile_year: TileYearConfig, storage: ZarrStorage
) -> dg.AssetCheckResult:
    floor = tile_year.min_clear_fraction

    def judge(ds: Any, tile: str, year: int) -> Verdict:
        clear = ds["clear_fraction"].values
        mean = float(np.mean(clear))
        info: dict[str, Any] = {"mean_clear_fraction": round(mean, 4), "threshold": floor}
        if mean < floor:
            info["why"] = (
                f"on average {mean:.1%} of the tile's pixels had a clear observation in a "
                f"frame's window (threshold {floor:.0%}); the rest is fill: no scene reaches "
                "it (a coast, a region's edge, outside the source's extent) or every "
                "observation there was masked (cloud, shadow, snow). Chips below "
                "min_chip_coverage are not encoded; see the chip table's valid_fraction."
            )
        return mean >= floor, info

    return _evaluate(
        context, storage.store("s2_frame_stack"), judge, severity=dg.AssetCheckSeverity.WARN
    )


@dg.asset_check(
    asset=NORMALIZED,
    partitions_def=tile_year_partitions,
    description="(chips, T, 10, S, S) per chip and frame, every value finite.",
)
def normalized_tensors_finite(
    context: dg.AssetCheckExecutionContext, tile_year: TileYearConfig, storage: ZarrStorage
) -> dg.AssetCheckResult:
    cfg = tile_year.resolve()
    n = cfg.chips_per_side**2

    def judge(ds: Any, tile: str, year: int) -> Verdict:
        # Shape from the per-chip statistics (and the tensors' metadata when they were
        # kept); finiteness from the summary the asset computed on the very tensor it
        # made (256 MB need not be read again).
        stats = ds["chip_stats"]
        want = (n, cfg.n_frames, 10, cfg.image_size, cfg.image_size)
        shape = (*stats.shape[:3], cfg.image_size, cfg.image_size)
        ok = tuple(shape) == want
        if "tensors" in ds:
            x = ds["tensors"]
            shape = tuple(x.shape)
            ok = shape == want and x.dtype == np.float32
        nonfinite = int(ds.attrs.get("n_nonfinite", -1))
        ok = ok and nonfinite == 0
        return ok, {
            "shape": list(shape),
            "expected": list(want),
            "nonfinite_values": nonfinite,
            "tensors_kept": "tensors" in ds,
        }

    return _evaluate(context, storage.store("normalized_tensors"), judge)


@dg.asset_check(
    asset=EMBEDDING,
    partitions_def=tile_year_partitions,
    description="Embedding grid finite and float32.",
)
def embedding_finite(
    context: dg.AssetCheckExecutionContext, tile_year: TileYearConfig, storage: ZarrStorage
) -> dg.AssetCheckResult:
    def judge(ds: Any, tile: str, year: int) -> Verdict:
        # The chips left out for coverage are NaN by design; every encoded one is finite.
        x = ds["embedding"].values
        per = tile_year.chips_per_side
        encoded = encoded_mask(ds.attrs, per * per)
        d, h, w = x.shape
        chips = x.reshape(d, per, h // per, per, w // per).transpose(1, 3, 0, 2, 4)
        chips = chips.reshape(per * per, -1)
        finite = bool(np.isfinite(chips[encoded]).all())
        gaps = bool(np.isnan(chips[~encoded]).all())
        return finite and gaps and x.dtype == np.float32, {
            "finite": finite,
            "chips_encoded": int(encoded.sum()),
            "chips_not_encoded_are_nan": gaps,
            "dtype": str(x.dtype),
        }

    return _evaluate(context, storage.store("agrifm_embedding_grid"), judge)


def degeneracy(
    grid: np.ndarray, chips_per_side: int, encoded: np.ndarray | None = None
) -> dict[str, Any]:
    """Constant channels over the tile, and the least per-chip variance, over the chips
    that were encoded (all by default)."""
    d, h, w = grid.shape
    n = chips_per_side**2
    encoded = np.ones(n, dtype=bool) if encoded is None else np.asarray(encoded, dtype=bool)
    ch, cw = h // chips_per_side, w // chips_per_side
    chips = grid.reshape(d, chips_per_side, ch, chips_per_side, cw).transpose(1, 3, 0, 2, 4)
    chips = chips[encoded.reshape(chips_per_side, chips_per_side)]  # (k, d, ch, cw)
    if not len(chips):
        return {"constant_channel_share": 0.0, "min_chip_variance": None, "chips": 0}
    flat = chips.transpose(1, 0, 2, 3).reshape(d, -1)
    constant = float(np.mean(flat.std(axis=1) == 0.0))
    chip_var = chips.reshape(len(chips), -1).var(axis=1)
    return {
        "constant_channel_share": round(constant, 4),
        "min_chip_variance": float(chip_var.min()),
        "chips": len(chips),
    }


@dg.asset_check(
    asset=EMBEDDING,
    partitions_def=tile_year_partitions,
    description="Not degenerate: few constant channels, every chip's variance above a floor.",
)
def embedding_non_degenerate(
    context: dg.AssetCheckExecutionContext, tile_year: TileYearConfig, storage: ZarrStorage
) -> dg.AssetCheckResult:
    per_side = tile_year.chips_per_side

    def judge(ds: Any, tile: str, year: int) -> Verdict:
        info = degeneracy(
            ds["embedding"].values, per_side, encoded_mask(ds.attrs, per_side * per_side)
        )
        ok = info["chips"] == 0 or (  # nothing encoded (no data): nothing degenerate
            info["constant_channel_share"] <= MAX_CONSTANT_CHANNEL_SHARE
            and info["min_chip_variance"] > MIN_CHIP_VARIANCE
        )
        return ok, info

    return _evaluate(context, storage.store("agrifm_embedding_grid"), judge)


all_checks = [
    frame_stack_shape_and_dtype,
    frame_stack_clear_fraction,
    normalized_tensors_finite,
    embedding_finite,
    embedding_non_degenerate,
]
