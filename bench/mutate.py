"""Mutation probe: seed realistic bugs one at a time and see whether the tests catch them.

Each mutation names a file of the package, one snippet that occurs there exactly
once, its replacement, and the tests that should notice. The probe never touches
the working tree: it copies the repository (without ``.git``, ``.venv`` and
caches) into a temporary directory once, applies one mutation there, runs that
mutation's tests with this interpreter and ``PYTHONPATH`` set to the copy, puts
the file back, and goes on. A mutation whose tests fail is *caught* (the first
failing test is named); one whose tests pass *survived*; one whose snippet is no
longer in the file (the code moved on) is *stale* and must be updated here.

    .venv/bin/python bench/mutate.py                      # all, results to bench/results/mutation.json
    .venv/bin/python bench/mutate.py --only grid_chips_transposed ln_eps
    .venv/bin/python bench/mutate.py --list
    .venv/bin/python bench/mutate.py --check             # every snippet present exactly once

Before the mutations, the union of their test selections runs on the unmutated
copy and must pass (``--no-baseline`` skips that).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "mutation.json"
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".agrifm", ".dagster_home", ".storage", "build", "results",
)  # fmt: skip

G = "agrifm_pipeline_tests/test_mutation_guards.py"
GC = "agrifm_pipeline_tests/test_check_guards.py"


def g(*names: str) -> tuple[str, ...]:
    return tuple(f"{G}::{n}" for n in names)


def gc(*names: str) -> tuple[str, ...]:
    return tuple(f"{GC}::{n}" for n in names)


@dataclass(frozen=True)
class Mutation:
    id: str
    kind: str  # what sort of bug, in the words where it lists it
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]


TY_SETTINGS = "agrifm_pipeline/tileyear/settings.py"
TY_NORM = "agrifm_pipeline/tileyear/normalise.py"
TY_EMBED = "agrifm_pipeline/tileyear/embed.py"
TY_PRODUCTS = "agrifm_pipeline/tileyear/products.py"
PRE = "agrifm_pipeline/preprocess.py"
COMP = "agrifm_pipeline/providers/compositing.py"
MODEL = "agrifm_pipeline/model/agrifm.py"
CONFIG = "agrifm_pipeline/model/config.py"
CHECKS = "agrifm_pipeline/defs/checks.py"

T_MODEL_REF = (
    "agrifm_pipeline_tests/test_model.py::test_tiny_reference_cases",
    *g("test_tiny_reference_outputs_to_1e5", "test_stage_maps_to_1e5_on_an_odd_frame_count"),
)
T_GRID = g(
    "test_embedding_grid_puts_chip_i_at_row_i_div_n_and_column_i_mod_n",
    "test_embedding_grid_cells_lie_inside_their_chips_footprint",
    "test_chip_table_footprints_are_the_tiles_chips_from_the_top_left",
)
T_CHIPS = (
    "agrifm_pipeline_tests/test_preprocess.py::test_a_tiles_chip_block_is_read_through_its_strides",
    *g("test_tile_chips_and_coverage_read_chips_row_major_from_the_top_left"),
)
T_NORM = (
    "agrifm_pipeline_tests/test_preprocess.py::test_agrifm_stats_by_hand",
    "agrifm_pipeline_tests/test_preprocess.py::test_unit_scale_and_none",
    *g(
        "test_band_statistics_are_the_published_ones",
        "test_agrifm_stats_on_every_band_and_every_path",
        "test_unit_scale_on_every_path_is_dn_over_ten_thousand_clipped",
    ),
)
T_RESIZE = (
    "agrifm_pipeline_tests/test_preprocess.py",
    *g(
        "test_downsampling_by_two_is_the_two_by_two_mean",
        "test_downsampling_by_four_reads_only_the_middle_pixels",
    ),
)
T_FP = (
    "agrifm_pipeline_tests/test_staleness.py::test_fingerprints_depend_on_exactly_their_settings",
    *g(
        "test_each_setting_changes_exactly_its_stages",
        "test_a_stage_code_version_bump_changes_that_stage_and_below",
        "test_precision_checkpoint_and_provider_move_only_their_stages",
    ),
)
T_COMP = (
    "agrifm_pipeline_tests/test_compositing.py",
    *g("test_no_data_is_never_an_observation", "test_backfill_composite_uses_only_scenes_that_pass_the_filter"),
)  # fmt: skip
T_LOCAL = (
    *g("test_scl_no_data_is_masked_by_local_and_earth_engine_alike"),
    "agrifm_pipeline_tests/test_provider_local.py::test_local_composites_equal_independent_medians",
    "agrifm_pipeline_tests/test_provider_local.py::test_cloud_mask_changes_the_composite_where_scl_flags_clouds",
)
T_GEE_MASK = (
    "agrifm_pipeline_tests/test_provider_gee.py::test_mosaic_and_unmasked_settings_equal_local",
    "agrifm_pipeline_tests/test_provider_gee.py::test_2019_t8_equals_local_with_a_duplicated_granule",
    *g("test_scl_no_data_is_masked_by_local_and_earth_engine_alike"),
)
T_SPACE = ("agrifm_pipeline_tests/test_space_time.py",)
T_STORE = (
    "agrifm_pipeline_tests/test_storage.py::test_versions_are_immutable_and_readers_keep_theirs[local]",
    "agrifm_pipeline_tests/test_storage.py::test_manifest_hashes_every_object[local]",
    "agrifm_pipeline_tests/test_storage.py::test_corruption_is_found_and_named[local-flip]",
    "agrifm_pipeline_tests/test_storage.py::test_missing_object_is_named[local]",
    *g(
        "test_pointer_history_keeps_the_most_recent_versions",
        "test_a_version_rewritten_with_a_matching_manifest_is_refused",
    ),
)
T_CKPT = (
    "agrifm_pipeline_tests/test_checkpoint.py::test_sha256_is_kept_beside_the_file_and_refreshed",
    *g("test_hash_cache_sees_a_same_size_replacement"),
)

MUTATIONS: list[Mutation] = [
    # -- the 22 kinds that survived the whole suite in the probe ---------------------
    Mutation(
        "grid_chips_transposed",
        "chips placed transposed in the tile grid",
        TY_EMBED,
        "grid = f.reshape(per, per, d, h, w).transpose(2, 0, 3, 1, 4)",
        "grid = f.reshape(per, per, d, h, w).transpose(2, 1, 3, 0, 4)",
        T_GRID,
    ),
    Mutation(
        "chip_table_wrong_corner",
        "chip-table footprints counted from the wrong corner",
        TY_PRODUCTS,
        "minx, maxy = x0 + cols * side, y1 - rows * side",
        "minx, maxy = x0 + cols * side, tile.bounds[1] + (rows + 1) * side",
        T_GRID,
    ),
    Mutation(
        "swir_std_swapped",
        "a swapped std between two SWIR bands (B11, B12)",
        CONFIG,
        "    1808.30013156,\n    1694.20220774,\n)",
        "    1694.20220774,\n    1808.30013156,\n)",
        T_NORM,
    ),
    Mutation(
        "hash_cache_same_size",
        "checkpoint hash cache trusting a same-size replacement",
        "agrifm_pipeline/checkpoint.py",
        'if cached.get("size") == st.st_size and cached.get("mtime_ns") == st.st_mtime_ns:',
        'if cached.get("size") == st.st_size:',
        T_CKPT,
    ),
    Mutation(
        "inplace_unit_scale",
        "wrong scale in the in-place normalisation path (unit_scale)",
        PRE,
        "t.div_(RAW_MAX).clamp_(0.0, 1.0)",
        "t.div_(65535.0).clamp_(0.0, 1.0)",
        T_NORM,
    ),
    Mutation(
        "inplace_stats_scale",
        "wrong scale in the in-place normalisation path (agrifm_stats)",
        PRE,
        "t.sub_(_MEAN.view(-1, 1, 1)).div_(_STD.view(-1, 1, 1))",
        "t.sub_(_MEAN.view(-1, 1, 1)).div_(_STD.mean())",
        T_NORM,
    ),
    Mutation(
        "fp_no_code_version",
        "fingerprints ignoring code_version",
        "agrifm_pipeline/lineage.py",
        'acq_in = {**acquisition, "code_version": CODE_VERSIONS["acquisition"]}',
        "acq_in = {**acquisition}",
        T_FP,
    ),
    Mutation(
        "fp_no_norm_code_version",
        "fingerprints ignoring code_version (normalisation)",
        "agrifm_pipeline/lineage.py",
        '"code_version": CODE_VERSIONS["normalisation"],',
        "",
        T_FP,
    ),
    Mutation(
        "fp_no_image_size",
        "fingerprints ignoring image_size",
        TY_SETTINGS,
        '"image_size": self.image_size,\n                "chip_px"',
        '"chip_px"',
        T_FP,
    ),
    Mutation(
        "fp_no_cloudy_pct",
        "fingerprints ignoring cloudy_pct",
        TY_SETTINGS,
        '"cloudy_pct": self.cloudy_pct,\n',
        "",
        T_FP,
    ),
    Mutation(
        "nodata_only_with_scl_mask",
        'no-data masking broken with cloud_mask="none"',
        COMP,
        '        ok &= scl != 0\n        if cloud_mask.mode == "scl":\n',
        '        if cloud_mask.mode == "scl":\n            ok &= scl != 0\n',
        (*T_COMP, *T_LOCAL),
    ),
    Mutation(
        "nodata_from_class_list",
        "no-data masking broken with custom SCL classes",
        COMP,
        "        ok &= scl != 0\n",
        "",
        (*T_COMP, *T_LOCAL),
    ),
    Mutation(
        "nodata_any_band",
        "no-data masking: a pixel one band lacks counted as observed",
        COMP,
        "ok = np.all(data != 0, axis=0)",
        "ok = np.any(data != 0, axis=0)",
        (*T_COMP, *T_LOCAL),
    ),
    Mutation(
        "antialias_downsampling",
        "antialias on downsampling",
        PRE,
        "antialias=False,",
        "antialias=True,",
        T_RESIZE,
    ),
    Mutation(
        "backfill_ignores_scene_filter",
        "back-fill ignoring the scene filter",
        COMP,
        "in_range = [s for s in passing if",
        "in_range = [s for s in scenes if",
        T_COMP,
    ),
    Mutation(
        "merge_odd_frame_repeated",
        "the odd-frame merge quirk (last frame repeated, not zero)",
        MODEL,
        "x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, 1))",
        "x = torch.cat([x, x[:, -1:]], dim=1)",
        T_MODEL_REF,
    ),
    Mutation(
        "ln_eps",
        "the LayerNorm eps (1e-6 for 1e-5)",
        CONFIG,
        "layer_norm_eps: float = 1e-5",
        "layer_norm_eps: float = 1e-6",
        T_MODEL_REF,
    ),
    # -- frame windows ---------------------------------------------------------------------
    Mutation(
        "windows_round_not_floor",
        "frame windows: rounded instead of floored boundaries",
        "agrifm_pipeline/frames.py",
        "days=(total * i) // n_frames)",
        "days=round(total * i / n_frames))",
        T_SPACE,
    ),
    Mutation(
        "windows_end_inclusive",
        "frame windows: end inclusive",
        "agrifm_pipeline/frames.py",
        "return self.start <= day < self.end",
        "return self.start <= day <= self.end",
        (*T_SPACE, *T_COMP),
    ),
    # -- resize and square pad --------------------------------------------------------------
    Mutation(
        "resize_align_corners",
        "resize: align_corners=True",
        PRE,
        "align_corners=False,\n            antialias",
        "align_corners=True,\n            antialias",
        T_RESIZE,
    ),
    Mutation(
        "square_pad_odd_pixel_first",
        "square pad: odd pixel top/left",
        PRE,
        "before, after = total // 2, total - total // 2",
        "after, before = total // 2, total - total // 2",
        T_RESIZE,
    ),
    Mutation(
        "square_pad_reflect_limit",
        "square pad: reflect while pad <= side",
        PRE,
        'mode = "reflect" if total < side else "replicate"',
        'mode = "reflect" if total <= side else "replicate"',
        T_RESIZE,
    ),
    # -- compositing --------------------------------------------------------------------------
    Mutation(
        "median_rounds_down",
        "compositing: even median rounded down",
        COMP,
        "return ((a + b + 1) // 2).astype(np.uint16)",
        "return ((a + b) // 2).astype(np.uint16)",
        (*T_COMP, *T_LOCAL),
    ),
    Mutation(
        "mosaic_oldest_on_top",
        "compositing: mosaic takes the oldest clear scene",
        COMP,
        "key=lambda s: s[0], reverse=True)",
        "key=lambda s: s[0], reverse=False)",
        T_COMP,
    ),
    Mutation(
        "cloudy_filter_exclusive",
        "compositing: cloudy filter exclusive",
        COMP,
        "scene.cloudy_pct <= cloudy_pct",
        "scene.cloudy_pct < cloudy_pct",
        T_COMP,
    ),
    Mutation(
        "backfill_later_on_ties",
        "compositing: back-fill takes the later window on ties",
        COMP,
        "key=lambda j: (abs(j - i), j))",
        "key=lambda j: (abs(j - i), -j))",
        T_COMP,
    ),
    Mutation(
        "sorting_network_short",
        "compositing: sorting network one pass short",
        COMP,
        "for p in range(n):",
        "for p in range(n - 1):",
        (*T_COMP, *T_LOCAL),
    ),
    # -- encoder structure -------------------------------------------------------------------
    Mutation(
        "merge_phase_order",
        "encoder: 2x2 merge phases concatenated in another order",
        MODEL,
        "[x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]]",
        "[x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]]",
        T_MODEL_REF,
    ),
    Mutation(
        "shift_when_equal_to_window",
        "encoder: shifted although the axis equals the window",
        MODEL,
        "sft = tuple(0 if s <= w else h for",
        "sft = tuple(0 if s < w else h for",
        T_MODEL_REF,
    ),
    Mutation(
        "roll_direction",
        "encoder: cyclic shift in the wrong direction",
        MODEL,
        "y = torch.roll(y, shifts=tuple(-s for s in shift), dims=(1, 2, 3))",
        "y = torch.roll(y, shifts=tuple(shift), dims=(1, 2, 3))",
        T_MODEL_REF,
    ),
    Mutation(
        "gelu_tanh",
        "encoder: tanh-approximate GELU on the inference path",
        MODEL,
        "torch.ops.aten.gelu_(h)",
        'torch.ops.aten.gelu_(h, approximate="tanh")',
        T_MODEL_REF,
    ),
    Mutation(
        "mlp_wrong_norm",
        "encoder: MLP fed through norm1",
        MODEL,
        "return self.mlp(self.norm2(x)).add_(x)",
        "return self.mlp(self.norm1(x)).add_(x)",
        T_MODEL_REF,
    ),
    Mutation(
        "no_final_norm",
        "encoder: final LayerNorm skipped",
        MODEL,
        "return fold_time(self.norm(x)), features",
        "return fold_time(x), features",
        T_MODEL_REF,
    ),
    # -- tiles and UTM zones -------------------------------------------------------------------
    Mutation(
        "tile_col_row_swapped",
        "tiles: column and row swapped in the bounds",
        "agrifm_pipeline/tiles.py",
        "x0, y0 = self.col * self.size_m, self.row * self.size_m",
        "x0, y0 = self.row * self.size_m, self.col * self.size_m",
        (*T_SPACE, *T_GRID),
    ),
    Mutation(
        "chip_geoboxes_column_major",
        "tiles: chips listed column-major",
        "agrifm_pipeline/tiles.py",
        "for r in range(0, ny, chip_px)\n            for c in range(0, nx, chip_px)",
        "for c in range(0, nx, chip_px)\n            for r in range(0, ny, chip_px)",
        (*T_SPACE, *T_GRID),
    ),
    Mutation(
        "utm_zone_off_by_one",
        "UTM zone off by one",
        "agrifm_pipeline/regions.py",
        "zone = min(int((lon + 180.0) // 6.0) + 1, 60)",
        "zone = min(int((lon + 180.0) // 6.0), 60)",
        T_SPACE,
    ),
    Mutation(
        "utm_hemisphere_swapped",
        "UTM hemisphere (326xx/327xx) swapped",
        "agrifm_pipeline/regions.py",
        "return (32600 if lat >= 0 else 32700) + zone",
        "return (32700 if lat >= 0 else 32600) + zone",
        T_SPACE,
    ),
    Mutation(
        "cover_misses_last_row",
        "tiles of a region: last row of cells left out",
        "agrifm_pipeline/regions.py",
        "r0, r1 = max(0, math.floor(y0 / size)), math.floor(y1 / size)\n",
        "r0, r1 = max(0, math.floor(y0 / size)), math.floor(y1 / size) - 1\n",
        T_SPACE,
    ),
    # -- storage commit -------------------------------------------------------------------------
    Mutation(
        "pointer_without_manifest_hash",
        "storage: the pointer does not bind the manifest",
        "agrifm_pipeline/storage/versions.py",
        '"manifest_sha256": hashlib.sha256(raw).hexdigest(),',
        '"manifest_sha256": "",',
        T_STORE,
    ),
    Mutation(
        "objects_not_verified",
        "storage: objects read without checking their sha256",
        "agrifm_pipeline/storage/versions.py",
        'if verify and hashlib.sha256(data).hexdigest() != meta["sha256"]:',
        'if False and hashlib.sha256(data).hexdigest() != meta["sha256"]:',
        T_STORE,
    ),
    Mutation(
        "history_keeps_oldest",
        "storage: pointer history keeps the oldest versions",
        "agrifm_pipeline/storage/versions.py",
        '"history": history[-HISTORY_LEN:],',
        '"history": history[:HISTORY_LEN],',
        T_STORE,
    ),
    # -- grid coordinates, chips and coverage -----------------------------------------------------
    Mutation(
        "grid_y_corner_not_centre",
        "grid coordinates: y at the cell's corner",
        TY_EMBED,
        '"y": y1 - cell * (np.arange(per * h) + 0.5),',
        '"y": y1 - cell * np.arange(per * h),',
        T_GRID,
    ),
    Mutation(
        "grid_cell_from_tile",
        "grid coordinates: cell size from the tile's side",
        TY_EMBED,
        "cell = cfg.chip_px * cfg.scale_m / h",
        "cell = cfg.tile_size_m / h",
        T_GRID,
    ),
    Mutation(
        "tile_chips_transposed",
        "chips read transposed from the tile",
        TY_NORM,
        ".transpose(2, 4, 0, 1, 3, 5)",
        ".transpose(4, 2, 0, 1, 3, 5)",
        T_CHIPS,
    ),
    Mutation(
        "cell_coverage_transposed",
        "per-cell coverage placed transposed",
        TY_EMBED,
        "cells.reshape(per, per, h, h).transpose(0, 2, 1, 3)",
        "cells.reshape(per, per, h, h).transpose(1, 2, 0, 3)",
        T_CHIPS,
    ),
]


#: Considered and left out because no test can tell them apart from the original.
EQUIVALENT = {
    "gee_nodata_class_list": (
        "Earth Engine: SCL 0 left out of the remapped classes (providers/gee.py). Equivalent: "
        "0 is no data in every S2_SR band, SCL included, so the SCL image is already masked "
        "there and updateMask drops the pixel anyway (the stand-in models this, "
        "ee_standin.py: '0 is no data in every S2 band'); "
        "test_scl_no_data_is_masked_by_local_and_earth_engine_alike pins the behaviour."
    ),
}

# -- asset checks: toothless judges (the checks live in defs/checks.py) --------------------------
T_CHECKS = (f"{GC}::test_check_fails_on_bad_data_and_names_the_partition",
            f"{GC}::test_a_missing_and_a_corrupt_partition_fail_every_check")  # fmt: skip
CHECK_MUTATIONS: list[Mutation] = [
    Mutation(
        "check_frames_dtype_ignored",
        "asset check made toothless: frame dtype ignored",
        CHECKS,
        "ok = tuple(da.shape) == want and da.dtype == np.uint16",
        "ok = tuple(da.shape) == want",
        T_CHECKS,
    ),
    Mutation(
        "check_frames_shape_ignored",
        "asset check made toothless: frame shape ignored",
        CHECKS,
        "ok = tuple(da.shape) == want and da.dtype == np.uint16",
        "ok = da.dtype == np.uint16",
        T_CHECKS,
    ),
    Mutation(
        "check_clear_fraction_always",
        "asset check made toothless: clear fraction",
        CHECKS,
        "passed = bool(mean >= float(np.float32(floor)))",
        "passed = True",
        T_CHECKS,
    ),
    Mutation(
        "check_normalized_nonfinite_ignored",
        "asset check made toothless: non-finite tensors",
        CHECKS,
        "ok = ok and nonfinite == 0",
        "ok = ok",
        T_CHECKS,
    ),
    Mutation(
        "check_normalized_shape_ignored",
        "asset check made toothless: tensor shape",
        CHECKS,
        "ok = tuple(shape) == want\n",
        "ok = True\n",
        T_CHECKS,
    ),
    Mutation(
        "check_embedding_nan_ignored",
        "asset check made toothless: NaN in an encoded chip",
        CHECKS,
        "return finite and gaps and x.dtype == np.float32, {",
        "return gaps and x.dtype == np.float32, {",
        T_CHECKS,
    ),
    Mutation(
        "check_embedding_gaps_ignored",
        "asset check made toothless: not-encoded chips not NaN",
        CHECKS,
        "return finite and gaps and x.dtype == np.float32, {",
        "return finite and x.dtype == np.float32, {",
        T_CHECKS,
    ),
    Mutation(
        "check_degenerate_chip_ignored",
        "asset check made toothless: a collapsed chip",
        CHECKS,
        'and info["min_chip_variance"] > MIN_CHIP_VARIANCE',
        'or info["min_chip_variance"] > MIN_CHIP_VARIANCE',
        T_CHECKS,
    ),
    Mutation(
        "check_degenerate_channels_ignored",
        "asset check made toothless: constant channels",
        CHECKS,
        "constant = float(np.mean(flat.std(axis=1) == 0.0))",
        "constant = 0.0",
        T_CHECKS,
    ),
    Mutation(
        "check_result_always_passes",
        "asset check made toothless: the result ignores failures",
        CHECKS,
        "passed=bool(ok),",
        "passed=True,",
        T_CHECKS,
    ),
    Mutation(
        "check_missing_partition_passes",
        "asset check made toothless: a missing partition",
        CHECKS,
        "ok, info = False, dict(problem or {})",
        "ok, info = True, dict(problem or {})",
        T_CHECKS,
    ),
    Mutation(
        "check_partition_unlabelled",
        "check results not attributed to their partition",
        CHECKS,
        "partition=str(key),",
        "partition=None,",
        (*T_CHECKS, f"{GC}::test_a_run_records_each_checks_result_against_its_partition"),
    ),
    Mutation(
        "check_reads_unverified",
        "asset check judges a version without verifying it",
        CHECKS,
        "ds = store.open_version(version, verify=True)",
        "ds = store.open_version(version, verify=False)",
        T_CHECKS,
    ),
]


def all_mutations() -> list[Mutation]:
    return [*MUTATIONS, *CHECK_MUTATIONS]


# -- running ------------------------------------------------------------------------------------


def copy_repo(dest: Path) -> Path:
    root = dest / "repo"
    shutil.copytree(REPO, root, ignore=IGNORE, symlinks=True)
    return root


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_isolated(root: Path) -> None:
    """The copy, not the working tree, is what the tests import."""
    out = subprocess.run(
        [sys.executable, "-c", "import agrifm_pipeline, agrifm_pipeline_tests; "
         "print(agrifm_pipeline.__file__); print(agrifm_pipeline_tests.__file__)"],
        cwd=root, env=_env(root), capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for path in out:
        if not Path(path).resolve().is_relative_to(root.resolve()):
            raise SystemExit(f"the copy does not shadow the working tree: {path} is imported")


FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)


def run_tests(root: Path, tests: tuple[str, ...], timeout_s: int) -> dict[str, object]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
           "-W", "ignore", "--timeout", str(timeout_s), *tests]  # fmt: skip
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=timeout_s + 60
        )
    except subprocess.TimeoutExpired:
        return {"rc": None, "seconds": round(time.monotonic() - start, 1), "failed": [], "tail": ""}
    out = proc.stdout + proc.stderr
    return {
        "rc": proc.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "failed": [m.group(2) for m in FAILED.finditer(out)],
        "tail": "\n".join(out.strip().splitlines()[-6:]),
    }


def verdict(result: dict[str, object]) -> str:
    rc = result["rc"]
    if rc is None:
        return "timeout"
    if rc == 0:
        return "survived"
    if rc == 1 and result["failed"]:
        return "caught"
    return "caught (error)" if result["failed"] else f"error rc={rc}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these mutations only")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument(
        "--check", action="store_true", help="check every snippet occurs once, run nothing"
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per test run")
    ap.add_argument(
        "--json", type=Path, default=OUT, help=f"results file (default {OUT.relative_to(REPO)})"
    )
    args = ap.parse_args(argv)

    muts = all_mutations()
    ids = [m.id for m in muts]
    if len(set(ids)) != len(ids):
        raise SystemExit("mutation ids are not unique")
    if args.only:
        unknown = sorted(set(args.only) - set(ids))
        if unknown:
            raise SystemExit(f"unknown mutation ids {unknown}; see --list")
        muts = [m for m in muts if m.id in args.only]
    if args.list:
        for m in muts:
            print(f"{m.id:34s} {m.file:36s} {m.kind}")
        return 0
    stale = [m.id for m in muts if (REPO / m.file).read_text().count(m.original) != 1]
    if args.check:
        print("stale (snippet not found exactly once):", stale or "none")
        return 1 if stale else 0

    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="agrifm-mutate-") as tmp:
        root = copy_repo(Path(tmp))
        check_isolated(root)
        baseline: dict[str, object] | None = None
        if not args.no_baseline:
            union = tuple(dict.fromkeys(t for m in muts if m.id not in stale for t in m.tests))
            print(f"baseline: {len(union)} selections on the unmutated copy ...", flush=True)
            baseline = run_tests(root, union, args.timeout)
            print(f"  rc={baseline['rc']} in {baseline['seconds']} s", flush=True)
            if baseline["rc"] != 0:
                print(baseline["tail"])
                raise SystemExit("the unmutated copy fails its tests; fix that first")
        for m in muts:
            path = root / m.file
            text = path.read_text()
            if m.id in stale:
                row = {**asdict(m), "status": "stale", "caught_by": None, "seconds": 0}
            else:
                path.write_text(text.replace(m.original, m.replacement))
                try:
                    res = run_tests(root, m.tests, args.timeout)
                finally:
                    path.write_text(text)
                status = verdict(res)
                row = {**asdict(m), "status": status,
                       "caught_by": res["failed"][0] if res["failed"] else None,
                       "seconds": res["seconds"]}  # fmt: skip
                if status not in ("caught",):
                    row["tail"] = res["tail"]
            rows.append(row)
            print(f"{m.id:34s} {row['status']:10s} {row['caught_by'] or ''}", flush=True)

    summary = {
        s: sum(r["status"] == s for r in rows) for s in sorted({str(r["status"]) for r in rows})
    }
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "agrifm_pipeline", "agrifm_pipeline_tests"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()  # fmt: skip
    doc = {
        "command": " ".join(["bench/mutate.py", *(argv if argv is not None else sys.argv[1:])]),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_head": head,
        "working_tree_changes": dirty.splitlines(),
        "python": platform.python_version(),
        "host": platform.node(),
        "summary": summary,
        "baseline": baseline and {k: baseline[k] for k in ("rc", "seconds")},
        "mutations": rows,
        "equivalent_mutants_left_out": EQUIVALENT,
    }
    if args.only and args.json.exists():
        # A partial run updates its rows in the results of the last full run.
        previous = json.loads(args.json.read_text())
        fresh = {r["id"]: r for r in rows}
        order = [m.id for m in all_mutations()]
        kept = {r["id"]: r for r in previous["mutations"] if r["id"] in order}
        merged = sorted({**kept, **fresh}.values(), key=lambda r: order.index(str(r["id"])))
        doc["mutations"] = merged
        doc["summary"] = {
            s: sum(r["status"] == s for r in merged)
            for s in sorted({str(r["status"]) for r in merged})
        }
        doc["updated_by"] = doc.pop("command")
        doc["command"] = previous.get("command")
    if not args.only or args.json.exists():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    print(json.dumps(summary))
    return 0 if all(r["status"].startswith("caught") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
