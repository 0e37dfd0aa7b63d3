"""The provider contract, checked the same way on every provider.

Whatever the source, ``fetch(area, windows, sensor, cloud_mask)`` gives a
``(time, band, y, x)`` uint16 array on exactly the area's grid (CRS, transform,
pixel-centre coordinates), one frame per window with the window's start as its
time coordinate, one :class:`FrameRecord` per window saying how it was made,
and a JSON-serialisable record with the same keys for every provider. The
local provider reads the bundled sample, the synthetic one draws, and the
Earth Engine provider talks through the real client to the stand-in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import google.oauth2.credentials
import numpy as np
import pytest
from odc.geo.geobox import GeoBox

from agrifm_pipeline.frames import FrameWindow, frame_windows, range_windows
from agrifm_pipeline.providers.base import CloudMask, FrameStack, Provider
from agrifm_pipeline.providers.gee import EarthEngineProvider
from agrifm_pipeline.providers.local import LocalProvider
from agrifm_pipeline.providers.synthetic import SyntheticProvider
from agrifm_pipeline.specs import SensorSpec

from .ee_standin import ee_standin

# The bundled sample's 64 x 64 px footprint (EPSG:32631, 10 m).
AREA = GeoBox.from_bbox((574680.0, 5621800.0, 575320.0, 5622440.0), "EPSG:32631", resolution=10)
# A non-square part of it, away from the origin: rows and columns cannot be confused.
STRIP = AREA[8:24, 4:44]

RECORD_KEYS = {
    "provider",
    "provider_version",
    "synthetic",
    "n_frames",
    "n_frames_requested",
    "n_distinct_frames",
    "n_backfilled_frames",
    "frames",
}
FRAME_KEYS = {
    "index",
    "start",
    "end",
    "n_scenes",
    "scenes",
    "clear_fraction",
    "backfilled",
    "backfill_source",
}

CASES: dict[str, tuple[GeoBox, list[FrameWindow]]] = {
    "year_t4": (AREA, frame_windows(2019, 4)),
    "strip_3_windows": (STRIP, range_windows("2019-03-01", "2019-09-01", 3)),
}


@pytest.fixture(params=["local", "synthetic", "gee"])
def provider(
    request: pytest.FixtureRequest, sample_dir: Path, tmp_path: Path
) -> Iterator[Provider]:
    if request.param == "local":
        yield LocalProvider(sample_dir)
    elif request.param == "synthetic":
        yield SyntheticProvider(seed=7)
    else:
        with ee_standin() as s:
            yield EarthEngineProvider(
                project=s.project,
                credentials=google.oauth2.credentials.Credentials(token="test-token"),
                endpoint=s.url,
                sleep=lambda _: None,
                slots_dir=tmp_path / "slots",
            )


def _assert_contract(
    stack: FrameStack, area: GeoBox, windows: list[FrameWindow], sensor: SensorSpec
) -> None:
    da = stack.data
    # dims, dtype, shape
    assert da.dims == ("time", "band", "y", "x")
    assert da.dtype == np.uint16
    assert da.shape == (len(windows), len(sensor.bands), *area.shape)
    assert list(da["band"].values) == list(sensor.bands)
    # georeferencing: the area's grid exactly
    assert da.rio.crs is not None and da.rio.crs.to_epsg() == area.crs.epsg
    assert tuple(da.rio.transform()) == tuple(area.affine)
    np.testing.assert_array_equal(da["x"].values, area.coords["x"].values)
    np.testing.assert_array_equal(da["y"].values, area.coords["y"].values)
    # one frame per window, in order, labelled by its start
    assert len(stack.frames) == len(windows)
    assert [np.datetime64(w.start, "ns") for w in windows] == list(da["time"].values)
    for rec, win in zip(stack.frames, windows, strict=True):
        assert (rec.index, rec.start, rec.end) == (win.index, win.start, win.end)
        assert rec.n_scenes == len(rec.scenes)
        assert 0.0 <= rec.clear_fraction <= 1.0
        assert rec.backfilled == (rec.backfill_source is not None)
        if rec.backfill_source is not None:
            assert rec.backfill_source == "whole_range" or rec.backfill_source.startswith("frame:")
    assert any(not r.backfilled for r in stack.frames), "every frame back-filled"
    # the record: the same keys for every provider, and JSON as it is
    record = json.loads(json.dumps(stack.record()))
    assert set(record) >= RECORD_KEYS
    assert record["n_frames"] == record["n_frames_requested"] == len(windows)
    assert record["n_distinct_frames"] + record["n_backfilled_frames"] == len(windows)
    assert record["provider"] == stack.provider and record["synthetic"] is stack.synthetic
    assert all(set(f) == FRAME_KEYS for f in record["frames"])
    assert [f["start"] for f in record["frames"]] == [w.start.isoformat() for w in windows]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_provider_keeps_the_contract(provider: Provider, case: str) -> None:
    area, windows = CASES[case]
    sensor = SensorSpec()
    assert isinstance(provider, Provider) and provider.name and provider.version
    stack = provider.fetch(area, windows, sensor, CloudMask())
    _assert_contract(stack, area, windows, sensor)
    assert stack.provider == provider.name
    assert stack.data.values.any(), "no data at all"


def test_contract_holds_for_another_band_order_mosaic_and_no_cloud_mask(
    provider: Provider,
) -> None:
    """The band order is the caller's: bands given in reverse come back in reverse."""
    area, windows = CASES["year_t4"]
    forward = SensorSpec(composite="mosaic")
    backward = SensorSpec(bands=tuple(reversed(forward.bands)), composite="mosaic")
    a = provider.fetch(area, windows, forward, CloudMask(mode="none"))
    b = provider.fetch(area, windows, backward, CloudMask(mode="none"))
    _assert_contract(b, area, windows, backward)
    np.testing.assert_array_equal(b.data.values, a.data.values[:, ::-1])


ContractCheck = Callable[[FrameStack, GeoBox, list[FrameWindow], SensorSpec], None]


def test_the_contract_check_rejects_a_transposed_or_shifted_stack(sample_dir: Path) -> None:
    """The check above has teeth: a stack on the wrong grid, or missing a frame, fails it."""
    area, windows = CASES["strip_3_windows"]
    sensor = SensorSpec()
    good = LocalProvider(sample_dir).fetch(area, windows, sensor, CloudMask())
    check: ContractCheck = _assert_contract
    check(good, area, windows, sensor)
    with pytest.raises(AssertionError):
        check(good, area.translate_pix(1, 0), windows, sensor)
    with pytest.raises(AssertionError):
        check(good, area, windows[:2], sensor)
    transposed = FrameStack(
        good.data.transpose("time", "band", "x", "y"), good.frames, good.provider, "x"
    )
    with pytest.raises(AssertionError):
        check(transposed, area, windows, sensor)
