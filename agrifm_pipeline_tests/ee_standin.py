"""A stand-in for the Earth Engine REST API on 127.0.0.1 that computes, for the real client.

The real ``earthengine-api`` client initialises against it (it serves the
discovery document and algorithm list shipped in the client's wheel) and
sends it the expression graphs it would send Earth Engine. The stand-in
*evaluates* them with numpy over a small catalog of real Sentinel-2 granules
(by default the bundled ``data/s2_sample``), so a test compares what the
provider gets with what Earth Engine's documented semantics give:

- collections: ``ImageCollection.load`` / ``fromImages``, ``Collection.filter``
  (bounds, date range, property comparisons, ``inList``/``listContains``, ``not``/``and``),
  ``Collection.map``, ``Collection.limit`` (sort), ``Collection.size``,
  ``AggregateFeatureCollection.array``;
- images: load, select, rename, addBands, mask/updateMask/unmask, remap,
  per-pixel ``Image.reduce`` over bands, comparisons and logic, ``round`` and
  the integer casts (truncate, then clamp to the type's range);
- per-pixel reductions of a collection: ``reduce.median`` (masked pixels
  excluded; an even count gives the mean of the two middle values, a float,
  which ``round`` takes half up as Earth Engine documents: 10.5 -> 11) and
  ``ImageCollection.mosaic`` (last unmasked image on top).

Only what the provider and the stand-in's own tests send is implemented:
anything else answers 501, and a failure of the stand-in itself answers 400
naming it (never a dropped connection, which the provider would retry as
transient), so a new call fails loudly until it is modelled here and tested.

Earth Engine's band-less images are reproduced: a reduction or mosaic of an
empty collection has no bands, and using it where bands are needed fails with
a 400, as Earth Engine does.

Errors go back as Earth Engine sends them: the HTTP status, and a JSON body
``{"error": {"code", "message", "status"}}``. Messages that public reports
of Earth Engine show are used word for word ("Computation timed out." as a
400, "Pattern '…' did not match any bands.", "If one image has no bands, the
other must also have no bands", "Too many concurrent aggregations.", "Earth
Engine capacity exceeded."); the texts for a rename of the wrong length and
for the request limits are the stand-in's own wording of those refusals. Tests can queue failures,
drop connections without an answer, and make pixel requests above a size
answer ``Computation timed out.`` (a 400, as Earth Engine answers it). The
stand-in also enforces ``computePixels``'s limits (bands, bytes, side).

Granules of the catalog carry the properties the provider reads
(``system:index``, ``system:time_start``, ``SPACECRAFT_NAME``,
``SENSING_ORBIT_NUMBER``, ``MGRS_TILE``, ``GENERATION_TIME``,
``CLOUDY_PIXEL_PERCENTAGE``). A catalog can hold the same acquisition twice:
as an overlapping granule of a neighbouring MGRS tile (same pixels, part of
the area) and as an older delivery of the same granule (different values).
Tests change the catalog between requests as Earth Engine's changes: a granule
delivered again (:func:`redelivery`), ingested or withdrawn
(``StandIn.add_granules`` / ``remove_granules``). Values are evaluated
wherever they sit, so one ``value:compute`` may ask for many collections'
properties at once (a dictionary of dictionaries, as the provider's batched
granule lists do).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ee
import numpy as np

EE_TESTS = Path(ee.__file__).parent / "tests"
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "s2_sample"
COLLECTION = "COPERNICUS/S2_SR_HARMONIZED"
COLLECTION_START = dt.date(2017, 3, 28)  # first scene of S2_SR_HARMONIZED
MAX_BANDS = 1024
MAX_BYTES = 48 * 1024 * 1024
MAX_SIDE = 32768
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNKNOWN",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_CAST = {
    "toUint8": (np.uint8, "uint8"),
    "toUint16": (np.uint16, "uint16"),
    "toInt16": (np.int16, "int16"),
    "toInt32": (np.int32, "int32"),
    "toFloat": (np.float32, "float"),
    "toDouble": (np.float64, "double"),
}
_NPY = {"uint8": "u1", "uint16": "<u2", "int16": "<i2", "int32": "<i4", "float": "<f4"}


class EEError(Exception):
    """An error the stand-in answers as Earth Engine does (status + message)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# --- the catalog --------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _raster(path: str) -> tuple[np.ndarray, tuple[float, ...], str, tuple[str, ...]]:
    import rasterio

    with rasterio.open(path) as src:
        return src.read(), tuple(src.transform)[:6], src.crs.to_wkt(), tuple(src.descriptions)


@dataclass
class Granule:
    """One granule: its properties and where its pixels come from."""

    index: str
    props: dict[str, Any]
    path: Path
    mask_path: Path
    rows: slice = field(
        default_factory=lambda: slice(None)
    )  # the part of the source raster the granule covers
    offset: int = 0  # DN added to the reflectance (an older, different delivery)

    def bands(self) -> dict[str, tuple[np.ndarray, str]]:
        """Source arrays by band name, on the source raster's grid."""
        data, _, _, names = _raster(str(self.path))
        scl = _raster(str(self.mask_path))[0][1]
        out: dict[str, tuple[np.ndarray, str]] = {}
        for i, name in enumerate(names):
            values = data[i].astype(np.int64)
            if self.offset:
                values = np.where(values > 0, values + self.offset, 0)
            out[name] = (values, "uint16")
        out["SCL"] = (scl.astype(np.int64), "uint8")
        return out

    def footprint(self) -> tuple[float, float, float, float, str]:
        """(left, bottom, right, top, crs wkt) of the part covered."""
        data, t, wkt, _ = _raster(str(self.path))
        h = data.shape[1]
        r0, r1, _ = self.rows.indices(h)
        left, top = t[2], t[5] + r0 * t[4]
        return left, t[5] + r1 * t[4], left + data.shape[2] * t[0], top, wkt


def _spacecraft(day: dt.date) -> str:
    # The sample's acquisitions are 5 days apart on one relative orbit: A and B alternate.
    return "Sentinel-2A" if ((day - dt.date(2018, 11, 2)).days // 5) % 2 == 0 else "Sentinel-2B"


def _granule(
    root: Path, day: dt.date, cloudy: float, tile: str, generated: dt.datetime, **kw: Any
) -> Granule:
    sensed = dt.datetime(day.year, day.month, day.day, 10, 40, 21, tzinfo=dt.UTC)
    stamp = sensed.strftime("%Y%m%dT%H%M%S")
    index = f"{stamp}_{generated.strftime('%Y%m%dT%H%M%S')}_T{tile}"
    craft = _spacecraft(day)
    props = {
        "system:index": index,
        "system:time_start": int(sensed.timestamp() * 1000),
        "SPACECRAFT_NAME": craft,
        "SENSING_ORBIT_NUMBER": 51,
        "MGRS_TILE": tile,
        "GENERATION_TIME": int(generated.timestamp() * 1000),
        "CLOUDY_PIXEL_PERCENTAGE": cloudy,
        "PRODUCT_ID": f"S2{craft[-1]}_MSIL2A_{stamp}_N0213_R051_T{tile}_{generated:%Y%m%dT%H%M%S}",
    }
    name = f"{day.isoformat()}.tif"
    return Granule(index, props, root / name, root / "masks" / name, **kw)


def catalog_from_directory(
    root: Path = SAMPLE_DIR,
    *,
    overlapping: tuple[str, ...] = (),
    redelivered: tuple[str, ...] = (),
    start: dt.date = COLLECTION_START,
) -> list[Granule]:
    """The granules of a scene directory (the layout of ``data/s2_sample``).

    Each date is a granule of tile 31UES, with the manifest's cloud fraction
    as ``CLOUDY_PIXEL_PERCENTAGE``; dates before ``start`` (the collection's
    first scene) are left out. Dates in ``overlapping`` get a second granule
    of tile 31UER covering the upper 40 rows with the same pixels; dates in
    ``redelivered`` get an older delivery of the same granule whose
    reflectance is 1000 DN off.
    """
    manifest = json.loads((root / "manifest.json").read_text())
    out = []
    for entry in manifest["dates"]:
        day = dt.date.fromisoformat(entry["date"])
        if day < start:
            continue
        cloudy = round(100.0 * float(entry["cloud_fraction"]), 4)
        produced = dt.datetime(day.year, day.month, day.day, 14, 5, 7, tzinfo=dt.UTC)
        out.append(_granule(root, day, cloudy, "31UES", produced))
        if entry["date"] in overlapping:
            out.append(_granule(root, day, cloudy, "31UER", produced, rows=slice(0, 40)))
        if entry["date"] in redelivered:
            older = produced - dt.timedelta(hours=2)
            out.append(_granule(root, day, cloudy, "31UES", older, offset=1000))
    return out


def redelivery(granule: Granule, generated: dt.datetime) -> Granule:
    """``granule`` delivered again (processed anew) at ``generated``: a granule of the same
    acquisition and MGRS tile with the same pixels, whose id names its generation time
    as every stand-in id does. Earth Engine keeps both deliveries in the collection."""
    sensed, tile = granule.index.split("_")[0], granule.props["MGRS_TILE"]
    index = f"{sensed}_{generated.strftime('%Y%m%dT%H%M%S')}_T{tile}"
    product = granule.props["PRODUCT_ID"].rsplit("_", 1)[0]
    props = {
        **granule.props,
        "system:index": index,
        "GENERATION_TIME": int(generated.timestamp() * 1000),
        "PRODUCT_ID": f"{product}_{generated:%Y%m%dT%H%M%S}",
    }
    return dataclasses.replace(granule, index=index, props=props)


# --- values the evaluator works with ----------------------------------------------------


@dataclass
class Grid:
    """The pixel grid of a computePixels request."""

    shape: tuple[int, int]
    affine: tuple[float, float, float, float, float, float]  # a, b, c, d, e, f
    crs: str  # "EPSG:…" or WKT

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        a, b, c, d, e, f = self.affine
        cols, rows = np.meshgrid(np.arange(self.shape[1]) + 0.5, np.arange(self.shape[0]) + 0.5)
        return c + cols * a + rows * b, f + cols * d + rows * e


class Band:
    """One band: name, pixel type and a lazily computed (values float64, mask bool)."""

    def __init__(self, name: str, dtype: str, fn: Callable[[], tuple[np.ndarray, np.ndarray]]):
        self.name, self.dtype, self._fn = name, dtype, fn
        self._value: tuple[np.ndarray, np.ndarray] | None = None

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        if self._value is None:
            self._value = self._fn()
        return self._value

    def renamed(self, name: str) -> Band:
        return Band(name, self.dtype, self.get)


class Image:
    def __init__(self, bands: Callable[[], list[Band]], props: dict[str, Any] | None = None,
                 granule: Granule | None = None) -> None:  # fmt: skip
        self._bands_fn, self.props, self.granule = bands, props or {}, granule
        self._bands: list[Band] | None = None

    @property
    def bands(self) -> list[Band]:
        if self._bands is None:
            self._bands = self._bands_fn()
        return self._bands


@dataclass
class Function:
    names: list[str]
    body: str


class Evaluator:
    """Evaluates one serialised expression graph over the catalog, on one grid."""

    def __init__(self, catalog: list[Granule], grid: Grid | None) -> None:
        self.catalog, self.grid = catalog, grid
        self.values: dict[str, Any] = {}
        self._cache: dict[Any, Any] = {}

    def run(self, expression: dict[str, Any]) -> Any:
        self.values = expression["values"]
        return self.node(self.values[expression["result"]], {})

    def node(self, n: dict[str, Any], scope: dict[str, Any]) -> Any:
        if "constantValue" in n:
            return n["constantValue"]
        if "valueReference" in n:
            ref = n["valueReference"]
            key = (ref, tuple(sorted((k, id(v)) for k, v in scope.items())))
            if key not in self._cache:
                self._cache[key] = self.node(self.values[ref], scope)
            return self._cache[key]
        if "arrayValue" in n:
            return [self.node(v, scope) for v in n["arrayValue"].get("values", [])]
        if "dictionaryValue" in n:
            return {k: self.node(v, scope) for k, v in n["dictionaryValue"]["values"].items()}
        if "argumentReference" in n:
            return scope[n["argumentReference"]]
        if "functionDefinitionValue" in n:
            d = n["functionDefinitionValue"]
            return Function(d["argumentNames"], d["body"]), scope
        if "functionInvocationValue" in n:
            inv = n["functionInvocationValue"]
            name = inv["functionName"]
            fn = _FUNCTIONS.get(name)
            if fn is None:
                raise EEError(f"The stand-in does not implement {name}.", 501)
            args = {k: self.node(v, scope) for k, v in inv.get("arguments", {}).items()}
            return fn(self, **args)
        raise EEError(f"Unknown expression node {sorted(n)}.")

    def call(self, fn: tuple[Function, dict[str, Any]], *args: Any) -> Any:
        f, outer = fn
        scope = {**outer, **dict(zip(f.names, args, strict=True))}
        return self.node(self.values[f.body], scope)

    # -- pixels of a granule on the grid ----------------------------------------------------
    def load(self, granule: Granule) -> Image:
        def bands() -> list[Band]:
            if self.grid is None:
                raise EEError("Pixels were asked for outside a pixel request.", 500)
            rows, cols, inside = self._index(granule)
            out = []
            for name, (src, dtype) in granule.bands().items():

                def fn(src: np.ndarray = src) -> tuple[np.ndarray, np.ndarray]:
                    v = np.where(inside, src[rows, cols], 0).astype(np.float64)
                    return v, inside & (v != 0)  # 0 is no data in every S2 band

                out.append(Band(name, dtype, fn))
            return out

        return Image(bands, dict(granule.props), granule)

    def _index(self, granule: Granule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = ("index", str(granule.path), granule.rows.start, granule.rows.stop)
        if key not in self._cache:
            assert self.grid is not None
            data, t, wkt, _ = _raster(str(granule.path))
            x, y = self.grid.centres()
            x, y = _to_crs(x, y, self.grid.crs, wkt)
            col = np.floor((x - t[2]) / t[0]).astype(np.int64)
            row = np.floor((y - t[5]) / t[4]).astype(np.int64)
            r0, r1, _ = granule.rows.indices(data.shape[1])
            inside = (col >= 0) & (col < data.shape[2]) & (row >= r0) & (row < r1)
            self._cache[key] = (np.where(inside, row, 0), np.where(inside, col, 0), inside)
        return self._cache[key]


@functools.lru_cache(maxsize=32)
def _transformer(src: str, dst: str) -> Any:
    from pyproj import CRS, Transformer

    return Transformer.from_crs(CRS.from_user_input(src), CRS.from_user_input(dst), always_xy=True)


@functools.lru_cache(maxsize=64)
def _same_crs(a: str, b: str) -> bool:
    from pyproj import CRS

    return a == b or CRS.from_user_input(a) == CRS.from_user_input(b)


def _to_crs(x: np.ndarray, y: np.ndarray, src: str, dst: str) -> tuple[np.ndarray, np.ndarray]:
    if _same_crs(src, dst):
        return x, y
    return _transformer(src, dst).transform(x, y)


# --- algorithms ---------------------------------------------------------------------------

_FUNCTIONS: dict[str, Callable[..., Any]] = {}


def _alg(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            _FUNCTIONS[name] = fn
        return fn

    return register


def _no_bands(algorithm: str, image: Image, what: str) -> None:
    if not image.bands:
        raise EEError(f"{algorithm}: {what} was applied to an Image with no bands.")


@_alg("ImageCollection.load")
def _collection_load(ev: Evaluator, id: str, **_: Any) -> list[Image]:
    if id != COLLECTION:
        raise EEError(
            f"ImageCollection.load: ImageCollection asset '{id}' not found "
            "(does not exist or caller does not have access)."
        )
    return [ev.load(g) for g in ev.catalog]


@_alg("Image.load")
def _image_load(ev: Evaluator, id: str, **_: Any) -> Image:
    for g in ev.catalog:
        if f"{COLLECTION}/{g.index}" == id:
            return ev.load(g)
    raise EEError(
        f"Image.load: Image asset '{id}' not found (does not exist or caller does not have access)."
    )


@_alg("ImageCollection.fromImages")
def _from_images(ev: Evaluator, images: list[Image]) -> list[Image]:
    return list(images)


@_alg("Collection.map")
def _map(ev: Evaluator, collection: list[Image], baseAlgorithm: Any, **_: Any) -> list[Image]:
    return [ev.call(baseAlgorithm, img) for img in collection]


@_alg("Collection.filter")
def _filter(ev: Evaluator, collection: list[Image], filter: Callable[[Image], bool]) -> list[Image]:
    return [img for img in collection if filter(img)]


@_alg("Collection.limit")
def _limit(
    ev: Evaluator, collection: list[Image], limit: int = -1, key: str | None = None,
    ascending: bool = True,
) -> list[Image]:  # fmt: skip
    out = list(collection)
    if key is not None:
        out.sort(key=lambda img: img.props.get(key), reverse=not ascending)
    return out if limit is None or limit < 0 else out[:limit]


@_alg("Collection.size")
def _size(ev: Evaluator, collection: list[Image]) -> int:
    return len(collection)


@_alg("AggregateFeatureCollection.array")
def _aggregate_array(ev: Evaluator, collection: list[Image], property: str) -> list[Any]:
    return [img.props[property] for img in collection if property in img.props]


@_alg("Dictionary.fromLists")
def _dict_from_lists(ev: Evaluator, keys: list[str], values: list[Any]) -> dict[str, Any]:
    return dict(zip(keys, values, strict=True))


@_alg("Projection")
def _projection(ev: Evaluator, crs: str, **_: Any) -> str:
    return crs


@_alg("GeometryConstructors.Rectangle")
def _rectangle(
    ev: Evaluator, coordinates: list[float], crs: str = "EPSG:4326", **_: Any
) -> tuple[list[float], str]:
    return coordinates, crs


@_alg("Feature")
def _feature(ev: Evaluator, geometry: Any, **_: Any) -> Any:
    return geometry


@_alg("DateRange")
def _date_range(ev: Evaluator, start: Any, end: Any = None, **_: Any) -> tuple[int, int]:
    def ms(v: Any) -> int:
        if isinstance(v, int | float):
            return int(v)
        d = dt.datetime.fromisoformat(str(v))
        return int(d.replace(tzinfo=d.tzinfo or dt.UTC).timestamp() * 1000)

    return ms(start), ms(end)


@_alg("Filter.intersects")
def _intersects(ev: Evaluator, leftField: str = ".all", rightValue: Any = None, **_: Any) -> Any:
    (x0, y0, x1, y1), crs = rightValue

    def keep(img: Image) -> bool:
        if img.granule is None:
            return True
        left, bottom, right, top, wkt = img.granule.footprint()
        xs, ys = _to_crs(np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]), crs, wkt)
        return bool(min(xs) < right and max(xs) > left and min(ys) < top and max(ys) > bottom)

    return keep


@_alg("Filter.dateRangeContains")
def _date_contains(ev: Evaluator, leftValue: tuple[int, int], rightField: str, **_: Any) -> Any:
    start, end = leftValue
    return lambda img: start <= img.props[rightField] < end


def _comparison(op: Callable[[Any, Any], bool]) -> Callable[..., Any]:
    def build(ev: Evaluator, leftField: str | None = None, rightValue: Any = None,
              rightField: str | None = None, leftValue: Any = None) -> Any:  # fmt: skip
        def keep(img: Image) -> bool:
            left = img.props.get(leftField) if leftField is not None else leftValue
            right = img.props.get(rightField) if rightField is not None else rightValue
            return left is not None and right is not None and op(left, right)

        return keep

    return build


_FUNCTIONS["Filter.greaterThan"] = _comparison(lambda a, b: a > b)
_FUNCTIONS["Filter.lessThan"] = _comparison(lambda a, b: a < b)
_FUNCTIONS["Filter.equals"] = _comparison(lambda a, b: a == b)
_FUNCTIONS["Filter.inList"] = _comparison(lambda a, b: a in b)
_FUNCTIONS["Filter.listContains"] = _comparison(lambda a, b: b in a)  # what inList sends


@_alg("Filter.not")
def _not(ev: Evaluator, filter: Callable[[Image], bool]) -> Any:
    return lambda img: not filter(img)


@_alg("Filter.and")
def _and_filters(ev: Evaluator, filters: list[Callable[[Image], bool]]) -> Any:
    return lambda img: all(f(img) for f in filters)


# -- images: bands -------------------------------------------------------------------------


def _selected(image: Image, selectors: list[Any], algorithm: str) -> list[Band]:
    out = []
    for sel in selectors:
        if isinstance(sel, int):
            if not 0 <= sel < len(image.bands):
                raise EEError(
                    f"{algorithm}: Band index {sel} out of bounds; the image has "
                    f"{len(image.bands)} bands."
                )
            out.append(image.bands[sel])
            continue
        if not image.bands:
            raise EEError(
                f"{algorithm}: Band pattern '{sel}' was applied to an Image with no bands."
            )
        hits = [b for b in image.bands if re.fullmatch(sel, b.name)]
        if not hits:
            raise EEError(f"{algorithm}: Pattern '{sel}' did not match any bands.")
        out += hits
    return out


@_alg("Image.select")
def _select(ev: Evaluator, input: Image, bandSelectors: list[Any], newNames: Any = None) -> Image:
    def bands() -> list[Band]:
        picked = _selected(input, bandSelectors, "Image.select")
        if newNames is None:
            return picked
        return [b.renamed(n) for b, n in zip(picked, newNames, strict=True)]

    return Image(bands, input.props, input.granule)


@_alg("Image.rename")
def _rename(ev: Evaluator, input: Image, names: list[str]) -> Image:
    if len(names) != len(input.bands):
        raise EEError(
            f"Image.rename: The number of band names ({len(names)}) must match the number "
            f"of bands ({len(input.bands)})."
        )
    return Image(lambda: [b.renamed(n) for b, n in zip(input.bands, names, strict=True)],
                 input.props, input.granule)  # fmt: skip


@_alg("Image.addBands")
def _add_bands(ev: Evaluator, dstImg: Image, srcImg: Image, names: Any = None,
               overwrite: bool = False) -> Image:  # fmt: skip
    def bands() -> list[Band]:
        out = list(dstImg.bands)
        for b in srcImg.bands:
            if any(o.name == b.name for o in out):
                if not overwrite:
                    raise EEError(
                        f"Image.addBands: Can't add a band named '{b.name}' to image because a "
                        "band with this name already exists. Existing bands: "
                        f"{[o.name for o in out]}."
                    )
                out = [o for o in out if o.name != b.name]
            out.append(b)
        return out

    return Image(bands, dstImg.props, dstImg.granule)


@_alg("Image.constant")
def _constant(ev: Evaluator, value: Any) -> Image:
    values = value if isinstance(value, list) else [value]

    def bands() -> list[Band]:
        assert ev.grid is not None
        shape = ev.grid.shape
        names = ["constant"] if len(values) == 1 else [f"constant_{i}" for i in range(len(values))]
        dtype = "double" if any(isinstance(v, float) and v != int(v) for v in values) else "int32"
        return [
            Band(n, dtype, lambda v=v: (np.full(shape, float(v)), np.ones(shape, bool)))
            for n, v in zip(names, values, strict=True)
        ]

    return Image(bands)


def _map_bands(image: Image, fn: Callable[[Band], Band]) -> Image:
    return Image(lambda: [fn(b) for b in image.bands], image.props, image.granule)


@_alg("Image.mask")
def _mask(ev: Evaluator, image: Image, mask: Image | None = None) -> Image:
    if mask is not None:
        return _update_mask(ev, image, mask)

    def as_value(b: Band) -> Band:
        return Band(b.name, "double", lambda: (b.get()[1].astype(np.float64),
                                               np.ones(b.get()[1].shape, bool)))  # fmt: skip

    return _map_bands(image, as_value)


def _pair(algorithm: str, a: Image, b: Image) -> list[tuple[Band, Band]]:
    na, nb = len(a.bands), len(b.bands)
    if (na == 0) != (nb == 0):
        raise EEError(
            f"{algorithm}: If one image has no bands, the other must also have no bands. "
            f"Got {na} and {nb}."
        )
    if na == nb:
        return list(zip(a.bands, b.bands, strict=True))
    if nb == 1:
        return [(x, b.bands[0]) for x in a.bands]
    if na == 1:
        return [(a.bands[0], y) for y in b.bands]
    raise EEError(
        f"{algorithm}: Images must contain the same number of bands or only 1 band. "
        f"Got {na} and {nb}."
    )


@_alg("Image.updateMask")
def _update_mask(ev: Evaluator, image: Image, mask: Image) -> Image:
    def bands() -> list[Band]:
        out = []
        for b, m in _pair("Image.updateMask", image, mask):

            def fn(b: Band = b, m: Band = m) -> tuple[np.ndarray, np.ndarray]:
                v, ok = b.get()
                mv, mok = m.get()
                return v, ok & mok & (mv != 0)

            out.append(Band(b.name, b.dtype, fn))
        return out

    return Image(bands, image.props, image.granule)


@_alg("Image.unmask")
def _unmask(
    ev: Evaluator, input: Image, value: Image | None = None, sameFootprint: bool = True
) -> Image:
    def bands() -> list[Band]:
        if not input.bands:
            return []  # a band-less image stays band-less
        if value is None:
            fill = [
                Band(
                    "constant",
                    "int32",
                    lambda: (np.zeros(ev.grid.shape), np.ones(ev.grid.shape, bool)),
                )
            ]  # type: ignore[union-attr]
            pairs = [(b, fill[0]) for b in input.bands]
        else:
            pairs = _pair("Image.unmask", input, value)
        out = []
        for b, f in pairs:

            def fn(b: Band = b, f: Band = f) -> tuple[np.ndarray, np.ndarray]:
                v, ok = b.get()
                fv, fok = f.get()
                return np.where(ok, v, fv), ok | fok

            dtype = b.dtype if f.dtype in ("int32", b.dtype) else "double"
            out.append(Band(b.name, dtype, fn))
        return out

    return Image(bands, input.props, input.granule)


@_alg("Image.remap")
def _remap(ev: Evaluator, image: Image, to: list[float], defaultValue: Any = None,
           bandName: str | None = None, **kw: Any) -> Image:  # fmt: skip
    source = kw["from"]
    if len(source) != len(to):
        raise EEError("Image.remap: The 'from' and 'to' lists must be the same length.")

    def bands() -> list[Band]:
        b = _selected(image, [bandName], "Image.remap")[0] if bandName else image.bands[0]

        def fn() -> tuple[np.ndarray, np.ndarray]:
            v, ok = b.get()
            out = np.full(v.shape, np.nan if defaultValue is None else float(defaultValue))
            for f, t in zip(source, to, strict=True):
                out[v == f] = t
            return np.nan_to_num(out), ok & ~np.isnan(out)

        return [Band("remapped", "int32", fn)]

    return Image(bands, image.props, image.granule)


@_alg("Image.reduce")
def _image_reduce(ev: Evaluator, image: Image, reducer: str) -> Image:
    ops = {"min": np.min, "max": np.max, "sum": np.sum}

    def bands() -> list[Band]:
        def fn() -> tuple[np.ndarray, np.ndarray]:
            vs = np.stack([b.get()[0] for b in image.bands])
            oks = np.stack([b.get()[1] for b in image.bands])
            big = np.inf if reducer == "min" else -np.inf
            picked = ops[reducer](np.where(oks, vs, big), axis=0)
            ok = oks.any(axis=0)
            return np.where(ok, picked, 0), ok

        return [Band(reducer, "double", fn)]

    return Image(bands, image.props, image.granule)


for _name in ("min", "max", "sum", "median"):
    _FUNCTIONS[f"Reducer.{_name}"] = lambda ev, _n=_name, **_: _n


def _binary(algorithm: str, op: Callable[[np.ndarray, np.ndarray], np.ndarray],
            dtype: str | None) -> Callable[..., Image]:  # fmt: skip
    def apply(ev: Evaluator, image1: Image, image2: Image) -> Image:
        def bands() -> list[Band]:
            out = []
            for a, b in _pair(algorithm, image1, image2):

                def fn(a: Band = a, b: Band = b) -> tuple[np.ndarray, np.ndarray]:
                    (va, oka), (vb, okb) = a.get(), b.get()
                    return op(va, vb).astype(np.float64), oka & okb

                out.append(Band(a.name, dtype or a.dtype, fn))
            return out

        return Image(bands, image1.props, image1.granule)

    return apply


_FUNCTIONS["Image.and"] = _binary("Image.and", lambda a, b: (a != 0) & (b != 0), "uint8")
_FUNCTIONS["Image.or"] = _binary("Image.or", lambda a, b: (a != 0) | (b != 0), "uint8")
_FUNCTIONS["Image.gt"] = _binary("Image.gt", lambda a, b: a > b, "uint8")
_FUNCTIONS["Image.lt"] = _binary("Image.lt", lambda a, b: a < b, "uint8")
_FUNCTIONS["Image.eq"] = _binary("Image.eq", lambda a, b: a == b, "uint8")
_FUNCTIONS["Image.add"] = _binary("Image.add", np.add, None)


@_alg("Image.round")
def _round(ev: Evaluator, value: Image) -> Image:
    def half_away(b: Band) -> Band:
        def fn() -> tuple[np.ndarray, np.ndarray]:
            v, ok = b.get()
            return np.sign(v) * np.floor(np.abs(v) + 0.5), ok

        return Band(b.name, b.dtype, fn)

    return _map_bands(value, half_away)


def _cast(np_type: Any, name: str) -> Callable[..., Image]:
    info = np.iinfo(np_type) if np.issubdtype(np_type, np.integer) else None

    def apply(ev: Evaluator, value: Image) -> Image:
        def cast(b: Band) -> Band:
            def fn() -> tuple[np.ndarray, np.ndarray]:
                v, ok = b.get()
                if info is not None:  # integer casts truncate, then clamp to the range
                    v = np.clip(np.trunc(v), info.min, info.max)
                return v, ok

            return Band(b.name, name, fn)

        return _map_bands(value, cast)

    return apply


for _fn_name, (_np_type, _type_name) in _CAST.items():
    _FUNCTIONS[f"Image.{_fn_name}"] = _cast(_np_type, _type_name)


# -- per-pixel reductions of a collection --------------------------------------------------


def _stacked(collection: list[Image], j: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = [img.bands[j].get() for img in collection]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _reduction(algorithm: str, collection: list[Image],
               fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
               dtype: str | None) -> Image:  # fmt: skip
    def bands() -> list[Band]:
        if not collection:
            return []  # an empty collection reduces to an image with no bands
        first = collection[0].bands
        for img in collection[1:]:
            if [b.name for b in img.bands] != [b.name for b in first]:
                raise EEError(
                    f"{algorithm}: All images must have the same bands; got "
                    f"{[b.name for b in first]} and {[b.name for b in img.bands]}."
                )
        return [
            Band(b.name, dtype or b.dtype, lambda j=j: fn(*_stacked(collection, j)))
            for j, b in enumerate(first)
        ]

    return Image(bands)


def _median_of(values: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = ok.sum(axis=0)
    ranked = np.sort(np.where(ok, values, np.inf), axis=0)
    lo = np.take_along_axis(ranked, np.clip((n - 1) // 2, 0, None)[None], 0)[0]
    hi = np.take_along_axis(ranked, np.clip(n // 2, 0, len(values) - 1)[None], 0)[0]
    has = n > 0
    return np.where(has, (lo + hi) / 2.0, 0.0), has


def _mosaic_of(values: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out, has = np.zeros(values.shape[1:]), np.zeros(values.shape[1:], bool)
    for v, m in zip(values, ok, strict=True):  # later images on top
        out = np.where(m, v, out)
        has |= m
    return out, has


@_alg("reduce.median")
def _reduce_median(ev: Evaluator, collection: list[Image]) -> Image:
    return _reduction("ImageCollection.median", collection, _median_of, "double")


@_alg("ImageCollection.mosaic")
def _reduce_mosaic(ev: Evaluator, collection: list[Image]) -> Image:
    return _reduction("ImageCollection.mosaic", collection, _mosaic_of, None)


# --- requests -----------------------------------------------------------------------------


def _grid(body: dict[str, Any]) -> Grid:
    g = body.get("grid")
    if not g:
        raise EEError("computePixels needs a grid in this stand-in.")
    t, d = g["affineTransform"], g["dimensions"]
    crs = g.get("crsCode") or g.get("crsWkt")
    if not crs:
        raise EEError("PixelGrid must specify crsCode or crsWkt.")
    if "crsCode" in g and not re.fullmatch(r"EPSG:\d+|SR-ORG:\d+", g["crsCode"]):
        raise EEError(f"Invalid CRS code '{g['crsCode'][:80]}'.")
    affine = (t.get("scaleX", 1.0), t.get("shearX", 0.0), t.get("translateX", 0.0),
              t.get("shearY", 0.0), t.get("scaleY", 1.0), t.get("translateY", 0.0))  # fmt: skip
    return Grid((int(d["height"]), int(d["width"])), affine, crs)


def compute_pixels(
    catalog: list[Granule], body: dict[str, Any], max_bytes: int = MAX_BYTES
) -> bytes:
    """Evaluate a computePixels body; the NPY bytes Earth Engine would send back."""
    grid = _grid(body)
    h, w = grid.shape
    if max(h, w) > MAX_SIDE:
        raise EEError(f"Grid dimensions ({w}x{h}) must be at most {MAX_SIDE} px a side.")
    image = Evaluator(catalog, grid).run(body["expression"])
    wanted = body.get("bandIds") or [b.name for b in image.bands]
    if len(wanted) > MAX_BANDS:
        raise EEError(f"Number of bands ({len(wanted)}) must be less than or equal to {MAX_BANDS}.")
    bands = {b.name: b for b in image.bands}
    missing = [b for b in wanted if b not in bands]
    if missing:
        raise EEError(f"Image.select: Pattern '{missing[0]}' did not match any bands.")
    dtypes = [(b, _NPY.get(bands[b].dtype, "<f8")) for b in wanted]
    arr = np.zeros((h, w), dtype=dtypes)
    size = arr.nbytes
    if size > max_bytes:
        raise EEError(
            f"Total request size ({size} bytes) must be less than or equal to {max_bytes} bytes."
        )
    for name in wanted:
        v, ok = bands[name].get()
        arr[name] = np.where(ok, v, 0)  # masked pixels come back as 0
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def compute_value(catalog: list[Granule], body: dict[str, Any]) -> Any:
    result = Evaluator(catalog, None).run(body["expression"])
    if isinstance(result, Image) or (
        isinstance(result, list) and any(isinstance(r, Image) for r in result)
    ):
        raise EEError("The stand-in returns plain values only (lists, numbers, dictionaries).")
    return result


# --- the server ---------------------------------------------------------------------------


@dataclass
class StandIn:
    url: str
    project: str
    catalog: list[Granule]
    requests: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)  # queued (status, message)
    drops: int = 0  # connections to close without an answer
    timeout_above_px: int | None = None  # pixel requests above (px x bands) time out
    max_bytes: int = MAX_BYTES
    in_flight: int = 0
    in_flight_max: int = 0
    delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokens: list[dict[str, str]] = field(default_factory=list)  # OAuth token grants received
    auth_headers: list[str] = field(default_factory=list)  # Authorization of API calls

    def fail_next(self, n: int, status: int, message: str = "") -> None:
        """The next ``n`` API calls answer ``status`` with ``message`` (Earth Engine's form)."""
        with self.lock:
            self.failures.extend([(status, message or f"HTTP {status}")] * n)

    def add_granules(self, *granules: Granule) -> None:
        """Granules ingested into the collection (visible to the next request)."""
        with self.lock:
            self.catalog.extend(granules)

    def remove_granules(self, *indexes: str) -> None:
        """Granules withdrawn from the collection, by ``system:index``."""
        with self.lock:
            self.catalog[:] = [g for g in self.catalog if g.index not in indexes]

    def drop_next(self, n: int) -> None:
        """The next ``n`` API calls get their connection closed with no answer."""
        with self.lock:
            self.drops += n

    def bodies(self, suffix: str) -> list[dict[str, Any]]:
        return [b for m, p, b in self.requests if m == "POST" and p.split("?")[0].endswith(suffix)]

    def discovery_requests(self) -> int:
        return sum(1 for m, p, _ in self.requests if m == "GET" and p.startswith("/$discovery/"))


def error_body(status: int, message: str) -> bytes:
    """Earth Engine's JSON error body."""
    body = {
        "error": {
            "code": status,
            "message": message,
            "status": _STATUS_NAMES.get(status, "UNKNOWN"),
        }
    }
    return json.dumps(body).encode()


def _discovery(base: str) -> bytes:
    doc = json.loads((EE_TESTS / "cloud_api_discovery_document.json").read_text())
    doc["rootUrl"] = doc["baseUrl"] = base + "/"
    return json.dumps(doc).encode()


@contextmanager
def ee_standin(
    project: str = "test-project", catalog: list[Granule] | None = None
) -> Iterator[StandIn]:
    """Serve the stand-in on 127.0.0.1 (an ephemeral port) for the ``with`` block."""
    algorithms = (EE_TESTS / "algorithms.json").read_bytes()
    state: dict[str, StandIn] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, error_body(status, message))

        def do_GET(self) -> None:
            s = state["s"]
            with s.lock:
                s.requests.append(("GET", self.path, {}))
            if self.path.startswith("/$discovery/rest"):
                self._send(200, _discovery(s.url))
            elif "/algorithms" in self.path:
                self._send(200, algorithms)
            else:
                self._error(404, f"no such path {self.path}")

        def do_POST(self) -> None:
            s = state["s"]
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/token":  # OAuth 2 token endpoint (service-account JWT grant)
                from urllib.parse import parse_qs

                form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                with s.lock:
                    s.tokens.append(form)
                    n = len(s.tokens)
                grant = {
                    "access_token": f"standin-token-{n}",
                    "expires_in": 3600,
                    "token_type": "Bearer",
                }
                self._send(200, json.dumps(grant).encode())
                return
            body = json.loads(raw or b"{}")
            path = self.path.split("?")[0]
            with s.lock:
                s.auth_headers.append(self.headers.get("Authorization", ""))
                s.requests.append(("POST", self.path, body))
                drop = s.drops > 0
                s.drops -= int(drop)
                failure = s.failures.pop(0) if s.failures and not drop else None
                s.in_flight += 1
                s.in_flight_max = max(s.in_flight_max, s.in_flight)
            try:
                if s.delay_s:
                    time.sleep(s.delay_s)
                if drop:
                    self.close_connection = True
                    self.connection.shutdown(2)  # closed with no status line: RemoteDisconnected
                    return
                if failure is not None:
                    self._error(*failure)
                elif path.endswith("image:computePixels"):
                    if s.timeout_above_px is not None:
                        d = body["grid"]["dimensions"]
                        if (
                            d["width"] * d["height"] * len(body.get("bandIds") or [1])
                            > s.timeout_above_px
                        ):
                            self._error(400, "Computation timed out.")
                            return
                    self._send(
                        200,
                        compute_pixels(s.catalog, body, s.max_bytes),
                        "application/octet-stream",
                    )
                elif path.endswith("value:compute"):
                    self._send(200, json.dumps({"result": compute_value(s.catalog, body)}).encode())
                else:
                    self._error(404, f"no such path {self.path}")
            except EEError as exc:
                self._error(exc.status, exc.message)
            except Exception as exc:  # the stand-in's own failure: loud, never retried
                self._error(400, f"ee_standin failed: {type(exc).__name__}: {exc}")
            finally:
                with s.lock:
                    s.in_flight -= 1

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state["s"] = StandIn(
        f"http://127.0.0.1:{server.server_address[1]}",
        project,
        catalog if catalog is not None else catalog_from_directory(),
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["s"]
    finally:
        server.shutdown()
        server.server_close()
