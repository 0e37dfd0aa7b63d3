"""Every asset check fails on bad data, and its result names the partition it judged.

The pipeline tests only ever show the checks passing. Here each check judges two
tile-years written straight into a fresh store, through the function the asset
steps call (:func:`agrifm_pipeline.defs.checks.evaluate_partition`): one good,
one bad in exactly the way the check is there to catch. The bad one must fail,
the good one pass, and each evaluation must carry its own partition key. A
partition missing from the store, or one whose stored bytes no longer match
their manifest, fails every check of its asset. A run of the frame-stack step
shows the same in Dagster: one evaluation per check and partition, each
recorded against its partition.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
import xarray as xr

from agrifm_pipeline.defs.checks import TILE_YEAR_CHECKS, evaluate_partition
from agrifm_pipeline.defs.partitions import tile_year_key
from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
from agrifm_pipeline_tests.pipeline_helpers import TILES, make_pipeline, make_resources

YEAR = 2019
GOOD, BAD = TILES  # the two tile-years of every run: (GOOD, 2019), (BAD, 2019)
N_FRAMES, CHIP_PX, PER, IMAGE = 8, 64, 2, 64
SIDE = CHIP_PX * PER


def _frames(dtype: Any = np.uint16, n_frames: int = N_FRAMES, clear: float = 0.9) -> xr.Dataset:
    rng = np.random.default_rng(0)
    return xr.Dataset(
        {
            "frames": (("time", "band", "y", "x"), rng.integers(1, 9000, (n_frames, 10, SIDE, SIDE)).astype(dtype)),
            "clear_fraction": (("time",), np.full(n_frames, clear, np.float32)),
        }
    )  # fmt: skip


def _normalized(n_nonfinite: int = 0, image: int = IMAGE, n_chips: int = PER * PER) -> xr.Dataset:
    stats = np.random.default_rng(1).normal(size=(n_chips, N_FRAMES, 10, 4)).astype(np.float32)
    ds = xr.Dataset({"chip_stats": (("chip", "time", "band", "stat"), stats)})
    ds.attrs["n_nonfinite"] = n_nonfinite
    ds.attrs["image_size"] = image
    return ds


def _embedding(values: np.ndarray | None = None, attrs: dict[str, Any] | None = None) -> xr.Dataset:
    if values is None:
        values = np.random.default_rng(2).normal(size=(16, 2 * PER, 2 * PER)).astype(np.float32)
    ds = xr.Dataset({"embedding": (("band", "y", "x"), values)})
    ds.attrs.update(attrs or {})
    return ds


def _nan_in_one_chip() -> xr.Dataset:
    ds = _embedding()
    ds["embedding"].values[3, 2, 1] = np.nan  # chip 2 (bottom left)
    return ds


def _one_chip_constant() -> xr.Dataset:
    ds = _embedding()
    ds["embedding"].values[:, 0:2, 2:4] = 0.5  # chip 1 (top right) collapsed
    return ds


def _mostly_constant_channels() -> xr.Dataset:
    ds = _embedding()
    ds["embedding"].values[:12] = 1.0  # 12 of 16 channels constant over the tile
    return ds


def _not_encoded_chip_not_nan() -> xr.Dataset:
    """Chip 3 was below the coverage floor (not encoded) yet holds numbers."""
    return _embedding(
        attrs={"chip_valid_fraction": [1.0, 1.0, 1.0, 0.0], "min_chip_coverage": 0.05}
    )


# check -> (the store it reads, a good dataset, {case: a bad dataset})
CASES: dict[str, tuple[str, Callable[[], xr.Dataset], dict[str, Callable[[], xr.Dataset]]]] = {
    "frame_stack_shape_and_dtype": (
        "s2_frame_stack",
        _frames,
        {
            "float_frames": lambda: _frames(dtype=np.float32),
            "frames_missing": lambda: _frames(n_frames=N_FRAMES - 1),
        },
    ),
    "frame_stack_clear_fraction": (
        "s2_frame_stack",
        _frames,
        {"mostly_fill": lambda: _frames(clear=0.05)},
    ),
    "normalized_tensors_finite": (
        "normalized_tensors",
        _normalized,
        {
            "nonfinite_values": lambda: _normalized(n_nonfinite=3),
            "chips_missing": lambda: _normalized(n_chips=PER * PER - 1),
        },
    ),
    "embedding_finite": (
        "agrifm_embedding_grid",
        _embedding,
        {
            "nan_in_an_encoded_chip": _nan_in_one_chip,
            "float64": lambda: _embedding(_embedding()["embedding"].values.astype(np.float64)),
            "not_encoded_chip_not_nan": _not_encoded_chip_not_nan,
        },
    ),
    "embedding_non_degenerate": (
        "agrifm_embedding_grid",
        _embedding,
        {
            "one_chip_collapsed": _one_chip_constant,
            "constant_channels": _mostly_constant_channels,
        },
    ),
}


def _evaluate(
    resources: dict[str, Any], asset: str, tile: str
) -> dict[str, dg.AssetCheckEvaluation]:
    """{check name: evaluation} of every check of ``asset`` on (tile, YEAR)."""
    store = resources["storage"].store(asset)
    key = _key(tile)
    out = evaluate_partition(dg.AssetKey(asset), store, key, resources["tile_year"])
    assert [e.partition for e in out] == [key] * len(out), "an evaluation without its partition"
    assert {e.asset_key for e in out} == {dg.AssetKey(asset)}
    return {e.check_name: e for e in out}


def _key(tile: str) -> str:
    return str(tile_year_key(tile, YEAR))


@pytest.fixture
def resources(tmp_path: Path) -> dict[str, Any]:
    return make_resources(tmp_path, chip_px=CHIP_PX, chips_per_side=PER, image_size=IMAGE)


def test_every_check_has_bad_data_here() -> None:
    assert {c.name for c in TILE_YEAR_CHECKS} == set(CASES)
    for c in TILE_YEAR_CHECKS:
        assert CASES[c.name][0] == c.asset.to_user_string()


@pytest.mark.parametrize(
    ("name", "case"), [(n, c) for n, (_, _, bad) in CASES.items() for c in bad]
)
def test_check_fails_on_bad_data_and_names_the_partition(
    resources: dict[str, Any], name: str, case: str
) -> None:
    asset, good, bad = CASES[name]
    store = resources["storage"].store(asset)
    store.write(YEAR, GOOD, good(), {})
    store.write(YEAR, BAD, bad[case](), {})
    passed = _evaluate(resources, asset, GOOD)[name]
    failed = _evaluate(resources, asset, BAD)[name]
    assert passed.passed, f"{name} failed on good data: {dict(passed.metadata)}"
    assert not failed.passed, f"{name} passed on {case}"
    assert (passed.partition, failed.partition) == (_key(GOOD), _key(BAD))


@pytest.mark.parametrize("name", sorted(CASES))
def test_check_passes_on_good_data(resources: dict[str, Any], name: str) -> None:
    asset, good, _ = CASES[name]
    resources["storage"].store(asset).write(YEAR, GOOD, good(), {})
    evaluation = _evaluate(resources, asset, GOOD)[name]
    assert evaluation.passed and evaluation.partition == _key(GOOD)


def test_a_missing_and_a_corrupt_partition_fail_every_check(resources: dict[str, Any]) -> None:
    store = resources["storage"].store("s2_frame_stack")
    missing = _evaluate(resources, "s2_frame_stack", BAD)
    assert set(missing) == {"frame_stack_shape_and_dtype", "frame_stack_clear_fraction"}
    assert not any(e.passed for e in missing.values())
    assert all("missing" in str(e.metadata["error"]) for e in missing.values())
    version = store.write(YEAR, BAD, _frames(), {})
    assert all(e.passed for e in _evaluate(resources, "s2_frame_stack", BAD).values())
    chunk = next(p for p in Path(version.path).rglob("frames/*") if p.name[0].isdigit())
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 1]))
    corrupt = _evaluate(resources, "s2_frame_stack", BAD)
    assert not any(e.passed for e in corrupt.values())
    error = str(corrupt["frame_stack_shape_and_dtype"].metadata["error"])
    assert "sha256" in error or "checksum" in error


def test_clear_fraction_is_a_warning_and_says_why(resources: dict[str, Any]) -> None:
    resources["storage"].store("s2_frame_stack").write(YEAR, BAD, _frames(clear=0.05), {})
    evaluation = _evaluate(resources, "s2_frame_stack", BAD)["frame_stack_clear_fraction"]
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.metadata["mean_clear_fraction"].value == pytest.approx(0.05)
    assert "no scene reaches" in str(evaluation.metadata["why"].value)


def test_a_run_records_each_checks_result_against_its_partition(tmp_path: Path) -> None:
    """The frame-stack step over two tile-years: one evaluation per check and partition,
    each carrying its own partition key; the tile the sample barely reaches is the one
    the clear-fraction check flags."""
    pipe = make_pipeline(tmp_path)
    job = pipe.defs.resolve_job_def("embed_tile_years")
    result = job.execute_in_process(
        instance=pipe.instance,
        asset_selection=[dg.AssetKey("s2_frame_stack")],
        tags={RANGE_START: _key(TILES[0]), RANGE_END: _key(TILES[1])},
    )
    got = {(e.check_name, e.partition): e.passed for e in result.get_asset_check_evaluations()}
    assert got == {
        ("frame_stack_shape_and_dtype", _key(TILES[0])): True,
        ("frame_stack_shape_and_dtype", _key(TILES[1])): True,
        ("frame_stack_clear_fraction", _key(TILES[0])): False,
        ("frame_stack_clear_fraction", _key(TILES[1])): True,
    }
