"""The Earth Engine provider: the real earthengine-api client against a stand-in on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator

import google.oauth2.credentials
import numpy as np
import pytest
from odc.geo.geobox import GeoBox

from agrifm_pipeline.errors import ProviderError
from agrifm_pipeline.frames import frame_windows
from agrifm_pipeline.providers.base import CloudMask
from agrifm_pipeline.providers.gee import (
    HIGH_VOLUME_ENDPOINT,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_SIDE,
    EarthEngineProvider,
    is_retryable,
)
from agrifm_pipeline.specs import SensorSpec
from agrifm_pipeline.tiles import Tile

from .ee_standin import StandIn, ee_standin, expected_value

SAMPLE = GeoBox.from_bbox((574680.0, 5621800.0, 575320.0, 5622440.0), "EPSG:32631", resolution=10)


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with ee_standin() as s:
        yield s


def _provider(s: StandIn, **kw) -> EarthEngineProvider:
    creds = google.oauth2.credentials.Credentials(token="test-token")
    return EarthEngineProvider(
        project=s.project, credentials=creds, endpoint=s.url, sleep=lambda _: None, **kw
    )


def _expected(area: GeoBox, band: str) -> np.ndarray:
    xs, ys = area.coords["x"].values, area.coords["y"].values
    x, y = np.meshgrid(xs, ys)
    return expected_value(band, x, y)


def test_expression_grid_and_pixels(standin: StandIn) -> None:
    sensor = SensorSpec(cloudy_pct=25)
    windows = frame_windows(2019, 8)
    stack = _provider(standin).fetch(SAMPLE, windows, sensor, CloudMask())
    # The client initialised against the stand-in (discovery + algorithms).
    paths = [p for _, p, _ in standin.requests]
    assert any(p.startswith("/$discovery/rest") for p in paths) and any(
        "/algorithms" in p for p in paths
    )
    # The expression: collection, windows, bands, scene filter, SCL mask.
    (pixels,) = standin.bodies("image:computePixels")
    expr = json.dumps(pixels["expression"])
    assert '"COPERNICUS/S2_SR_HARMONIZED"' in expr
    # lte(CLOUDY_PIXEL_PERCENTAGE, 25) serialises as not(greaterThan(...)).
    assert (
        '"CLOUDY_PIXEL_PERCENTAGE"' in expr
        and '"Filter.greaterThan"' in expr
        and '"Filter.not"' in expr
    )
    assert '"constantValue": 25' in expr
    for win in windows:
        assert f'"{win.start.isoformat()}"' in expr and f'"{win.end.isoformat()}"' in expr
    for band in sensor.bands:
        assert f'"{band}"' in expr
    assert '"Image.remap"' in expr and "[0, 1, 3, 8, 9, 10, 11]" in expr
    assert '"reduce.median"' in expr and '"reduce.count"' in expr
    # The grid: the area's own UTM CRS at 10 m, not Web Mercator.
    grid = pixels["grid"]
    assert grid["crsCode"] == "EPSG:32631"
    assert grid["affineTransform"]["scaleX"] == 10.0 and grid["affineTransform"]["scaleY"] == -10.0
    assert (
        grid["affineTransform"]["translateX"] == 574680.0
        and grid["affineTransform"]["translateY"] == 5622440.0
    )
    assert grid["dimensions"] == {"width": 64, "height": 64}
    assert pixels["fileFormat"] == "NUMPY_NDARRAY" or pixels["fileFormat"] == "NPY"
    # Pixels decode into the right (T, 10, H, W) values; frame 7 (no clear pixel) is back-filled.
    values = stack.data.values
    assert values.shape == (8, 10, 64, 64) and values.dtype == np.uint16
    for i in range(7):
        for c, band in enumerate(sensor.bands):
            np.testing.assert_array_equal(values[i, c], _expected(SAMPLE, f"f{i}_{band}"))
    np.testing.assert_array_equal(values[7, 0], _expected(SAMPLE, "all_B2"))
    assert stack.frames[7].backfilled and stack.frames[7].backfill_source == "whole_range"
    assert [f.n_scenes for f in stack.frames] == [3] * 8 and stack.extra["scenes_in_range"] == 20
    assert stack.provider == "gee" and "earthengine-api" in stack.provider_version
    assert str(stack.data.rio.crs) == "EPSG:32631"


def test_no_pixel_mask_with_mode_none(standin: StandIn) -> None:
    _provider(standin).fetch(SAMPLE, frame_windows(2019, 2), SensorSpec(), CloudMask(mode="none"))
    expr = json.dumps(standin.bodies("image:computePixels")[0]["expression"])
    # Only SCL 0 (no data) is remapped away: no cloud classes.
    assert "[0, 1, 3, 8, 9, 10, 11]" not in expr and '"Image.remap"' in expr
    assert '"constantValue": [0]' in expr


def test_429_and_503_are_retried(standin: StandIn) -> None:
    provider = _provider(standin)
    provider.initialise()
    standin.fail_next(1, 429, "Too Many Requests: quota exceeded")
    standin.fail_next(1, 503, "Service unavailable")
    stack = provider.fetch(SAMPLE, frame_windows(2019, 2), SensorSpec(), CloudMask())
    assert provider.stats["retries"] == 2 and stack.extra["retries"] == 2
    assert stack.data.shape == (2, 10, 64, 64)


def test_persistent_503_gives_up_with_a_clear_error(standin: StandIn) -> None:
    provider = _provider(standin, max_attempts=3)
    provider.initialise()
    standin.fail_next(10, 503, "Service unavailable")
    with pytest.raises(ProviderError, match="after 3 attempts"):
        provider.fetch(SAMPLE, frame_windows(2019, 2), SensorSpec(), CloudMask())
    assert provider.stats["requests"] == 3


def test_400_is_not_retried(standin: StandIn) -> None:
    provider = _provider(standin)
    provider.initialise()
    standin.fail_next(1, 400, "Image.select: Band pattern 'B99' did not match any bands.")
    with pytest.raises(ProviderError, match="refused") as err:
        provider.fetch(SAMPLE, frame_windows(2019, 2), SensorSpec(), CloudMask())
    assert provider.stats["retries"] == 0
    # A collection without the needed bands is named with the fix.
    assert "lacks bands" in str(err.value) and "S2_SR_HARMONIZED" in str(err.value)


def test_large_area_is_split_within_limits_and_reassembled_exactly(standin: StandIn) -> None:
    tile = Tile.from_id("32631_8960m_E0064_N0627").geobox()  # 896 x 896 px
    provider = _provider(standin, max_concurrent=2)
    standin.delay_s = 0.05
    stack = provider.fetch(tile, frame_windows(2019, 8), SensorSpec(), CloudMask())
    bodies = standin.bodies("image:computePixels")
    assert len(bodies) > 1, "a 130 MB request must be split"
    covered = 0
    for body in bodies:
        dims = body["grid"]["dimensions"]
        assert dims["width"] <= MAX_REQUEST_SIDE and dims["height"] <= MAX_REQUEST_SIDE
        assert dims["width"] * dims["height"] * len(body["bandIds"]) * 2 <= MAX_REQUEST_BYTES
        covered += dims["width"] * dims["height"]
    assert covered == 896 * 896
    values = stack.data.values
    np.testing.assert_array_equal(values[3, 4], _expected(tile, "f3_B6"))
    np.testing.assert_array_equal(values[0, 9], _expected(tile, "f0_B12"))
    assert 1 < standin.in_flight_max <= 2 and provider.stats["in_flight_max"] <= 2


def test_retry_classification_and_settings() -> None:
    assert is_retryable(Exception("Too Many Requests"))
    assert is_retryable(Exception("Quota exceeded for quota metric 'Concurrent requests'"))
    assert is_retryable(Exception("Service unavailable"))
    assert not is_retryable(Exception("Image.select: Band pattern 'B99' did not match any bands."))
    creds = google.oauth2.credentials.Credentials(token="x")
    assert (
        EarthEngineProvider(project="p", credentials=creds, endpoint="highvolume").endpoint
        == HIGH_VOLUME_ENDPOINT
    )
    with pytest.raises(Exception, match="max_concurrent"):
        EarthEngineProvider(project="p", credentials=creds, max_concurrent=40)


def test_missing_key_file(tmp_path) -> None:
    provider = EarthEngineProvider(project="p", service_account_key=tmp_path / "key.json")
    with pytest.raises(ProviderError, match="does not exist"):
        provider.initialise()


def _service_account_key(path, token_uri: str) -> str:
    """A real service-account key file (fresh RSA key) whose token endpoint is the stand-in."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "test-project",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "embedder@test-project.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": token_uri,
            }
        )
    )
    return str(path)


def test_pipeline_acquires_from_earth_engine_with_a_service_account(
    standin: StandIn, tmp_path
) -> None:
    """The Dagster asset with the `gee` source: key-file auth, UTM grid request, lineage."""
    import dagster as dg

    from agrifm_pipeline.definitions import build_defs
    from agrifm_pipeline.defs.partitions import tile_year_key
    from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
    from agrifm_pipeline.defs.resources import S2Source

    from .pipeline_helpers import TILES, make_resources

    key = _service_account_key(tmp_path / "key.json", standin.url + "/token")
    resources = make_resources(tmp_path)
    resources["s2"] = S2Source(
        backend="gee",
        gee_project=standin.project,
        gee_service_account_key=key,
        gee_endpoint=standin.url,
    )
    job = build_defs(resources).resolve_job_def("embed_tile_years")
    k = str(tile_year_key(TILES[1], 2019))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tiles", TILES)
        result = job.execute_in_process(
            instance=instance,
            tags={RANGE_START: k, RANGE_END: k},
            asset_selection=[dg.AssetKey("s2_frame_stack")],
        )
    assert result.success
    # Authenticated with the key: a signed JWT grant, then the bearer token on every call.
    assert standin.tokens and standin.tokens[0]["grant_type"].endswith("jwt-bearer")
    assert all(h.startswith("Bearer standin-token-") for h in standin.auth_headers)
    # One pixel request on the tile's UTM grid at 10 m.
    (body,) = standin.bodies("image:computePixels")
    grid = body["grid"]
    assert grid["crsCode"] == "EPSG:32631" and grid["affineTransform"]["scaleX"] == 10
    assert grid["affineTransform"]["translateX"] == 449 * 1280
    (mat,) = result.asset_materializations_for_node("s2_frame_stack")
    lineage = mat.metadata["lineage"].value
    assert (
        lineage["acquisition"]["provider"] == "gee" and len(lineage["acquisition"]["frames"]) == 8
    )
    stack = resources["storage"].store("s2_frame_stack").open(2019, TILES[1])["frames"]
    assert stack.shape == (8, 10, 128, 128)
    np.testing.assert_array_equal(
        stack.values[0, 2], _expected(Tile.from_id(TILES[1]).geobox(), "f0_B4")
    )
