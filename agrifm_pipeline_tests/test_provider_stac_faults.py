"""Faults between the ``stac`` provider and its archive, injected by the test front over
the real protocols (a STAC API on PostgreSQL, COGs on moto's S3, a SAS-token service).

Every fault ends in a retry that succeeds (the frames then equal the ``local``
provider's, and the retries are counted by reason, one per fault injected) or in a
named failure (item, asset, HTTP status, attempts); with ``on_read_error="record"``
a granule that cannot be read is left out and counted, never read as no data. Each
test has a front of its own (GDAL's and the session's connections never carry a
previous test's state over).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from odc.geo.geobox import GeoBox

from agrifm_pipeline.errors import SourceRequestError
from agrifm_pipeline.frames import range_windows
from agrifm_pipeline.providers.base import CloudMask, FrameStack
from agrifm_pipeline.providers.local import LocalProvider
from agrifm_pipeline.providers.stac import StacProvider
from agrifm_pipeline.providers.stac_http import RetryPolicy
from agrifm_pipeline.providers.stac_profiles import PLANETARY_COMPUTER_ASSETS
from agrifm_pipeline.specs import SensorSpec

from .stac_testbed import (
    MAIN,
    PLANETARY,
    THROTTLED_403,
    Fault,
    FaultFront,
    StacArchive,
    StacBed,
    _local_copy,
)


@pytest.fixture(autouse=True)
def _published(stac_archive: StacArchive) -> None:
    """Every test here reads the session's archive: published before any of them runs."""


SAMPLE = GeoBox.from_bbox((574680.0, 5621800.0, 575320.0, 5622440.0), "EPSG:32631", resolution=10)
WINDOWS = range_windows("2019-05-06", "2019-05-17", 1)  # 05-06, 05-11, 05-16: all clear
POLICY = RetryPolicy(max_attempts=4, backoff_s=0.5, max_backoff_s=4.0, read_timeout_s=0.5)


class Run:
    """A provider on its own front, sleeping nothing (the waits are recorded instead)."""

    def __init__(self, bed: StacBed, **kw: Any) -> None:
        self.front: FaultFront = bed.front()
        self.waits: list[float] = []
        kw.setdefault("retry", POLICY)
        profile = kw.pop("profile", "earth-search")
        if profile == "planetary-computer":
            kw.update(collection=PLANETARY, sas_url=self.front.url + "/sas")
        kw.setdefault("collection", MAIN)
        self.provider = StacProvider(profile, api_url=self.front.url, sleep=self.waits.append, **kw)

    def fetch(self) -> FrameStack:
        return self.provider.fetch(SAMPLE, WINDOWS, SensorSpec(), CloudMask())


@pytest.fixture(scope="module")
def reference(stac_archive: StacArchive) -> FrameStack:
    return LocalProvider(stac_archive.local[MAIN]).fetch(SAMPLE, WINDOWS, SensorSpec(), CloudMask())


def _retried(got: FrameStack, front: FaultFront, reason: str, n: int) -> None:
    """``n`` faults injected, ``n`` retries counted under ``reason``, nothing missing."""
    assert sum(front.injected().values()) == n
    assert got.extra["http_retries"] == n
    assert got.extra["http_retries_by_reason"] == {reason: n}
    assert got.extra["missing"] == []


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault("status", r"^/search", times=2, status=429), "HTTP 429"),
        (Fault("status", r"^/search", times=1, status=503), "HTTP 503"),
        (Fault("status", r"^/search", times=2, status=403, body=THROTTLED_403),
         "HTTP 403 Forbidden (throttled)"),
        (Fault("drop", r"^/search", times=1), "connection failed (refused, reset or dropped)"),
    ],
    ids=["429", "503", "403-throttled", "dropped"],
)  # fmt: skip
def test_a_search_is_retried(
    stac_bed: StacBed, reference: FrameStack, fault: Fault, reason: str
) -> None:
    run = Run(stac_bed)
    run.front.add(fault)
    got = run.fetch()
    np.testing.assert_array_equal(got.data.values, reference.data.values)
    _retried(got, run.front, reason, fault.times)
    assert len(run.waits) == fault.times and all(0.25 <= w <= 4.0 for w in run.waits)


def test_a_refused_search_fails_at_once_naming_the_api_and_status(stac_bed: StacBed) -> None:
    run = Run(stac_bed)
    run.front.add(Fault("status", r"^/search", times=9, status=403,
                        body=b'{"message":"Missing Authentication Token"}'))  # fmt: skip
    with pytest.raises(SourceRequestError, match=r"search of Earth Search .* HTTP 403") as info:
        run.fetch()
    assert (info.value.status, info.value.attempts) == (403, 1)
    assert "Missing Authentication Token" in str(info.value) and run.waits == []


def test_a_search_failing_past_its_bound_is_named_and_counted(stac_bed: StacBed) -> None:
    run = Run(stac_bed)
    run.front.add(Fault("status", r"^/search", times=99, status=503))
    with pytest.raises(SourceRequestError, match=r"HTTP 503, 4 attempt\(s\)") as info:
        run.fetch()
    assert (info.value.status, info.value.attempts) == (503, 4)
    assert sum(run.front.injected().values()) == 4 and len(run.waits) == 3
    # Jittered exponential waits: half fixed, half random, doubling from 0.5 s.
    for n, wait in enumerate(run.waits):
        cap = min(4.0, 0.5 * 2**n)
        assert cap / 2 <= wait <= cap


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault("status", r"/blue\.tif", times=2, status=503), "HTTP 503"),
        (Fault("status", r"/scl\.tif", times=1, status=429), "HTTP 429"),
        (Fault("status", r"/nir\.tif", times=1, status=500), "HTTP 500"),
        (Fault("status", r"/rededge1\.tif", times=1, status=403, body=THROTTLED_403),
         "HTTP 403 Forbidden (throttled)"),
        (Fault("drop", r"/red\.tif", times=2), "connection failed (refused, reset or dropped)"),
        (Fault("cut", r"/green\.tif", times=1), "body cut short"),
        (Fault("slow", r"/swir16\.tif", times=1, delay_s=1.5), "timed out"),
    ],
    ids=["503", "429", "500", "403-throttled", "dropped", "cut-short", "slow-first-byte"],
)  # fmt: skip
def test_a_read_is_retried(
    stac_bed: StacBed, reference: FrameStack, fault: Fault, reason: str
) -> None:
    run = Run(stac_bed)
    run.front.add(fault)
    got = run.fetch()
    np.testing.assert_array_equal(got.data.values, reference.data.values)
    _retried(got, run.front, reason, fault.times)
    assert [f.items for f in got.frames] == [
        {"found": 3, "merged": 0, "over_cloudy_pct": 0, "skipped_by_scl": 0, "read": 3, "failed": 0}
    ]


def test_a_read_failing_for_good_fails_the_tile_year_naming_item_asset_status(
    stac_bed: StacBed, stac_archive: StacArchive
) -> None:
    item = stac_archive.item(MAIN, "2019-05-11")["id"]
    run = Run(stac_bed)
    run.front.add(Fault("status", rf"{item}/nir\.tif", times=99, status=503))
    with pytest.raises(SourceRequestError) as info:
        run.fetch()
    err = info.value
    assert (err.item, err.asset, err.status, err.attempts) == (item, "B8", 503, 4)
    assert f"reading {item} asset nir" in str(err) and "HTTP 503, 4 attempt(s)" in str(err)
    assert "on_read_error='record'" in str(err)


def test_a_missing_file_fails_at_once_with_404(
    stac_bed: StacBed, stac_archive: StacArchive
) -> None:
    item = stac_archive.item(MAIN, "2019-05-16")["id"]
    run = Run(stac_bed)
    run.front.add(Fault("status", rf"{item}/swir22\.tif", times=99, status=404, body=b"NoSuchKey"))
    with pytest.raises(SourceRequestError, match="does not hold") as info:
        run.fetch()
    assert (info.value.item, info.value.status, info.value.attempts) == (item, 404, 1)


def test_recorded_read_failures_are_counted_missing_observations_not_no_data(
    stac_bed: StacBed, stac_archive: StacArchive, tmp_path: Any
) -> None:
    """on_read_error=record: 05-11's red band fails for good; the granule is left out
    (its other bands are not used either), counted in its frame and named, and the
    frame is the composite of the two other scenes, exactly."""
    item = stac_archive.item(MAIN, "2019-05-11")["id"]
    run = Run(stac_bed, on_read_error="record")
    run.front.add(Fault("status", rf"{item}/red\.tif", times=99, status=503))
    got = run.fetch()
    assert got.frames[0].items == {"found": 3, "merged": 0, "over_cloudy_pct": 0,
                                   "skipped_by_scl": 0, "read": 2, "failed": 1}  # fmt: skip
    (missing,) = got.extra["missing"]
    assert missing == {"item": item, "asset": "red", "url": missing["url"], "status": 503,
                       "reason": "HTTP 503", "attempts": 4}  # fmt: skip
    without = _local_copy(tmp_path / "without", stac_archive.scenes, ["2019-05-06", "2019-05-16"])
    ref = LocalProvider(without).fetch(SAMPLE, WINDOWS, SensorSpec(), CloudMask())
    np.testing.assert_array_equal(got.data.values, ref.data.values)
    assert got.frames[0].clear_fraction == ref.frames[0].clear_fraction


def test_a_recorded_scl_failure_leaves_the_granule_out(
    stac_bed: StacBed, stac_archive: StacArchive, tmp_path: Any
) -> None:
    item = stac_archive.item(MAIN, "2019-05-16")["id"]
    run = Run(stac_bed, on_read_error="record")
    run.front.add(Fault("drop", rf"{item}/scl\.tif", times=99))
    got = run.fetch()
    assert got.frames[0].items["failed"] == 1 and got.extra["missing"][0]["asset"] == "scl"
    assert not run.front.requests(rf"{item}/blue\.tif")  # its bands are never read
    without = _local_copy(tmp_path / "without", stac_archive.scenes, ["2019-05-06", "2019-05-11"])
    ref = LocalProvider(without).fetch(SAMPLE, WINDOWS, SensorSpec(), CloudMask())
    np.testing.assert_array_equal(got.data.values, ref.data.values)


def test_an_expired_token_is_fetched_again_and_the_read_retried(
    stac_bed: StacBed, stac_archive: StacArchive
) -> None:
    """The Planetary Computer profile: the storage refuses every token issued so far (403
    AuthenticationFailed, as for an expired one): the provider drops its token, fetches
    a new one and reads again. The token service answering 503 is retried too."""
    run = Run(stac_bed, profile="planetary-computer")
    windows = range_windows("2019-05-06", "2019-05-17", 1)
    ref = LocalProvider(stac_archive.local[PLANETARY]).fetch(
        SAMPLE, windows, SensorSpec(), CloudMask()
    )
    run.front.add(Fault("status", r"^/sas/token/", times=1, status=503))
    first = run.provider.fetch(SAMPLE, windows, SensorSpec(), CloudMask())
    np.testing.assert_array_equal(first.data.values, ref.data.values)
    assert first.extra["http_retries_by_reason"] == {"HTTP 503": 1}
    run.front.expire_tokens()
    again = run.provider.fetch(SAMPLE, windows, SensorSpec(), CloudMask())
    np.testing.assert_array_equal(again.data.values, ref.data.values)
    # Every read in flight with the old token is refused once (they run in parallel) and
    # retried with the one new token.
    refused = sum(r[2] == 403 for r in run.front.requests(r"^/devstoreaccount1/"))
    assert refused >= 1
    assert again.extra["http_retries_by_reason"] == {
        "HTTP 403 (token refused: signed again)": refused
    }
    assert len(run.front.requests(r"^/sas/token/")) == 3  # 503, the first token, the second


def test_reading_blobs_unsigned_is_refused_with_the_fix(stac_bed: StacBed) -> None:
    """A custom profile over the Planetary Computer-style collection, without signing:
    the storage answers 409 (public access not permitted), named with the fix."""
    run = Run(stac_bed, profile="custom", collection=PLANETARY,
              assets=json.dumps(PLANETARY_COMPUTER_ASSETS))  # fmt: skip
    with pytest.raises(SourceRequestError, match="planetary-computer") as info:
        run.provider.fetch(SAMPLE, WINDOWS, SensorSpec(), CloudMask())
    assert (info.value.status, info.value.attempts) == (409, 1)
