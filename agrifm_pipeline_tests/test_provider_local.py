"""The local provider on the real bundled sample (a directory of GeoTIFFs or a STAC
catalog): composites equal independent medians, masking, partial coverage, reprojection,
the footprint and aligned-read shortcuts, and its errors."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from odc.geo.geobox import GeoBox
from rasterio.warp import Resampling, calculate_default_transform, reproject
from shapely.geometry import box, mapping

from agrifm_pipeline.errors import ProviderError
from agrifm_pipeline.frames import frame_windows, range_windows
from agrifm_pipeline.providers.base import CloudMask
from agrifm_pipeline.providers.local import LocalProvider
from agrifm_pipeline.specs import SensorSpec

SAMPLE_BOUNDS = (574680.0, 5621800.0, 575320.0, 5622440.0)
SAMPLE_GRID = GeoBox.from_bbox(SAMPLE_BOUNDS, "EPSG:32631", resolution=10)


def _independent_medians(sample_dir: Path, windows, cloudy_pct: float, masked: bool) -> np.ndarray:
    """Per-window medians of clear pixels, straight from the files (no project code)."""
    manifest = {
        d["date"]: d["cloud_fraction"]
        for d in json.loads((sample_dir / "manifest.json").read_text())["dates"]
    }
    out = []
    for win in windows:
        stack, clear = [], []
        for date, frac in sorted(manifest.items()):
            day = dt.date.fromisoformat(date)
            if not (win.start <= day < win.end) or 100 * frac > cloudy_pct:
                continue
            with rasterio.open(sample_dir / f"{date}.tif") as src:
                data = src.read()
            with rasterio.open(sample_dir / "masks" / f"{date}.tif") as src:
                cloud, scl = src.read(1), src.read(2)
            ok = np.any(data != 0, axis=0) & (scl != 0)
            if masked:
                ok &= cloud == 0
            stack.append(data.astype(float))
            clear.append(ok)
        if not stack:
            out.append(None)
            continue
        values = np.where(np.array(clear)[:, None], np.array(stack), np.nan)
        med = np.nanmedian(values, axis=0)
        out.append(np.where(np.isnan(med), 0, np.floor(med + 0.5)).astype(np.uint16))
    return out


def test_local_composites_equal_independent_medians(sample_dir: Path) -> None:
    windows = frame_windows(2019, 8)
    stack = LocalProvider(sample_dir).fetch(SAMPLE_GRID, windows, SensorSpec(), CloudMask())
    assert stack.data.dims == ("time", "band", "y", "x") and stack.data.dtype == np.uint16
    assert stack.data.shape == (8, 10, 64, 64)
    assert (
        str(stack.data.rio.crs) == "EPSG:32631" and stack.data.rio.transform().c == SAMPLE_BOUNDS[0]
    )
    expected = _independent_medians(sample_dir, windows, 30, masked=True)
    for i, exp in enumerate(expected):
        if exp is not None:
            np.testing.assert_array_equal(stack.data.values[i], exp, err_msg=f"frame {i}")
    # 2019 has no acquisition after 2019-10-28: the last window (from 11-16) is back-filled.
    last = stack.frames[-1]
    assert last.n_scenes == 0 and last.backfilled and last.backfill_source == "whole_range"
    assert (
        stack.n_backfilled_frames >= 1
        and stack.record()["n_distinct_frames"] == 8 - stack.n_backfilled_frames
    )
    assert all(0 < f.clear_fraction <= 1 for f in stack.frames)
    assert not stack.synthetic and stack.provider == "local"


def test_cloud_mask_changes_the_composite_where_scl_flags_clouds(sample_dir: Path) -> None:
    windows = frame_windows(2019, 8)
    p = LocalProvider(sample_dir)
    masked = p.fetch(SAMPLE_GRID, windows, SensorSpec(), CloudMask())
    unmasked = p.fetch(SAMPLE_GRID, windows, SensorSpec(), CloudMask(mode="none"))
    expected = _independent_medians(sample_dir, windows, 30, masked=False)
    for i, exp in enumerate(expected):
        if exp is not None:
            np.testing.assert_array_equal(unmasked.data.values[i], exp)
    differs = (masked.data.values != unmasked.data.values).any(axis=(0, 1))
    assert differs.any(), "masking clouds changed nothing"
    # Wherever they differ, some scene of the range flagged that pixel.
    flagged = np.zeros((64, 64), bool)
    for mask in (sample_dir / "masks").glob("2019-*.tif"):
        with rasterio.open(mask) as src:
            flagged |= src.read(1) == 1
    assert not (differs & ~flagged).any()


def test_partial_coverage_is_fill_and_lower_clear_fraction(sample_dir: Path) -> None:
    bigger = GeoBox.from_bbox(
        (574360.0, 5621480.0, 575640.0, 5622760.0), "EPSG:32631", resolution=10
    )
    stack = LocalProvider(sample_dir).fetch(
        bigger, frame_windows(2019, 4), SensorSpec(), CloudMask()
    )
    assert stack.data.shape == (4, 10, 128, 128)
    assert all(f.clear_fraction <= 0.25 + 1e-9 for f in stack.frames)
    assert (stack.data.values[:, :, :32, :] == 0).all()  # outside the sample: fill
    inner = stack.data.values[:, :, 32:96, 32:96]
    direct = LocalProvider(sample_dir).fetch(
        SAMPLE_GRID, frame_windows(2019, 4), SensorSpec(), CloudMask()
    )
    np.testing.assert_array_equal(inner, direct.data.values)


def _copy_scenes(sample_dir: Path, dest: Path, dates: list[str], crs: str | None = None) -> None:
    (dest / "masks").mkdir(parents=True)
    for date in dates:
        for sub in ("", "masks/"):
            src_path = sample_dir / f"{sub}{date}.tif"
            with rasterio.open(src_path) as src:
                profile = src.profile.copy()
                data = src.read()
                if crs is None:
                    with rasterio.open(dest / f"{sub}{date}.tif", "w", **profile) as dst:
                        dst.write(data)
                        dst.descriptions = src.descriptions
                    continue
                transform, w, h = calculate_default_transform(
                    src.crs, crs, src.width, src.height, *src.bounds
                )
                profile.update(crs=crs, transform=transform, width=w, height=h)
                with rasterio.open(dest / f"{sub}{date}.tif", "w", **profile) as dst:
                    for b in range(1, src.count + 1):
                        reproject(data[b - 1], rasterio.band(dst, b), src_transform=src.transform,
                                  src_crs=src.crs, dst_transform=transform, dst_crs=crs,
                                  resampling=Resampling.nearest)  # fmt: skip
                    dst.descriptions = src.descriptions


def test_scenes_in_another_crs_are_reprojected(sample_dir: Path, tmp_path: Path) -> None:
    dates = ["2019-04-21", "2019-05-01", "2019-06-25"]
    _copy_scenes(sample_dir, tmp_path / "utm32", dates, crs="EPSG:32632")
    win = range_windows("2019-04-01", "2019-07-01", 1)
    got = LocalProvider(tmp_path / "utm32").fetch(
        SAMPLE_GRID, win, SensorSpec(cloudy_pct=100), CloudMask(mode="none")
    )
    _copy_scenes(sample_dir, tmp_path / "same", dates)
    ref = LocalProvider(tmp_path / "same").fetch(
        SAMPLE_GRID, win, SensorSpec(cloudy_pct=100), CloudMask(mode="none")
    )
    a, b = got.data.values[0].astype(int), ref.data.values[0].astype(int)
    valid = (a > 0).all(axis=0)
    assert valid.mean() > 0.9  # most pixels survive the round trip through another zone
    # Nearest-neighbour through a second zone moves a pixel by at most one cell: values agree mostly.
    assert np.mean(np.abs(a - b)[:, valid] < 50) > 0.6
    assert got.frames[0].n_scenes == 3


def test_stac_catalog_gives_the_same_composites(sample_dir: Path, tmp_path: Path) -> None:
    bands = list(SensorSpec().bands)
    catalog = pystac.Catalog(id="sample", description="bundled sample as single-band COGs")
    manifest = {
        d["date"]: d for d in json.loads((sample_dir / "manifest.json").read_text())["dates"]
    }
    for date in ["2019-04-21", "2019-05-01", "2019-05-06", "2019-06-25", "2019-07-10"]:
        item_dir = tmp_path / "items" / date
        item_dir.mkdir(parents=True)
        with (
            rasterio.open(sample_dir / f"{date}.tif") as src,
            rasterio.open(sample_dir / "masks" / f"{date}.tif") as msk,
        ):
            profile = {
                **src.profile,
                "count": 1,
                "driver": "GTiff",
                "tiled": True,
                "blockxsize": 64,
                "blockysize": 64,
            }
            layers = {b: src.read(i + 1) for i, b in enumerate(bands)}
            layers["SCL"] = msk.read(2)
            bbox = list(rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds))
            item = pystac.Item(date, geometry=mapping(box(*bbox)), bbox=bbox, datetime=dt.datetime.fromisoformat(date + "T10:50:00+00:00"),
                               properties={"eo:cloud_cover": 100 * manifest[date]["cloud_fraction"], "proj:epsg": 32631})  # fmt: skip
            for name, arr in layers.items():
                path = item_dir / f"{name}.tif"
                prof = {**profile, "dtype": arr.dtype.name, "nodata": 0}
                with rasterio.open(path, "w", **prof) as dst:
                    dst.write(arr, 1)
                item.add_asset(
                    name, pystac.Asset(href=str(path), media_type=pystac.MediaType.GEOTIFF)
                )
        catalog.add_item(item)
    catalog.normalize_and_save(
        str(tmp_path / "stac"), catalog_type=pystac.CatalogType.SELF_CONTAINED
    )
    _copy_scenes(
        sample_dir,
        tmp_path / "dir",
        ["2019-04-21", "2019-05-01", "2019-05-06", "2019-06-25", "2019-07-10"],
    )
    (tmp_path / "dir" / "manifest.json").write_text((sample_dir / "manifest.json").read_text())
    win = range_windows("2019-04-01", "2019-08-01", 2)
    via_stac = LocalProvider(tmp_path / "stac" / "catalog.json").fetch(
        SAMPLE_GRID, win, SensorSpec(), CloudMask()
    )
    via_dir = LocalProvider(tmp_path / "dir").fetch(SAMPLE_GRID, win, SensorSpec(), CloudMask())
    np.testing.assert_array_equal(via_stac.data.values, via_dir.data.values)
    assert [f.n_scenes for f in via_stac.frames] == [f.n_scenes for f in via_dir.frames]


def test_local_errors(sample_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="does not exist"):
        LocalProvider(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProviderError, match="no scenes"):
        LocalProvider(tmp_path / "empty")
    # A mask on another grid.
    bad = tmp_path / "bad"
    _copy_scenes(sample_dir, bad, ["2019-05-01"])
    with rasterio.open(sample_dir / "masks" / "2019-05-01.tif") as src:
        prof = {**src.profile, "width": 32, "height": 32}
        arr = src.read()[:, :32, :32]
    with rasterio.open(bad / "masks" / "2019-05-01.tif", "w", **prof) as dst:
        dst.write(arr)
    with pytest.raises(ProviderError, match="not on the grid"):
        LocalProvider(bad).fetch(
            SAMPLE_GRID, range_windows("2019-04-01", "2019-06-01", 1), SensorSpec(), CloudMask()
        )
    # Unknown band names.
    with pytest.raises(ProviderError, match=r"lacks \['B99'\]"):
        sensor = SensorSpec(bands=("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B99"))
        LocalProvider(sample_dir).fetch(SAMPLE_GRID, frame_windows(2019, 2), sensor, CloudMask())
    # Missing mask with SCL masking asked for.
    nomask = tmp_path / "nomask"
    _copy_scenes(sample_dir, nomask, ["2019-05-01"])
    (nomask / "masks" / "2019-05-01.tif").unlink()
    with pytest.raises(ProviderError, match="no mask file"):
        LocalProvider(nomask).fetch(
            SAMPLE_GRID, range_windows("2019-04-01", "2019-06-01", 1), SensorSpec(), CloudMask()
        )


def test_partial_coverage_reads_only_the_footprint_and_matches_the_full_read(
    sample_dir: Path,
) -> None:
    """A tile the sample covers in one corner: restricting the work to the footprint changes nothing."""
    from agrifm_pipeline.tiles import Tile

    area = Tile.from_id("32631_1280m_E0449_N4392").geobox()
    provider = LocalProvider(sample_dir)
    wins = frame_windows(2019, 4)
    assert provider._footprint(area, wins[0].start, wins[-1].end) is not None
    fast = provider.fetch(area, wins, SensorSpec(), CloudMask())
    provider._footprint = lambda *a: None  # type: ignore[method-assign]
    full = provider.fetch(area, wins, SensorSpec(), CloudMask())
    np.testing.assert_array_equal(fast.data.values, full.data.values)
    for a, b in zip(fast.frames, full.frames, strict=True):
        assert a.clear_fraction == pytest.approx(b.clear_fraction, abs=1e-12)
        assert (a.n_scenes, a.scenes, a.backfilled) == (b.n_scenes, b.scenes, b.backfilled)


def test_scenes_on_the_tile_lattice_are_read_without_the_warper(
    sample_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sample is on the zone's 10 m lattice: the direct windowed read gives exactly
    what the warper gives, for areas inside, across the edge of, and outside a scene."""
    from agrifm_pipeline.providers import local

    scene = sorted(sample_dir.glob("2019-*.tif"))[0]
    with rasterio.open(scene) as src:
        assert local._aligned_offset(src, SAMPLE_GRID) == (0, 0)
    areas = [SAMPLE_GRID, SAMPLE_GRID.pad(7)[:30, :80], SAMPLE_GRID.pad(200)[:40, :40]]
    shifted = GeoBox.from_bbox(SAMPLE_BOUNDS, "EPSG:32631", resolution=10).translate_pix(0.5, 0)
    with rasterio.open(scene) as src:
        assert local._aligned_offset(src, shifted) is None  # off the lattice: warped
    direct = [local._read_onto(scene, a, [3, 2, 1], "uint16") for a in areas]
    monkeypatch.setattr(local, "_aligned_offset", lambda *a: None)
    for area, got in zip(areas, direct, strict=True):
        np.testing.assert_array_equal(got, local._read_onto(scene, area, [3, 2, 1], "uint16"))
    assert direct[0].any() and direct[1].any() and not direct[2].any()
