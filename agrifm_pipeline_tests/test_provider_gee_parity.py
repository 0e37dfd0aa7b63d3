"""Earth Engine beside the local provider where the sample alone never looks, and its retries.

- Rounding: an even count's median is rounded half *up* on both sides, as Earth
  Engine documents ``round`` (10.5 -> 11, where half-to-even would give 10).
- The per-pixel clear mask across bands: a pixel that one band lacks (0, no data)
  while the other bands hold data, in a clear SCL class, is no observation at
  all: neither provider lets its other bands into a median or a mosaic. The
  bundled sample has no such pixel outside a masked SCL class, so scenes are
  written here with one.
- Retries by message: every message :data:`RETRY_MESSAGES` recognises is retried
  whatever the status (sent as a 400, the status that never retries on its own);
  Earth Engine's refusals of a bad request fail at once. A "Computation timed
  out." answer to a request that cannot be split (a granule list) is a clear
  error, not an internal exception.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import google.oauth2.credentials
import numpy as np
import pytest
from odc.geo.geobox import GeoBox

from agrifm_pipeline.errors import ProviderError
from agrifm_pipeline.frames import frame_windows, range_windows
from agrifm_pipeline.providers.base import CloudMask, FrameStack
from agrifm_pipeline.providers.compositing import composite
from agrifm_pipeline.providers.gee import RETRY_MESSAGES, EarthEngineProvider
from agrifm_pipeline.providers.local import LocalProvider
from agrifm_pipeline.specs import SensorSpec

from .ee_standin import SAMPLE_DIR, StandIn, catalog_from_directory, ee_standin

SAMPLE = GeoBox.from_bbox((574680.0, 5621800.0, 575320.0, 5622440.0), "EPSG:32631", resolution=10)


def _provider(s: StandIn, tmp_path: Path, **kw) -> EarthEngineProvider:
    return EarthEngineProvider(
        project=s.project,
        credentials=google.oauth2.credentials.Credentials(token="test-token"),
        endpoint=s.url,
        sleep=lambda _: None,
        slots_dir=tmp_path / "slots",
        **kw,
    )


# --- rounding: half up, as Earth Engine's round ----------------------------------------------


def test_an_even_median_rounds_half_up_on_both_sides(tmp_path: Path) -> None:
    """Observations 10 and 11 (median 10.5) and 20 and 23 (21.5): Earth Engine's
    ``median().round()`` and the local compositor both give 11 and 22."""
    import ee

    with ee_standin() as s:
        _provider(s, tmp_path).initialise()
        c = ee.Image.constant
        for pair, want in (((10, 11), 11), ((20, 23), 22)):
            image = ee.ImageCollection([c(v) for v in pair]).median().round().toUint16()
            body = {
                "expression": image.rename("m"),
                "fileFormat": "NUMPY_NDARRAY",
                "bandIds": ["m"],
                "grid": {
                    "dimensions": {"width": 2, "height": 2},
                    "affineTransform": {"scaleX": 10.0, "translateX": 574680.0,
                                        "scaleY": -10.0, "translateY": 5622440.0},
                    "crsCode": "EPSG:32631",
                },
            }  # fmt: skip
            assert (ee.data.computePixels(body)["m"] == want).all(), pair
            obs = [
                (dt.date(2020, 1, 1 + i), np.full((10, 2, 2), v, np.uint16), np.ones((2, 2), bool))
                for i, v in enumerate(pair)
            ]
            local, _ = composite(obs, "median", 0.0)
            assert (local == want).all(), pair


# --- a pixel one band lacks, in a clear SCL class --------------------------------------------

DATES = ("2019-04-01", "2019-04-16", "2019-04-21")  # clear scenes of the sample
BLOCK = np.s_[10:20, 30:40]
LACKING = 6  # B8: no data in the newest scene's block; its other bands hold data there


def _scenes(root: Path, edit: Callable[[str, np.ndarray, np.ndarray], None]) -> Path:
    """The sample's ``DATES`` under ``root``, each scene's arrays passed through ``edit``
    (date, reflectance (10, H, W), masks (2, H, W)) before they are written."""
    import rasterio

    (root / "masks").mkdir(parents=True)
    for date in DATES:
        files = {sub: f"{sub}{date}.tif" for sub in ("", "masks/")}
        read = {}
        for sub, name in files.items():
            with rasterio.open(SAMPLE_DIR / name) as src:
                read[sub] = (src.profile, src.read(), src.descriptions)
        edit(date, read[""][1], read["masks/"][1])
        for sub, name in files.items():
            profile, arrays, names = read[sub]
            with rasterio.open(root / name, "w", **profile) as dst:
                dst.write(arrays)
                dst.descriptions = names
    entries = json.loads((SAMPLE_DIR / "manifest.json").read_text())["dates"]
    kept = [e for e in entries if e["date"] in DATES]
    (root / "manifest.json").write_text(json.dumps({"dates": kept}))
    return root


def _one_band_lacking(date: str, data: np.ndarray, masks: np.ndarray) -> None:
    masks[1][BLOCK] = 4  # vegetation: a clear class in every scene
    assert (data[:, BLOCK[0], BLOCK[1]] > 0).all()
    if date == DATES[-1]:
        data[LACKING][BLOCK] = 0


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _scenes(tmp_path_factory.mktemp("lacking"), _one_band_lacking)


@pytest.fixture
def standin(scene_root: Path) -> Iterator[StandIn]:
    with ee_standin(catalog=catalog_from_directory(scene_root)) as s:
        yield s


def _both(
    s: StandIn, tmp_path: Path, root: Path, sensor: SensorSpec
) -> tuple[FrameStack, FrameStack]:
    windows = range_windows("2019-04-01", "2019-05-01", 1)
    gee = _provider(s, tmp_path).fetch(SAMPLE, windows, sensor, CloudMask())
    return gee, LocalProvider(root).fetch(SAMPLE, windows, sensor, CloudMask())


def _read(root: Path, date: str) -> np.ndarray:
    import rasterio

    with rasterio.open(root / f"{date}.tif") as src:
        return src.read().astype(np.int64)


@pytest.mark.parametrize("method", ["median", "mosaic"])
def test_a_pixel_one_band_lacks_is_no_observation_for_either_provider(
    standin: StandIn, scene_root: Path, tmp_path: Path, method: str
) -> None:
    """In the block, the newest scene has data in 9 bands of 10 and a clear SCL class. Both
    providers leave that scene out there in *every* band: the median is the other two
    scenes' (rounded half up), the mosaic the scene before. Elsewhere all three count."""
    gee, local = _both(standin, tmp_path, scene_root, SensorSpec(composite=method, cloudy_pct=100))
    g, lo = gee.data.values[0].astype(np.int64), local.data.values[0].astype(np.int64)
    differ = g != lo
    assert not differ.any(), f"{int(differ.sum())} values differ, e.g. at {np.argwhere(differ)[0]}"
    first, second, newest = (_read(scene_root, d) for d in DATES)
    rows, cols = BLOCK
    want = (first + second + 1) // 2 if method == "median" else second
    np.testing.assert_array_equal(g[:, rows, cols], want[:, rows, cols])
    # Outside the block the newest scene counts: the block is told apart by its mask alone.
    outside = np.ones(g.shape[1:], bool)
    outside[BLOCK] = False
    expected = np.median([first, second, newest], axis=0) if method == "median" else newest
    np.testing.assert_array_equal(g[:, outside], expected[:, outside])
    assert gee.frames[0].clear_fraction == local.frames[0].clear_fraction == 1.0


# --- retries: by status, by message, and what fails at once ---------------------------------


@pytest.fixture
def sample_standin() -> Iterator[StandIn]:
    with ee_standin() as s:
        yield s


# Earth Engine's texts for transient conditions, written out here (not read from the
# provider), so that a marker dropped from RETRY_MESSAGES, or matched case-sensitively,
# fails; each is sent with trailing detail, as Earth Engine often adds some.
TRANSIENT_TEXTS = (
    "Too many concurrent aggregations.",
    "Earth Engine capacity exceeded.",
    "Earth Engine memory capacity exceeded.",
    "Too Many Requests",
    "An internal error has occurred (request: 7f3a).",
    "Service unavailable",
    "Backend Error",
)


def test_every_recognised_message_has_a_transient_text_here() -> None:
    """A marker added to RETRY_MESSAGES gets its text above (and so a retry test)."""
    for marker in RETRY_MESSAGES:
        assert any(marker in text.lower() for text in TRANSIENT_TEXTS), marker


@pytest.mark.parametrize("text", TRANSIENT_TEXTS)
def test_every_transient_message_is_retried_whatever_the_status(
    sample_standin: StandIn, tmp_path: Path, text: str
) -> None:
    """Sent as a 400, the status that never retries on its own: the message decides."""
    provider = _provider(sample_standin, tmp_path)
    provider.initialise()
    windows = frame_windows(2019, 2)
    expected = provider.scene_index(SAMPLE, windows, SensorSpec())
    before = len(sample_standin.bodies("value:compute"))
    sample_standin.fail_next(1, 400, f"{text} Please try again later.")
    got = provider.scene_index(SAMPLE, windows, SensorSpec())
    assert got == expected
    assert len(sample_standin.bodies("value:compute")) - before == 2
    assert provider.stats["retries"] == 1


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "User memory limit exceeded."),
        (400, "Image.select: Pattern 'B99' did not match any bands."),
        (400, "Collection.filter: Invalid filter: unknown property 'CLOUDY'."),
        (403, "Earth Engine API has not been used in project 1234 before or it is disabled."),
        (404, "ImageCollection.load: ImageCollection asset 'X' not found."),
    ],
)
def test_refusals_of_a_bad_request_fail_at_once(
    sample_standin: StandIn, tmp_path: Path, status: int, message: str
) -> None:
    provider = _provider(sample_standin, tmp_path)
    provider.initialise()
    before = len(sample_standin.bodies("value:compute"))
    sample_standin.fail_next(1, status, message)
    with pytest.raises(ProviderError, match="refused") as err:
        provider.scene_index(SAMPLE, frame_windows(2019, 2), SensorSpec())
    assert message.rstrip(".") in str(err.value)
    assert len(sample_standin.bodies("value:compute")) - before == 1
    assert provider.stats["retries"] == 0


def test_a_granule_list_that_timed_out_is_a_clear_error(
    sample_standin: StandIn, tmp_path: Path
) -> None:
    """Only pixel requests can be split; a granule list answered "Computation timed out."
    fails once, as a ProviderError that says what to ask for instead."""
    provider = _provider(sample_standin, tmp_path)
    provider.initialise()
    before = len(sample_standin.bodies("value:compute"))
    sample_standin.fail_next(1, 400, "Computation timed out.")
    with pytest.raises(ProviderError, match="timed out") as err:
        provider.fetch(SAMPLE, frame_windows(2019, 2), SensorSpec(), CloudMask())
    assert "the granule list" in str(err.value)
    assert len(sample_standin.bodies("value:compute")) - before == 1
    assert not sample_standin.bodies("image:computePixels")
