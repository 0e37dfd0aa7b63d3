"""The Earth Engine provider: the real earthengine-api client against the computing stand-in.

The stand-in (``ee_standin``) evaluates the expressions the provider sends
over the bundled real scenes, so the frames the provider returns are compared
with the local provider's frames from the same scenes and settings.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path

import google.oauth2.credentials
import numpy as np
import pytest
from odc.geo.geobox import GeoBox

from agrifm_pipeline.errors import NoCoverageError, ProviderError, SettingsError
from agrifm_pipeline.frames import FrameWindow, frame_windows, range_windows
from agrifm_pipeline.providers.base import CloudMask, FrameRecord, FrameStack
from agrifm_pipeline.providers.gee import (
    EE_MAX_REQUEST_BANDS,
    HIGH_VOLUME_ENDPOINT,
    EarthEngineProvider,
    backfill,
    band_groups,
    blocks,
    classify,
    group_acquisitions,
    is_retryable,
    pixel_grid,
)
from agrifm_pipeline.providers.local import LocalProvider
from agrifm_pipeline.specs import SensorSpec
from agrifm_pipeline.tiles import Tile

from .ee_standin import SAMPLE_DIR, StandIn, catalog_from_directory, compute_pixels, ee_standin

SAMPLE = GeoBox.from_bbox((574680.0, 5621800.0, 575320.0, 5622440.0), "EPSG:32631", resolution=10)
OVERLAP_DATE, REDELIVERED_DATE = "2019-04-16", "2019-05-11"


@pytest.fixture
def standin() -> Iterator[StandIn]:
    catalog = catalog_from_directory(overlapping=(OVERLAP_DATE,), redelivered=(REDELIVERED_DATE,))
    with ee_standin(catalog=catalog) as s:
        yield s


def _provider(s: StandIn, tmp_path: Path, **kw) -> EarthEngineProvider:
    creds = google.oauth2.credentials.Credentials(token="test-token")
    kw.setdefault("slots_dir", tmp_path / "slots")
    return EarthEngineProvider(
        project=s.project, credentials=creds, endpoint=s.url, sleep=lambda _: None, **kw
    )


def assert_same_stack(gee: FrameStack, local: FrameStack) -> None:
    """The same frames to the DN, and the same record frame by frame.

    Exactly, not within 1 DN: an even count's median is a half-integer on both sides
    (Earth Engine's median reducer gives the mean of the two middle values, a double),
    and both round it half up (Earth Engine's ``round``: 10.5 -> 11; the local
    compositor's ``(a + b + 1) // 2``). A median left unrounded is truncated by the
    integer cast, 1 DN off at every such value, which a 1 DN tolerance would not see.
    """
    a, b = gee.data.values.astype(np.int32), local.data.values.astype(np.int32)
    assert a.shape == b.shape
    differ = a != b
    assert not differ.any(), (
        f"{int(differ.sum())} values differ (largest {int(np.abs(a - b).max())} DN)"
    )
    assert len(gee.frames) == len(local.frames)
    for g, lo in zip(gee.frames, local.frames, strict=True):
        assert (g.index, g.start, g.end) == (lo.index, lo.start, lo.end)
        assert g.n_scenes == lo.n_scenes
        assert [s[:10] for s in g.scenes] == lo.scenes  # acquisition ids start with the date
        assert g.clear_fraction == pytest.approx(lo.clear_fraction)
        assert (g.backfilled, g.backfill_source) == (lo.backfilled, lo.backfill_source)


def _fetch_both(
    s: StandIn, tmp_path: Path, root: Path, windows: list[FrameWindow], sensor: SensorSpec,
    cloud_mask: CloudMask | None = None, **kw,
) -> tuple[FrameStack, FrameStack]:  # fmt: skip
    mask = cloud_mask or CloudMask()
    gee = _provider(s, tmp_path, **kw).fetch(SAMPLE, windows, sensor, mask)
    return gee, LocalProvider(root).fetch(SAMPLE, windows, sensor, mask)


def _pixel_bodies(s: StandIn) -> list[dict]:
    return s.bodies("image:computePixels")


# --- parity with the local provider ------------------------------------------------------


def test_2019_t8_equals_local_with_a_duplicated_granule(standin: StandIn, tmp_path: Path) -> None:
    windows = frame_windows(2019, 8)
    gee, local = _fetch_both(standin, tmp_path, SAMPLE_DIR, windows, SensorSpec())
    assert_same_stack(gee, local)
    # Differences exist to be found: frames are real and differ between windows.
    assert len({int(gee.data.values[i, 6].mean()) for i in range(7)}) == 7
    # 2019 ends on 10-28 in the sample: the last window has no acquisition, back-filled.
    assert gee.frames[7].n_scenes == 0 and gee.frames[7].backfill_source == "whole_range"
    # The overlapping granule and the older delivery are merged: acquisitions are counted.
    assert gee.extra["granules_in_range"] == gee.extra["scenes_in_range"] + 2
    assert gee.extra["granules_merged"] == 2
    # One granule list and one pixel request (the back-fill source rides along).
    assert [p.split("?")[0].rsplit("/", 1)[1] for m, p, _ in standin.requests if m == "POST"] == [
        "value:compute",
        "image:computePixels",
    ]
    assert gee.extra["requests"] == 2 and gee.extra["retries"] == 0


def _redated(root: Path, years: int, first: dt.date) -> Path:
    """The sample moved by ``years``, keeping only scenes from ``first`` on (the collection's start)."""
    manifest = json.loads((SAMPLE_DIR / "manifest.json").read_text())
    (root / "masks").mkdir(parents=True)
    kept = []
    for entry in manifest["dates"]:
        day = dt.date.fromisoformat(entry["date"])
        new = day.replace(year=day.year + years)
        if new < first:
            continue
        for sub in ("", "masks/"):
            os.symlink(SAMPLE_DIR / f"{sub}{day}.tif", root / f"{sub}{new}.tif")
        kept.append({**entry, "date": new.isoformat()})
    (root / "manifest.json").write_text(json.dumps({"dates": kept}))
    return root


def test_2017_windows_before_the_collection_are_backfilled(tmp_path: Path) -> None:
    # The sample two years earlier: 2017 starts before S2_SR_HARMONIZED (2017-03-28).
    root = _redated(tmp_path / "s2_2017", -2, dt.date(2017, 3, 28))
    with ee_standin(catalog=catalog_from_directory(root)) as s:
        windows = frame_windows(2017, 8)
        gee, local = _fetch_both(s, tmp_path, root, windows, SensorSpec())
        assert_same_stack(gee, local)
        assert gee.frames[0].n_scenes == 0 and gee.frames[0].backfill_source == "whole_range"
        # Windows without acquisitions are never sent (no band-less image to rename).
        (body,) = _pixel_bodies(s)
        sent = {b.split("_")[0] for b in body["bandIds"]}
        assert "f0" not in sent and "all" in sent


def test_window_with_only_cloudy_scenes_is_backfilled(standin: StandIn, tmp_path: Path) -> None:
    # 2018-11-27 and 12-02 are fully cloudy; 12-07 is too, 12-12 nearly clear.
    windows = range_windows("2018-11-17", "2018-12-17", 3)
    sensor = SensorSpec(cloudy_pct=100, fill_value=7.5)
    gee, local = _fetch_both(standin, tmp_path, SAMPLE_DIR, windows, sensor)
    assert_same_stack(gee, local)
    assert gee.frames[1].n_scenes == 2 and gee.frames[1].backfill_source == "whole_range"
    # Pixels with nothing clear in window 2 carry the fill value rounded as locally (8).
    assert 0 < gee.frames[2].clear_fraction < 1
    assert (gee.data.values[2] == 8).all(axis=0).any()
    # The empty window was found in the pixels: the back-fill source came in a second round.
    assert len(_pixel_bodies(standin)) == 2


@pytest.mark.parametrize(
    ("composite", "mode", "fill"), [("mosaic", "scl", 0.0), ("median", "none", 2.5)]
)
def test_mosaic_and_unmasked_settings_equal_local(
    standin: StandIn, tmp_path: Path, composite: str, mode: str, fill: float
) -> None:
    windows = frame_windows(2019, 4)
    sensor = SensorSpec(composite=composite, fill_value=fill, cloudy_pct=60)
    gee, local = _fetch_both(standin, tmp_path, SAMPLE_DIR, windows, sensor, CloudMask(mode=mode))
    assert_same_stack(gee, local)


def _records(n: int) -> list[FrameRecord]:
    day = dt.date(2020, 1, 1)
    return [FrameRecord(i, day, day, n_scenes=1, clear_fraction=0.5) for i in range(n)]


def test_backfill_takes_the_whole_range_then_the_nearest_window() -> None:
    frames = [np.full((2, 2, 2), v, np.uint16) for v in (10, 0, 30, 0)]
    whole = (np.full((2, 2, 2), 99, np.uint16), np.array([[True, False], [False, False]]))
    records = _records(4)
    backfill(frames, records, [False, True, False, True], whole)
    assert [int(f[0, 0, 0]) for f in frames] == [10, 99, 30, 99]
    assert [r.backfill_source for r in records] == [None, "whole_range", None, "whole_range"]
    assert records[1].clear_fraction == 0.25 and not records[0].backfilled
    # Without a whole-range composite (or with nothing clear in it): the nearest, earlier on ties.
    frames = [np.full((2, 2, 2), v, np.uint16) for v in (10, 0, 30, 0)]
    records = _records(4)
    backfill(frames, records, [False, True, False, True], (whole[0], np.zeros((2, 2), bool)))
    assert [int(f[0, 0, 0]) for f in frames] == [10, 10, 30, 30]
    assert [r.backfill_source for r in records] == [None, "frame:0", None, "frame:2"]


def test_no_granule_is_told_apart_from_no_coverage(standin: StandIn, tmp_path: Path) -> None:
    provider = _provider(standin, tmp_path)
    # Covered, but nothing in the range: the dates or the cloud filter are to change.
    with pytest.raises(ProviderError, match=r"no Sentinel-2 granule .* widen the range") as err:
        provider.fetch(
            SAMPLE, range_windows("2019-11-01", "2019-12-01", 2), SensorSpec(), CloudMask()
        )
    assert not isinstance(err.value, NoCoverageError)
    # Outside every granule: no setting helps.
    far = GeoBox.from_bbox((300000.0, 5000000.0, 300640.0, 5000640.0), "EPSG:32631", resolution=10)
    with pytest.raises(NoCoverageError, match="COPERNICUS/S2_SR_HARMONIZED covers"):
        provider.fetch(far, frame_windows(2019, 2), SensorSpec(), CloudMask())
    assert not _pixel_bodies(standin)


def test_the_duplicates_matter_without_merging(standin: StandIn, tmp_path: Path) -> None:
    """A median over granules (no merging) differs with the duplicated granules: the parity
    tests above have something to catch."""
    import io

    import ee

    _provider(standin, tmp_path).initialise()
    bands = list(SensorSpec().bands)
    win = [w for w in frame_windows(2019, 8) if w.contains(dt.date.fromisoformat(OVERLAP_DATE))]
    col = ee.ImageCollection("COPERNICUS/S2_SR_HARMONIZED").filterDate(
        win[0].start.isoformat(), win[0].end.isoformat()
    )
    naive = col.select(bands).median().round().unmask(0).toUint16()
    body = {
        "expression": ee.serializer.encode(naive, for_cloud_api=True),
        "bandIds": bands,
        "grid": pixel_grid(SAMPLE, (slice(0, 64), slice(0, 64))),
    }
    with_duplicates = np.load(io.BytesIO(compute_pixels(standin.catalog, body)))
    without = np.load(io.BytesIO(compute_pixels(catalog_from_directory(), body)))
    changed = [(with_duplicates[b] != without[b]).mean() for b in bands]
    assert min(changed) > 0.1


def _granules(rows: list[tuple[str, str, str, int, str, int]]) -> dict[str, list]:
    keys = ("system:index", "system:time_start", "SPACECRAFT_NAME", "SENSING_ORBIT_NUMBER",
            "MGRS_TILE", "GENERATION_TIME")  # fmt: skip
    out: dict[str, list] = {k: [] for k in keys}
    for idx, day, craft, orbit, tile, gen in rows:
        t = int(dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp() * 1000)
        for k, v in zip(keys, (idx, t, craft, orbit, tile, gen), strict=True):
            out[k].append(v)
    return out


def test_granules_merge_into_acquisitions() -> None:
    acqs = group_acquisitions(
        _granules(
            [
                ("a_new", "2020-05-01T10:40:00", "Sentinel-2A", 51, "31UES", 20),
                ("a_old", "2020-05-01T10:40:00", "Sentinel-2A", 51, "31UES", 10),
                ("a_neighbour", "2020-05-01T10:40:05", "Sentinel-2A", 51, "31UER", 10),
                ("b_same_day", "2020-05-01T10:50:00", "Sentinel-2B", 8, "31UES", 10),
                ("c", "2020-05-06T10:40:00", "Sentinel-2A", 51, "31UES", 10),
            ]
        )
    )
    assert [a.id for a in acqs] == [
        "2020-05-01_S2A_R051",
        "2020-05-01_S2B_R008",
        "2020-05-06_S2A_R051",
    ]
    assert acqs[0].granules == ["a_new", "a_neighbour"] and acqs[0].superseded == ["a_old"]
    with pytest.raises(ProviderError, match="unequal length"):
        group_acquisitions({"system:index": ["x", "y"], "system:time_start": [1]})


# --- retries on Earth Engine's real answers ----------------------------------------------


def test_real_error_texts_and_dropped_connections_are_retried(
    standin: StandIn, tmp_path: Path
) -> None:
    provider = _provider(standin, tmp_path)
    provider.initialise()
    standin.fail_next(1, 400, "Too many concurrent aggregations.")  # message, whatever the status
    standin.fail_next(1, 503, "Earth Engine capacity exceeded.")
    standin.fail_next(1, 429, "Quota exceeded for quota metric 'Concurrent requests'.")
    standin.drop_next(1)  # connection closed without an answer
    stack = provider.fetch(SAMPLE, frame_windows(2019, 2), SensorSpec(), CloudMask())
    assert stack.extra["retries"] == 4 and stack.data.shape == (2, 10, 64, 64)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_status_of_the_chained_http_error_decides(
    standin: StandIn, tmp_path: Path, status: int
) -> None:
    import ee

    _provider(standin, tmp_path).initialise()
    standin.fail_next(1, status, "some text no marker matches")
    with pytest.raises(ee.EEException) as err:
        ee.Number(1).getInfo()
    assert "http" not in str(err.value).lower()  # the client keeps only the message
    assert classify(err.value) == "retry"


def test_bad_requests_fail_at_once_with_a_hint(standin: StandIn, tmp_path: Path) -> None:
    provider = _provider(standin, tmp_path)
    provider.initialise()
    standin.fail_next(1, 400, "Image.select: Pattern 'B99' did not match any bands.")
    with pytest.raises(ProviderError, match="refused") as err:
        provider.fetch(SAMPLE, frame_windows(2019, 2), SensorSpec(), CloudMask())
    assert provider.stats["retries"] == 0
    assert "lacks bands" in str(err.value) and "S2_SR_HARMONIZED" in str(err.value)
    assert not is_retryable(Exception("User memory limit exceeded."))


def test_persistent_503_gives_up_with_a_clear_error(standin: StandIn, tmp_path: Path) -> None:
    provider = _provider(standin, tmp_path, max_attempts=3)
    provider.initialise()
    before = len(standin.bodies("value:compute"))
    standin.fail_next(10, 503, "The service is currently unavailable.")
    with pytest.raises(ProviderError, match="after 3 attempts"):
        provider.fetch(SAMPLE, frame_windows(2019, 2), SensorSpec(), CloudMask())
    assert len(standin.bodies("value:compute")) - before == 3


def test_computation_timed_out_splits_the_block(standin: StandIn, tmp_path: Path) -> None:
    windows = frame_windows(2019, 8)
    # Above half the sample's pixels x 88 bands the stand-in answers "Computation timed out.".
    standin.timeout_above_px = 64 * 32 * 88
    provider = _provider(standin, tmp_path)
    stack = provider.fetch(SAMPLE, windows, SensorSpec(), CloudMask())
    assert stack.extra["splits"] == 1 and stack.extra["retries"] == 0
    heights = [b["grid"]["dimensions"]["height"] for b in _pixel_bodies(standin)]
    assert heights == [64, 32, 32]
    assert_same_stack(
        stack, LocalProvider(SAMPLE_DIR).fetch(SAMPLE, windows, SensorSpec(), CloudMask())
    )


# --- limits, grid, collection ------------------------------------------------------------


def test_band_groups_stay_under_the_band_limit() -> None:
    tags = [f"f{i}" for i in range(100)] + ["all"]
    groups = band_groups(tags, 11, 1023)
    assert [t for g in groups for t in g] == tags
    assert all(len(g) * 11 <= 1023 < EE_MAX_REQUEST_BANDS + 1 for g in groups) and len(groups) == 2
    with pytest.raises(SettingsError, match="max_request_bands"):
        band_groups(tags, 11, 10)


def test_requests_split_by_bands_and_bytes_and_reassemble(standin: StandIn, tmp_path: Path) -> None:
    windows = frame_windows(2019, 8)
    standin.max_bytes = 60_000  # the stand-in refuses what Earth Engine would refuse, scaled down
    provider = _provider(standin, tmp_path, max_request_bands=50, max_request_bytes=60_000)
    stack = provider.fetch(SAMPLE, windows, SensorSpec(), CloudMask())
    bodies = _pixel_bodies(standin)
    assert len({tuple(b["bandIds"]) for b in bodies}) == 2  # 8 frames in groups of 4
    covered = 0
    for body in bodies:
        d = body["grid"]["dimensions"]
        assert len(body["bandIds"]) <= 50 and d["width"] * d["height"] * 4 * 21 <= 60_000
        covered += d["width"] * d["height"]
    assert covered == 2 * 64 * 64
    assert_same_stack(
        stack, LocalProvider(SAMPLE_DIR).fetch(SAMPLE, windows, SensorSpec(), CloudMask())
    )
    # Row blocks as few as the byte limit allows (a full tile-year: 3 blocks of 896 px rows).
    assert len(blocks((896, 896), 8 * 21)) == 3


def test_a_crs_without_epsg_code_goes_as_wkt(standin: StandIn, tmp_path: Path) -> None:
    crs = "+proj=tmerc +lat_0=0 +lon_0=4.05 +k=1 +x_0=0 +y_0=0 +datum=WGS84 +units=m +no_defs"
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:32631", crs, always_xy=True).transform(575000.0, 5622120.0)
    area = GeoBox.from_bbox((x - 200, y - 200, x + 200, y + 200), crs, resolution=10)
    assert area.crs is not None and area.crs.epsg is None
    windows = frame_windows(2019, 2)
    stack = _provider(standin, tmp_path).fetch(area, windows, SensorSpec(), CloudMask())
    (body,) = _pixel_bodies(standin)
    assert "crsCode" not in body["grid"] and "TRANSVERSE" in body["grid"]["crsWkt"].upper()
    local = LocalProvider(SAMPLE_DIR).fetch(area, windows, SensorSpec(), CloudMask())
    same = np.abs(stack.data.values.astype(int) - local.data.values.astype(int)) <= 1
    assert same.mean() > 0.99  # both sample the scenes by nearest neighbour


def test_non_harmonized_collection_is_refused(standin: StandIn, tmp_path: Path) -> None:
    provider = _provider(standin, tmp_path)
    with pytest.raises(
        SettingsError, match=r"SensorSpec.collection='COPERNICUS/S2_SR'.*S2_SR_HARMONIZED"
    ):
        provider.fetch(
            SAMPLE, frame_windows(2019, 2), SensorSpec(collection="COPERNICUS/S2_SR"), CloudMask()
        )
    assert not standin.bodies("value:compute")


def test_settings_are_checked() -> None:
    creds = google.oauth2.credentials.Credentials(token="x")
    assert (
        EarthEngineProvider(project="p", credentials=creds, endpoint="highvolume").endpoint
        == HIGH_VOLUME_ENDPOINT
    )
    for bad in ({"max_concurrent": 40}, {"deployment_slots": 40}, {"max_request_bands": 1025}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            EarthEngineProvider(project="p", credentials=creds, **bad)


# --- initialisation ----------------------------------------------------------------------


def test_missing_key_file(tmp_path: Path) -> None:
    provider = EarthEngineProvider(project="p", service_account_key=tmp_path / "key.json",
                                   slots_dir=tmp_path / "slots")  # fmt: skip
    with pytest.raises(ProviderError, match="does not exist"):
        provider.initialise()


def _service_account_key(path: Path, token_uri: str) -> str:
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


def test_initialised_once_per_process_with_cached_credentials(
    standin: StandIn, tmp_path: Path
) -> None:
    from agrifm_pipeline.providers import gee

    key = _service_account_key(tmp_path / "key.json", standin.url + "/token")
    before = gee.INIT_COUNT["initialize"]
    for _ in range(2):  # two providers, as two assets of one process build them
        provider = EarthEngineProvider(project=standin.project, service_account_key=key,
                                       endpoint=standin.url, slots_dir=tmp_path / "slots")  # fmt: skip
        for _ in range(2):
            provider.fetch(SAMPLE, frame_windows(2019, 2), SensorSpec(), CloudMask())
    assert gee.INIT_COUNT["initialize"] - before == 1
    # One ee.Initialize asks for the discovery document twice (two API resources), once in all.
    assert standin.discovery_requests() == 2
    assert len(standin.tokens) == 1  # the credentials (and their token) were reused


def test_equal_credentials_built_afresh_initialise_once(standin: StandIn, tmp_path: Path) -> None:
    for _ in range(3):  # each provider gets its own Credentials object with the same token
        _provider(standin, tmp_path).fetch(
            SAMPLE, frame_windows(2019, 2), SensorSpec(), CloudMask()
        )
    assert standin.discovery_requests() == 2 and len(standin.bodies("value:compute")) == 3


# --- the pipeline ------------------------------------------------------------------------


def test_pipeline_acquires_from_earth_engine_with_a_service_account(
    standin: StandIn, tmp_path: Path
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
    (body,) = _pixel_bodies(standin)
    grid = body["grid"]
    assert grid["crsCode"] == "EPSG:32631" and grid["affineTransform"]["scaleX"] == 10
    assert grid["affineTransform"]["translateX"] == 449 * 1280
    (mat,) = result.asset_materializations_for_node("s2_frame_stack")
    lineage = mat.metadata["lineage"].value
    assert (
        lineage["acquisition"]["provider"] == "gee" and len(lineage["acquisition"]["frames"]) == 8
    )
    stored = resources["storage"].store("s2_frame_stack").open(2019, TILES[1])["frames"]
    geobox = Tile.from_id(TILES[1]).geobox()
    local = LocalProvider(SAMPLE_DIR).fetch(
        geobox, frame_windows(2019, 8), SensorSpec(), CloudMask()
    )
    assert stored.shape == (8, 10, 128, 128)
    np.testing.assert_array_equal(stored.values, local.data.values)
