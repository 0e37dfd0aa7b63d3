"""Compositing rules on hand-made arrays: median/mosaic values, the scene filter, the
per-pixel mask classes and the back-fill rule (shared by every compositing provider)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from agrifm_pipeline.errors import ProviderError
from agrifm_pipeline.frames import range_windows
from agrifm_pipeline.providers.base import CloudMask
from agrifm_pipeline.providers.compositing import (
    Scene,
    backfill_sources,
    composite,
    composite_windows,
)
from agrifm_pipeline.specs import SensorSpec


def _obs(values: list[int], clear: list[bool]) -> list[tuple[dt.date, np.ndarray, np.ndarray]]:
    return [
        (dt.date(2020, 1, 1 + i), np.full((2, 1, 1), v, np.uint16), np.array([[c]]))
        for i, (v, c) in enumerate(zip(values, clear, strict=True))
    ]


def test_median_and_mosaic_exact_values() -> None:
    data, has = composite(_obs([10, 40, 20, 999], [True, True, True, False]), "median", 0)
    assert data[0, 0, 0] == 20 and has.all()
    data, _ = composite(_obs([10, 40, 20, 31], [True, True, True, True]), "median", 0)
    assert data[0, 0, 0] == 26  # (20 + 31 + 1) // 2: mean of the middle two, half up
    data, _ = composite(_obs([10, 40, 20, 999], [True, True, True, False]), "mosaic", 0)
    assert data[0, 0, 0] == 20  # most recent clear
    data, has = composite(_obs([10, 40], [False, False]), "median", 7)
    assert data[0, 0, 0] == 7 and not has.any()


def _scene(day: int, value: int, cloudy: float | None, scl_value: int = 4, size: int = 2) -> Scene:
    data = np.full((10, size, size), value, np.uint16)
    scl = np.full((size, size), scl_value, np.uint8)
    return Scene(f"s{day}", dt.date(2020, 1, day), cloudy, lambda: (data, scl))


def test_cloudy_filter_is_inclusive_and_mask_classes_apply() -> None:
    wins = range_windows("2020-01-01", "2020-01-05", 1)
    sensor = SensorSpec(cloudy_pct=30)
    out, recs = composite_windows(
        [_scene(1, 100, 30.0), _scene(2, 900, 30.1)], wins, sensor, CloudMask()
    )
    assert out[0, 0, 0, 0] == 100 and recs[0].n_scenes == 1 and recs[0].scenes == ["s1"]
    # SCL 9 (cloud) is masked by default, kept with cloud_mask='none'.
    scenes = [_scene(1, 100, 0.0), _scene(2, 900, 0.0, scl_value=9)]
    out, _ = composite_windows(scenes, wins, sensor, CloudMask())
    assert out[0, 0, 0, 0] == 100
    out, _ = composite_windows(scenes, wins, sensor, CloudMask(mode="none"))
    assert out[0, 0, 0, 0] == 500
    out, _ = composite_windows(scenes, wins, sensor, CloudMask(scl_classes=(3,)))
    assert out[0, 0, 0, 0] == 500


def test_backfill_whole_range_then_nearest_earlier_on_ties() -> None:
    assert backfill_sources([False, True, False], True) == [None, "whole_range", None]
    assert backfill_sources([False, True, False], False) == [None, "frame:0", None]
    assert backfill_sources([True, True, False, True], False) == [
        "frame:2",
        "frame:2",
        None,
        "frame:2",
    ]
    assert backfill_sources([False, True, True, True, False], False) == [
        None,
        "frame:0",
        "frame:0",
        "frame:4",
        None,
    ]
    wins = range_windows("2020-01-01", "2020-01-09", 4)  # 2-day windows
    out, recs = composite_windows(
        [_scene(1, 100, 0.0), _scene(6, 300, 0.0)], wins, SensorSpec(), CloudMask()
    )
    assert [r.backfilled for r in recs] == [False, True, False, True]
    assert recs[1].backfill_source == "whole_range" and out[1, 0, 0, 0] == 200  # median of 100, 300
    with pytest.raises(ProviderError, match="no clear observation"):
        composite_windows([_scene(1, 100, 90.0)], wins, SensorSpec(), CloudMask())
