"""Asset checks, judged per partition inside the step that writes the partition.

Every check is an ``AssetCheckSpec`` of its asset with the tile-year partitions,
declared on the asset itself (``check_specs``): the step (or the compute task that
wrote the partition) judges each committed version right after the write, and once
the step has yielded the partitions' materializations it records one evaluation per
partition, each naming the materialization it judged (:func:`targeting`). Dagster
counts a partition's check as passed or failed only when its evaluation targets the
partition's latest materialization (an evaluation without a target, or one recorded
before the materialization, leaves the partition "missing" on the check's Partitions
tab). No separate check step is started (no further process, no second read of the
model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np

from agrifm_pipeline.defs.keys import EMBEDDING, FRAMES, NORMALIZED
from agrifm_pipeline.defs.partitions import split_key, tile_year_partitions
from agrifm_pipeline.defs.resources import TileYearConfig
from agrifm_pipeline.storage import StorageError, ZarrStore
from agrifm_pipeline.tileyear import encoded_mask

# Variance floor below which a chip's embedding is considered collapsed.
MIN_CHIP_VARIANCE = 1e-8
# Share of channels allowed to be constant over a whole tile.
MAX_CONSTANT_CHANNEL_SHARE = 0.5


Verdict = tuple[bool, dict[str, Any]]
Judge = Callable[[Any, TileYearConfig], Verdict]


@dataclass(frozen=True)
class TileYearCheck:
    """One check of one asset: its name, what it says, how bad a failure is, its judge."""

    name: str
    asset: dg.AssetKey
    description: str
    judge: Judge
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR

    def spec(self) -> dg.AssetCheckSpec:
        return dg.AssetCheckSpec(
            self.name,
            asset=self.asset,
            description=self.description,
            partitions_def=tile_year_partitions,
        )


def _frame_shape(ds: Any, tile_year: TileYearConfig) -> Verdict:
    cfg = tile_year.resolve()
    side = cfg.chip_px * cfg.chips_per_side
    da = ds["frames"]
    want = (cfg.n_frames, 10, side, side)
    ok = tuple(da.shape) == want and da.dtype == np.uint16
    return ok, {"shape": list(da.shape), "dtype": str(da.dtype), "expected": list(want)}


def _clear_fraction(ds: Any, tile_year: TileYearConfig) -> Verdict:
    floor = tile_year.min_clear_fraction
    clear = ds["clear_fraction"].values
    mean = float(np.mean(clear))
    info: dict[str, Any] = {"mean_clear_fraction": round(mean, 4), "threshold": floor}
    # The fractions are stored as float32: a tile exactly at the threshold (0.7 is
    # 0.69999999 in float32) is judged at the threshold's own float32 value.
    passed = bool(mean >= float(np.float32(floor)))
    if not passed:
        info["why"] = (
            f"on average {mean:.1%} of the tile's pixels had a clear observation in a "
            f"frame's window (threshold {floor:.0%}); the rest is fill: no scene reaches "
            "it (a coast, a region's edge, outside the source's extent) or every "
            "observation there was masked (cloud, shadow, snow). Chips below "
            "min_chip_coverage are not encoded; see the chip table's valid_fraction."
        )
    return passed, info


def _normalized_finite(ds: Any, tile_year: TileYearConfig) -> Verdict:
    cfg = tile_year.resolve()
    n = cfg.chips_per_side**2
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


def _embedding_finite(ds: Any, tile_year: TileYearConfig) -> Verdict:
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


def _non_degenerate(ds: Any, tile_year: TileYearConfig) -> Verdict:
    per_side = tile_year.chips_per_side
    info = degeneracy(ds["embedding"].values, per_side, encoded_mask(ds.attrs, per_side * per_side))
    ok = info["chips"] == 0 or (  # nothing encoded (no data): nothing degenerate
        info["constant_channel_share"] <= MAX_CONSTANT_CHANNEL_SHARE
        and info["min_chip_variance"] > MIN_CHIP_VARIANCE
    )
    return ok, info


TILE_YEAR_CHECKS = (
    TileYearCheck(
        "frame_stack_shape_and_dtype",
        FRAMES,
        "(T, 10, H, W) uint16 on the tile grid, T = n_frames.",
        _frame_shape,
    ),
    TileYearCheck(
        "frame_stack_clear_fraction",
        FRAMES,
        "Mean clear fraction over the frames at least TileYearConfig.min_clear_fraction; "
        "below it, the metadata says why (fill where no scene reaches, or masked clouds).",
        _clear_fraction,
        dg.AssetCheckSeverity.WARN,
    ),
    TileYearCheck(
        "normalized_tensors_finite",
        NORMALIZED,
        "(chips, T, 10, S, S) per chip and frame, every value finite.",
        _normalized_finite,
    ),
    TileYearCheck(
        "embedding_finite",
        EMBEDDING,
        "Embedding grid float32, every encoded chip finite, the chips left out NaN.",
        _embedding_finite,
    ),
    TileYearCheck(
        "embedding_non_degenerate",
        EMBEDDING,
        "Not degenerate: few constant channels, every chip's variance above a floor.",
        _non_degenerate,
    ),
)


def check_specs(asset: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    """The asset's checks, to declare on the asset (``check_specs=``)."""
    return [c.spec() for c in TILE_YEAR_CHECKS if c.asset == asset]


def evaluate_partition(
    asset: dg.AssetKey, store: ZarrStore, key: str, tile_year: TileYearConfig
) -> list[dg.AssetCheckEvaluation]:
    """Every check of ``asset`` on one partition's committed version (re-hashed against
    its manifest first), one evaluation each, recorded against that partition."""
    checks = [c for c in TILE_YEAR_CHECKS if c.asset == asset]
    if not checks:
        return []
    tile, year = split_key(key)
    version = store.current(year, tile)
    ds, problem = None, None
    if version is None:
        problem = {"error": "partition missing from the store"}
    else:
        try:
            ds = store.open_version(version, verify=True)
        except StorageError as exc:
            problem = {"version": version.id, "error": str(exc)}
    out = []
    for c in checks:
        if ds is None:
            ok, info = False, dict(problem or {})
        else:
            try:
                ok, info = c.judge(ds, tile_year)
            except Exception as exc:  # a stored dataset the judge cannot read: a failed check
                ok, info = False, {"error": f"{type(exc).__name__}: {exc}"}
            info = {"version": version.id if version else "", **info}
        out.append(
            dg.AssetCheckEvaluation(
                asset_key=asset,
                check_name=c.name,
                passed=bool(ok),
                metadata={k: _meta(v) for k, v in info.items()},
                severity=c.severity,
                description=c.description,
                partition=str(key),
            )
        )
    return out


def targeting(
    instance: dg.DagsterInstance, run_id: str, evaluations: Iterable[dg.AssetCheckEvaluation]
) -> list[dg.AssetCheckEvaluation]:
    """Each evaluation pointed at the materialization it judged: its partition's latest,
    when this run made it. Call it after the step yielded the partitions' results (the
    materializations are recorded then). A partition materialized again since, by
    another run, keeps no target: its latest materialization was not judged, and the
    UI says so (the check is not current there)."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )
    from dagster_shared.record import replace

    targets: dict[tuple[dg.AssetKey, str | None], Any] = {}
    out = []
    for e in evaluations:
        where = (e.asset_key, e.partition)
        if where not in targets:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(
                    asset_key=e.asset_key,
                    asset_partitions=[e.partition] if e.partition is not None else None,
                ),
                limit=1,
            ).records
            mat = records[0] if records else None
            targets[where] = (
                AssetCheckEvaluationTargetMaterializationData(
                    storage_id=mat.storage_id, run_id=mat.run_id, timestamp=mat.timestamp
                )
                if mat is not None and mat.run_id == run_id
                else None
            )
        out.append(replace(e, target_materialization_data=targets[where]))
    return out


def _meta(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return dg.MetadataValue.json(value)
    if value is None:
        return dg.MetadataValue.null()
    return value
