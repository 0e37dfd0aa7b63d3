"""The ``stac`` provider's rules without a server: profiles and their settings, items to
granules (baseline, offset, acquisition, solar day), duplicates, the offset on dark
pixels, nearest-neighbour reads onto the tile grid, retry classification and bounds,
signing addresses, and how the deployment's environment selects it.

The same provider against a real STAC API and COGs over HTTP, with injected faults, is
in ``test_provider_stac_archive.py``, ``test_provider_stac_faults.py`` and
``test_provider_stac_changes.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import pickle
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from odc.geo.geobox import GeoBox
from rasterio.io import MemoryFile

from agrifm_pipeline.definitions import _s2_from_env
from agrifm_pipeline.errors import ProviderError, SettingsError
from agrifm_pipeline.providers import make_provider, real_data_providers
from agrifm_pipeline.providers.base import FrameRecord
from agrifm_pipeline.providers.stac import (
    StacProvider,
    check_on_read_error,
    dedupe,
    granule_of,
    harmonize,
    observations,
    read_onto,
)
from agrifm_pipeline.providers.stac_http import (
    Counters,
    Permanent,
    RequestFailed,
    RetryPolicy,
    Transient,
    blob_container,
    classify_status,
    retrying,
)
from agrifm_pipeline.providers.stac_profiles import (
    EARTH_SEARCH_ASSETS,
    PROFILES,
    resolve_profile,
)
from agrifm_pipeline.specs import SensorSpec

BANDS = SensorSpec().bands
ES = PROFILES["earth-search"]
PC = PROFILES["planetary-computer"]


def item(iid: str = "S2B_T31UES_20190105T105439_L2A", **props: Any) -> dict[str, Any]:
    base = {
        "datetime": "2019-01-05T10:54:39.024000Z",
        "platform": "sentinel-2b",
        "s2:processing_baseline": "05.10",
        "s2:generation_time": "2023-06-01T00:00:00Z",
        "s2:datatake_id": "GS2B_20190105T105439_009561_N05.10",
        "s2:mgrs_tile": "31UES",
        "eo:cloud_cover": 12.5,
        "updated": "2023-06-02T00:00:00Z",
        "proj:code": "EPSG:32631",
    }
    base.update(props)
    base = {k: v for k, v in base.items() if v is not None}
    return {
        "id": iid,
        "bbox": [4.0, 50.0, 5.5, 51.0],
        "properties": base,
        "assets": {
            key: {"href": f"https://x/{iid}/{key}.tif"} for key in EARTH_SEARCH_ASSETS.values()
        },
    }


# -- profiles and settings ------------------------------------------------------------------------


def test_profiles_and_their_overrides() -> None:
    es = resolve_profile()
    assert (es.api_url, es.collection) == (
        "https://earth-search.aws.element84.com/v1",
        "sentinel-2-c1-l2a",
    )
    assert [es.asset_key(b) for b in (*BANDS, "SCL")] == [
        "blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "swir16",
        "swir22", "scl",
    ]  # fmt: skip
    pc = resolve_profile("planetary-computer")
    assert pc.collection == "sentinel-2-l2a" and pc.signing == "planetary-computer"
    assert [pc.asset_key(b) for b in ("B2", "B8A", "B12", "SCL")] == ["B02", "B8A", "B12", "SCL"]
    mirror = resolve_profile("earth-search", api_url="http://mirror.example/v1/", collection="s2")
    assert (mirror.api_url, mirror.collection, mirror.assets) == (
        "http://mirror.example/v1",
        "s2",
        ES.assets,
    )
    custom = resolve_profile(
        "custom", api_url="https://stac.example", collection="s2l2a",
        assets=json.dumps({"B02": "b2", **{b: b.lower() for b in BANDS if b != "B2"}, "scl": "mask"}),
    )  # fmt: skip
    assert custom.asset_key("B2") == "b2" and custom.asset_key("SCL") == "mask"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (
            {"profile": "sentinel-hub"},
            "not known; use one of earth-search, planetary-computer, custom",
        ),
        ({"profile": "custom", "api_url": "https://x"}, "custom' needs collection, assets"),
        ({"api_url": "earth-search.aws.element84.com"}, "is not an http(s) URL"),
        ({"assets": '{"B2": "blue"'}, "is not valid JSON"),
        ({"assets": {"B2": "blue"}}, "has no SCL asset"),
        ({"assets": {"B13": "x", "SCL": "scl"}}, "'B13', which is not a Sentinel-2 L2A band"),
        ({"harmonize": "always"}, "use 'baseline'"),
    ],
)
def test_profile_errors_name_the_setting_and_the_fix(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(SettingsError, match=words.replace("(", r"\(").replace(")", r"\)")):
        resolve_profile(**kwargs)


def test_a_band_without_an_asset_key_fails_before_any_request() -> None:
    src = StacProvider(
        "earth-search", api_url="http://127.0.0.1:9", assets={"B2": "blue", "SCL": "scl"}
    )
    area = GeoBox.from_bbox((574680, 5621800, 575320, 5622440), "EPSG:32631", resolution=10)
    with pytest.raises(SettingsError, match="no key for band 'B3'"):
        src.fetch(area, [], SensorSpec(), None)  # type: ignore[arg-type]


def test_provider_options_are_checked() -> None:
    assert check_on_read_error(" Record ") == "record"
    with pytest.raises(SettingsError, match="use 'fail'"):
        check_on_read_error("skip")
    with pytest.raises(SettingsError, match="read_workers=0"):
        StacProvider(read_workers=0)
    with pytest.raises(SettingsError, match="max_attempts=0"):
        RetryPolicy(max_attempts=0)
    assert "stac" in real_data_providers()


def test_the_environment_selects_and_checks_the_stac_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("AGRIFM_PIPELINE_STORAGE", str(tmp_path / "store"))
    s2 = _s2_from_env({"AGRIFM_PIPELINE_S2_BACKEND": "stac"})
    options = s2._options()
    assert options["item_cache"] == f"{tmp_path}/store/_sources/stac"
    assert s2.identity() == {
        "name": "stac",
        **{k: v for k, v in ES.as_record().items() if k != "signing"},
    }
    assert isinstance(s2.provider(), StacProvider)
    env = {
        "AGRIFM_PIPELINE_S2_BACKEND": "stac", "AGRIFM_PIPELINE_STAC_PROFILE": "planetary-computer",
        "AGRIFM_PIPELINE_STAC_ITEM_CACHE": "none", "AGRIFM_PIPELINE_STAC_ON_READ_ERROR": "record",
        "AGRIFM_PIPELINE_STAC_READ_WORKERS": "4", "AGRIFM_PIPELINE_STAC_HARMONIZE": "none",
    }  # fmt: skip
    pc = _s2_from_env(env)
    src = pc.provider()
    assert isinstance(src, StacProvider)
    assert (src.profile.name, src.item_cache, src.on_read_error, src.read_workers) == (
        "planetary-computer", None, "record", 4,
    )  # fmt: skip
    assert src.profile.harmonize == "none" and pc.identity()["harmonize"] == "none"
    for name, value, words in (
        ("AGRIFM_PIPELINE_STAC_PROFILE", "custom", "AGRIFM_PIPELINE_STAC_PROFILE: stac profile 'custom' needs"),
        ("AGRIFM_PIPELINE_STAC_ON_READ_ERROR", "ignore", "AGRIFM_PIPELINE_STAC_ON_READ_ERROR='ignore'"),
        ("AGRIFM_PIPELINE_STAC_READ_WORKERS", "many", "AGRIFM_PIPELINE_STAC_READ_WORKERS='many'"),
        ("AGRIFM_PIPELINE_STAC_ASSETS", "blue", "AGRIFM_PIPELINE_STAC_ASSETS: assets is not valid JSON"),
        ("AGRIFM_PIPELINE_STAC_HARMONIZE", "always", "AGRIFM_PIPELINE_STAC_HARMONIZE: harmonize='always'"),
    ):  # fmt: skip
        with pytest.raises(SettingsError, match=words):
            _s2_from_env({"AGRIFM_PIPELINE_S2_BACKEND": "stac", name: value})


def test_the_provider_travels_to_dask_workers_without_its_connections() -> None:
    src = make_provider("stac", api_url="http://127.0.0.1:9", item_cache="/tmp/c")
    assert src.session is not None  # type: ignore[attr-defined]
    copy = pickle.loads(pickle.dumps(src))
    assert copy.gdal_options == {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "GTIFF_SRS_SOURCE": "GEOKEYS",
    }
    assert copy._session_obj is None and copy.session is not None
    assert copy.profile == src.profile  # type: ignore[attr-defined]


def test_frame_records_without_item_counts_are_unchanged() -> None:
    rec = FrameRecord(0, dt.date(2019, 1, 1), dt.date(2019, 2, 1), n_scenes=1)
    assert "items" not in rec.as_record()
    rec.items = {"found": 1}
    assert rec.as_record()["items"] == {"found": 1}


# -- items, baselines, offsets, duplicates ----------------------------------------------------------


def test_the_offset_follows_the_baseline_never_the_date() -> None:
    old_date_new_baseline = granule_of(item(**{"datetime": "2018-05-01T10:00:00Z"}), ES, BANDS)
    assert (old_date_new_baseline.baseline, old_date_new_baseline.offset) == ((5, 10), 1000)
    new_date_old_baseline = granule_of(
        item(**{"datetime": "2023-05-01T10:00:00Z", "s2:processing_baseline": "03.01"}), ES, BANDS
    )
    assert new_date_old_baseline.offset == 0
    assert granule_of(item(**{"s2:processing_baseline": "04.00"}), ES, BANDS).offset == 1000
    uri = "S2A_MSIL2A_20220130T105301_N0400_R051_T31UES_20220130T134006.SAFE"
    from_uri = granule_of(
        item(**{"s2:processing_baseline": None, "s2:product_uri": uri}), ES, BANDS
    )
    assert (from_uri.baseline, from_uri.offset) == ((4, 0), 1000)
    with pytest.raises(ProviderError, match="never from the date alone"):
        granule_of(item(**{"s2:processing_baseline": None}), ES, BANDS)
    served = resolve_profile("custom", api_url="https://x", collection="c",
                             assets=ES.assets, harmonize="none")  # fmt: skip
    assert granule_of(item(**{"s2:processing_baseline": None}), served, BANDS).offset == 0


def test_dark_pixels_stay_observations_and_no_data_stays_no_data() -> None:
    raw = np.array([0, 1, 500, 1000, 1001, 5000, 65535], np.uint16)
    assert harmonize(raw.copy(), 1000).tolist() == [0, 1, 1, 1, 1, 4000, 64535]
    assert harmonize(raw.copy(), 0).tolist() == raw.tolist()


def test_an_acquisition_is_its_mgrs_tile_and_datatake() -> None:
    a = granule_of(item(), ES, BANDS)
    assert (a.tile, a.datatake, a.platform) == ("31UES", "GS2B_20190105T105439_009561", "S2B")
    grid = granule_of(item(**{"s2:mgrs_tile": None, "grid:code": "MGRS-31UES"}), ES, BANDS)
    triple = granule_of(item(**{"s2:mgrs_tile": None, "mgrs:utm_zone": 31, "mgrs:latitude_band": "U",
                                "mgrs:grid_square": "ES"}), ES, BANDS)  # fmt: skip
    bare = granule_of(item(**{"s2:mgrs_tile": None, "s2:datatake_id": None}), ES, BANDS)
    assert grid.tile == triple.tile == bare.tile == "31UES"
    assert bare.datatake == "S2B_20190105T105439"  # from the Earth Search id
    with pytest.raises(ProviderError, match=r"lacks its MGRS tile .* or its datatake"):
        granule_of(item("x1", **{"s2:mgrs_tile": None, "s2:datatake_id": None}), ES, BANDS)


def test_duplicates_keep_the_highest_baseline_then_the_newest_generation() -> None:
    def g(iid: str, pb: str, generated: str, tile: str = "31UES") -> Any:
        return granule_of(item(iid, **{"s2:processing_baseline": pb, "s2:generation_time": generated,
                                       "s2:mgrs_tile": tile,
                                       "s2:datatake_id": f"GS2B_20190105T105439_009561_N{pb}"}), ES, BANDS)  # fmt: skip

    low_new = g("a", "04.00", "2024-01-01T00:00:00Z")
    high_old = g("b", "05.10", "2022-01-01T00:00:00Z")
    high_new = g("c", "05.10", "2023-01-01T00:00:00Z")
    neighbour = g("d", "05.10", "2021-01-01T00:00:00Z", tile="31UFS")
    kept, gone = dedupe([low_new, high_old, high_new, neighbour])
    assert {x.id for x in kept} == {"c", "d"} and {x.id for x in gone} == {"a", "b"}
    (obs,) = observations(kept, 32631)
    assert obs.id == "2019-01-05_S2B" and [x.id for x in obs.granules] == ["c", "d"]


def test_granules_in_the_areas_crs_come_first_in_a_pass() -> None:
    zone32 = granule_of(
        item("a", **{"proj:code": "EPSG:32632", "s2:mgrs_tile": "32ULA"}), ES, BANDS
    )
    zone31 = granule_of(item("b", **{"s2:mgrs_tile": "31UES"}), ES, BANDS)
    (obs,) = observations([zone32, zone31], 32631)
    assert [x.id for x in obs.granules] == ["b", "a"]


def test_the_solar_day_decides_which_day_an_item_is() -> None:
    def day(when: str, west: float, east: float) -> dt.date:
        it = item(**{"datetime": when})
        it["bbox"] = [west, -40.0, east, -39.0]
        return granule_of(it, ES, BANDS).day

    assert day("2018-12-31T23:30:00Z", 164.0, 166.0) == dt.date(2019, 1, 1)  # 10:30 local
    assert day("2019-01-01T21:30:00Z", -171.0, -169.0) == dt.date(2019, 1, 1)
    assert day("2018-12-31T22:40:00Z", 179.0, -179.8) == dt.date(2019, 1, 1)  # across 180


def test_an_item_without_a_mapped_asset_is_named() -> None:
    it = item()
    del it["assets"]["nir08"]
    with pytest.raises(
        ProviderError, match=r"no asset\(s\) B8A \(nir08\).*AGRIFM_PIPELINE_STAC_ASSETS"
    ):
        granule_of(it, ES, BANDS)


def test_changes_are_stamped_by_updated_generation_and_baseline() -> None:
    a = granule_of(item(), ES, BANDS)
    assert a.stamp == "updated 2023-06-02T00:00:00Z generated 2023-06-01T00:00:00Z baseline 05.10"
    bare = granule_of(item(**{"updated": None, "s2:generation_time": None,
                              "s2:processing_baseline": None,
                              "s2:product_uri": "S2B_MSIL2A_20190105T105439_N0211_R051_T31UES_20190105T122414.SAFE"}),
                      ES, BANDS)  # fmt: skip
    assert bare.stamp.startswith("json ") and bare.generation == dt.datetime(
        2019, 1, 5, 12, 24, 14, tzinfo=dt.UTC
    )


# -- pixels -------------------------------------------------------------------------------------


def _dataset(values: np.ndarray, transform: Affine, crs: str = "EPSG:32631") -> Any:
    mem = MemoryFile()
    with mem.open(driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                  dtype=values.dtype.name, crs=crs, transform=transform) as dst:  # fmt: skip
        dst.write(values, 1)
    return mem


def test_a_20m_layer_is_read_onto_10m_by_repeating_each_pixel() -> None:
    scl = np.arange(1, 1 + 16 * 16, dtype=np.uint16).reshape(16, 16)
    mem = _dataset(scl, Affine(20, 0, 500000, 0, -20, 5600000))
    area = GeoBox.from_bbox((500040, 5599800, 500200, 5599960), "EPSG:32631", resolution=10)
    with mem.open() as src:
        got = read_onto(src, area, "uint16")
    # rows 2..9, columns 2..9 of the 20 m grid, each as 2 x 2
    want = np.repeat(np.repeat(scl[2:10, 2:10], 2, 0), 2, 1)
    np.testing.assert_array_equal(got, want)
    outside = GeoBox.from_bbox((500300, 5599700, 500460, 5599860), "EPSG:32631", resolution=10)
    with mem.open() as src:
        partial = read_onto(src, outside, "uint16")
    assert (partial[:, :2] > 0).all() and (partial[:, 2:] == 0).all()  # beyond: no data


def test_a_layer_of_another_zone_is_warped_by_nearest_neighbour() -> None:
    values = np.arange(1, 1 + 64 * 64, dtype=np.uint16).reshape(64, 64)
    mem = _dataset(values, Affine(10, 0, 300000, 0, -10, 5620000), crs="EPSG:32632")
    with mem.open() as src:
        left, bottom, _, _ = rasterio.warp.transform_bounds(src.crs, "EPSG:32631", *src.bounds)
    area = GeoBox.from_bbox(
        (left + 100, bottom + 100, left + 300, bottom + 300), "EPSG:32631", resolution=10
    )
    with mem.open() as src:
        got = read_onto(src, area, "uint16")
    assert set(np.unique(got)) <= set(values.ravel().tolist())  # real values only, never blends


# -- retries and signing ---------------------------------------------------------------------------


def test_statuses_are_retried_or_refused() -> None:
    assert isinstance(classify_status(429, ""), Transient)
    assert all(isinstance(classify_status(s, "x"), Transient) for s in (500, 502, 503, 504))
    throttled = classify_status(403, '{"message":"Forbidden"}')
    assert isinstance(throttled, Transient) and "throttled" in throttled.reason
    assert isinstance(classify_status(403, "<Error><Code>AccessDenied</Code></Error>"), Permanent)
    assert isinstance(classify_status(404, ""), Permanent)
    assert classify_status(503, "", retry_after="7").retry_after == 7.0  # type: ignore[union-attr]


def test_retries_are_bounded_by_attempts_and_by_total_wait() -> None:
    waits: list[float] = []
    counters = Counters()
    calls = iter([Transient("HTTP 503", 503), Transient("HTTP 429", 429, retry_after=3.0)])

    def flaky() -> str:
        exc = next(calls, None)
        if exc is not None:
            raise exc
        return "ok"

    policy = RetryPolicy(max_attempts=5, backoff_s=1.0, max_backoff_s=10.0, max_wait_s=60)
    assert retrying("u", flaky, policy, counters, sleep=waits.append, rng=lambda: 0.0) == "ok"
    assert waits == [0.5, 3.0]  # half the first cap; then the server's Retry-After
    assert counters.record()["retries_by_reason"] == {"HTTP 503": 1, "HTTP 429": 1}

    def down() -> str:
        raise Transient("HTTP 503", 503)

    with pytest.raises(RequestFailed) as info:
        retrying("u", down, RetryPolicy(max_attempts=3, backoff_s=1.0), Counters(),
                 sleep=lambda _: None)  # fmt: skip
    assert (info.value.status, info.value.attempts, info.value.permanent) == (503, 3, False)
    with pytest.raises(RequestFailed, match="gave up: 2 s of waiting spent"):
        retrying("u", down, RetryPolicy(max_attempts=50, backoff_s=1.0, max_wait_s=2.0),
                 Counters(), sleep=lambda _: None, rng=lambda: 1.0)  # fmt: skip

    def refused() -> str:
        raise Permanent("HTTP 404", 404)

    with pytest.raises(RequestFailed) as info:
        retrying("u", refused, RetryPolicy(), Counters(), sleep=lambda _: None)
    assert (info.value.attempts, info.value.permanent) == (1, True)


def test_blob_addresses_name_their_account_and_container() -> None:
    assert blob_container(
        "https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/31/U/ES/2019/01/05/B02.tif"
    ) == ("sentinel2l2a01", "sentinel2-l2")
    assert blob_container("http://127.0.0.1:10000/devstoreaccount1/c/x/B02.tif") == (
        "devstoreaccount1",
        "c",
    )
    with pytest.raises(SettingsError, match="not an Azure blob address"):
        blob_container("https://sentinel-cogs.s3.us-west-2.amazonaws.com/x.tif")
