"""The stand-in's Earth Engine semantics, driven through the real client.

These pin down what the parity tests rely on: masked pixels are excluded,
an even count's median is the mean of the middle two (a float that casts
truncate), an empty collection reduces to a band-less image that fails where
bands are needed, and errors come back in Earth Engine's form.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import google.oauth2.credentials
import numpy as np
import pytest

from .ee_standin import COLLECTION, StandIn, catalog_from_directory, ee_standin

GRID = {
    "dimensions": {"width": 4, "height": 3},
    "affineTransform": {
        "scaleX": 10.0,
        "shearX": 0.0,
        "translateX": 574680.0,
        "shearY": 0.0,
        "scaleY": -10.0,
        "translateY": 5622440.0,
    },
    "crsCode": "EPSG:32631",
}


@pytest.fixture
def standin() -> Iterator[StandIn]:
    import ee

    with ee_standin() as s:
        ee.Initialize(
            credentials=google.oauth2.credentials.Credentials(token="t"),
            project=s.project,
            url=s.url,
        )
        ee.data.setMaxRetries(0)
        yield s


def _pixels(image, bands: list[str]) -> np.ndarray:
    import ee

    return ee.data.computePixels(
        {"expression": image, "fileFormat": "NUMPY_NDARRAY", "bandIds": bands, "grid": GRID}
    )


def test_median_excludes_masked_pixels_and_averages_even_counts(standin: StandIn) -> None:
    import ee

    c = ee.Image.constant
    col = ee.ImageCollection([c(10), c(20), c(40).updateMask(c(0)), c(31)])  # 40 masked
    arr = _pixels(col.median().rename("m"), ["m"])
    assert arr["m"].dtype == np.float64 and (arr["m"] == 20.0).all()
    even = ee.ImageCollection([c(10), c(21)]).median()
    assert (_pixels(even.rename("m"), ["m"])["m"] == 15.5).all()
    assert (_pixels(even.toUint16().rename("m"), ["m"])["m"] == 15).all()  # a cast truncates
    assert (_pixels(even.round().toUint16().rename("m"), ["m"])["m"] == 16).all()
    assert (_pixels(c(2.5).toUint16().rename("m"), ["m"])["m"] == 2).all()


def test_an_empty_collection_gives_a_band_less_image_that_fails(standin: StandIn) -> None:
    """The old provider's expression for a window before the collection starts."""
    import ee

    bands = ["B2", "B3"]
    empty = ee.ImageCollection(COLLECTION).filterDate("2017-01-01", "2017-02-15")
    assert empty.size().getInfo() == 0
    median = empty.select(bands).median()
    with pytest.raises(ee.EEException, match=r"number of band names \(2\) must match .* \(0\)"):
        _pixels(median.unmask(0).toUint16().rename([f"f0_{b}" for b in bands]), ["f0_B2"])
    with pytest.raises(ee.EEException, match="If one image has no bands, the other must also"):
        _pixels(median.gt(ee.Image.constant(0)), ["B2"])


def test_granules_filtered_and_masked_as_earth_engine_does(standin: StandIn) -> None:
    import ee

    region = ee.Geometry.Rectangle([574680, 5621800, 575320, 5622440], "EPSG:32631", False)
    col = (
        ee.ImageCollection(COLLECTION)
        .filterBounds(region)
        .filterDate("2019-04-01", "2019-05-01")
        .filter(ee.Filter.lte("CLOUDY_PIXEL_PERCENTAGE", 10))
    )
    dates = col.aggregate_array("system:index").getInfo()
    assert [d[:8] for d in dates] == ["20190401", "20190411", "20190416", "20190421"]
    far = ee.Geometry.Rectangle([0, 0, 10, 10], "EPSG:32631", False)
    assert ee.ImageCollection(COLLECTION).filterBounds(far).size().getInfo() == 0
    # SCL 0 (outside the granule) and every band's no-data are masked; mosaic keeps the rest.
    img = ee.Image(f"{COLLECTION}/{dates[0]}")
    arr = _pixels(img.select(["B4", "SCL"]), ["B4", "SCL"])
    assert arr["B4"].dtype == np.uint16 and arr["SCL"].dtype == np.uint8 and (arr["B4"] > 0).all()


def test_overlapping_and_redelivered_granules_are_in_the_catalog() -> None:
    catalog = catalog_from_directory(overlapping=("2019-04-16",), redelivered=("2019-05-11",))
    same_day = [g for g in catalog if g.index.startswith("20190416")]
    assert {g.props["MGRS_TILE"] for g in same_day} == {"31UES", "31UER"}
    again = [g for g in catalog if g.index.startswith("20190511")]
    assert len({g.props["GENERATION_TIME"] for g in again}) == 2 and {g.offset for g in again} == {
        0,
        1000,
    }
    assert min(g.props["system:time_start"] for g in catalog) >= 1_490_659_200_000  # 2017-03-28


def test_errors_come_back_in_earth_engines_form(standin: StandIn) -> None:
    standin.fail_next(1, 429, "Too many concurrent aggregations.")
    req = urllib.request.Request(
        f"{standin.url}/v1/projects/{standin.project}/value:compute", data=b"{}", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 429
    body = json.loads(err.value.read())
    assert body == {"error": {"code": 429, "message": "Too many concurrent aggregations.",
                              "status": "RESOURCE_EXHAUSTED"}}  # fmt: skip
    # Pixel requests beyond computePixels' band limit are refused as Earth Engine refuses them.
    import ee

    many = ee.Image.constant(list(range(1025)))
    with pytest.raises(
        ee.EEException, match=r"Number of bands \(1025\) must be less than or equal to 1024"
    ):
        _pixels(many, [f"constant_{i}" for i in range(1025)])
