"""Deterministic, plausible Sentinel-2 series for demos and tests — and labelled as such.

The land is a patchwork of rectangular fields between one-pixel tracks. Field edges
are seeded per block of the area's CRS (not per request), so a field is the same
field whichever tile or region asks for it, and :meth:`SyntheticProvider.truth` gives
every pixel's field and crop type for any grid: the labels' truth. Each field grows
one of :data:`CROPS`, whose calendars (green-up, senescence, peak and off-season
cover), canopy colour and harvest residue differ, on a soil of its own brightness;
band reflectances mix that field's background (soil, or straw after an early harvest)
with its canopy by the season's cover. So the fields differ in phenology by
construction, and the year's median in true colour shows them as fields: green
grassland, straw-coloured cereal, brown maize and beet stubble.

Scenes come every 5 days, as Sentinel-2's revisit, each with seeded clouds (bright,
SCL 8/9), their shadows (dark, SCL 3) and a scene-level cloudy percentage; they are
then composited by the same code as real data. Everything is seeded from the
provider seed (and, for the weather, the area's bounds), so the same request always
gives the same stack. Every stack says ``provider="synthetic"`` and ``synthetic=True``.

:data:`GENERATOR` names this way of drawing: it is in :meth:`~SyntheticProvider.identity`
and in every scene's stamp, so data drawn by an earlier generator reads as stale.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from odc.geo.geobox import GeoBox

from agrifm_pipeline.frames import FrameWindow
from agrifm_pipeline.lineage import SCENE_INDEX_KEY, scene_index_record
from agrifm_pipeline.providers.base import CloudMask, FrameStack, frame_stack_array
from agrifm_pipeline.providers.compositing import Scene, composite_windows, loaded
from agrifm_pipeline.specs import SensorSpec

# 1: fields per request, two spectra mixed by NDVI (the median was grey);
# 2: fields fixed in the CRS with tracks between them, crop canopies, straw and soils.
GENERATOR = 2


# Reflectance (DN) spectra for B2..B12.
def _band_rows(bands: Sequence[str]) -> list[int]:
    """Rows of the spectra below (in AgriFM's band order) for ``bands``."""
    from agrifm_pipeline.errors import InputContractError
    from agrifm_pipeline.model.config import AGRIFM_S2_BANDS

    unknown = [b for b in bands if b not in AGRIFM_S2_BANDS]
    if unknown:
        raise InputContractError(
            f"the synthetic provider has no spectrum for band(s) {unknown}; use bands of "
            f"{', '.join(AGRIFM_S2_BANDS)}"
        )
    return [AGRIFM_S2_BANDS.index(b) for b in bands]


def _spectrum(*dn: float) -> np.ndarray:
    return np.array(dn, dtype=np.float32)


# Spectra in AgriFM's band order (B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12).
SOIL = _spectrum(900, 1200, 1500, 1700, 1850, 1950, 2100, 2200, 2900, 2500)
CLOUD = _spectrum(7500, 7400, 7300, 7300, 7300, 7200, 7300, 7200, 5200, 4000)
REVISIT_DAYS = 5
FIELD_SIZE_M = 400.0  # a field's mean side, by default
BLOCK_FIELDS = 8  # field edges are seeded per block of this many fields a side


@dataclass(frozen=True)
class Crop:
    """A crop type: its calendar, its canopy's colour and what its harvest leaves."""

    name: str
    green_up: float  # day of year, the middle of the rise in cover
    senescence: float  # day of year, the middle of the fall
    peak: float  # canopy cover at the height of the season
    base: float  # cover off-season (winter green, a sward)
    canopy: np.ndarray  # reflectance of a closed canopy
    residue: np.ndarray  # the background after senescence (straw, stalks, soil)
    residue_days: float  # how long the residue lies before the soil shows again


CROPS: tuple[Crop, ...] = (
    Crop(
        "winter_cereal", 105.0, 185.0, 0.85, 0.2,
        _spectrum(350, 650, 420, 1150, 2700, 3300, 3700, 3900, 2300, 1200),
        _spectrum(1300, 1750, 2100, 2350, 2600, 2750, 2900, 3000, 3600, 3000),  # straw
        110.0,
    ),
    Crop(
        "maize", 175.0, 265.0, 0.9, 0.03,
        _spectrum(260, 560, 290, 1000, 3000, 3800, 4300, 4500, 2100, 1000),
        _spectrum(800, 1000, 1200, 1400, 1650, 1800, 1950, 2050, 2800, 2450),  # stalks
        60.0,
    ),
    Crop(
        "grassland", 90.0, 290.0, 0.8, 0.5,
        _spectrum(400, 800, 480, 1250, 2600, 3100, 3500, 3600, 2400, 1300),
        _spectrum(750, 950, 1050, 1350, 1900, 2150, 2350, 2450, 2900, 2200),  # hay
        20.0,
    ),
    Crop(
        "sugar_beet", 140.0, 300.0, 0.9, 0.03,
        _spectrum(240, 500, 250, 900, 3100, 4100, 4700, 4800, 1900, 900),
        SOIL,  # lifted: bare soil
        1.0,
    ),
)  # fmt: skip
CROP_NAMES: tuple[str, ...] = tuple(c.name for c in CROPS)
# The tracks and hedges between fields: a thin sward on dark soil.
TRACK_COVER = 0.55


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _sigmoid(x: np.ndarray | float) -> Any:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


@dataclass(frozen=True)
class FieldTruth:
    """Every pixel's field and crop type on a grid: the synthetic source's ground truth.

    ``field`` (H, W) int64 names a field the same way on every grid of the CRS; ``crop``
    (H, W) int8 indexes :data:`CROP_NAMES`; both are -1 on the tracks between fields.
    """

    area: GeoBox
    field: np.ndarray
    crop: np.ndarray
    crops: tuple[str, ...] = CROP_NAMES


class SyntheticProvider:
    """Seeded synthetic S2 L2A scenes, composited like real ones."""

    name = "synthetic"

    synthetic = True

    @staticmethod
    def identity(seed: int = 0, field_size_m: float = FIELD_SIZE_M, **_: Any) -> dict[str, Any]:
        """What names this source in lineage and fingerprints: the seed, the fields' size
        and the generator (:data:`GENERATOR`), so data drawn another way reads as from
        another source."""
        return {
            "name": "synthetic",
            "seed": int(seed),
            "field_m": float(field_size_m),
            "generator": GENERATOR,
        }

    def __init__(
        self, seed: int = 0, cloud_cover: float = 0.3, field_size_m: float = FIELD_SIZE_M
    ) -> None:
        from agrifm_pipeline import __version__
        from agrifm_pipeline.errors import SettingsError

        self.seed = int(seed)
        self.cloud_cover = float(cloud_cover)
        self.field_size_m = float(field_size_m)
        if not 20.0 <= self.field_size_m <= 100_000.0:
            raise SettingsError(
                f"synthetic field_size_m={field_size_m}; use a mean field side of 20 m to 100 km"
            )
        self.version = f"{__version__}+seed{self.seed}+generator{GENERATOR}"

    # -- the fields ------------------------------------------------------------------------

    def _bands(self, coords: np.ndarray, axis: str, crs: str, unit: float) -> np.ndarray:
        """Each coordinate's band of fields along ``axis``: edges seeded per block of
        :data:`BLOCK_FIELDS` fields in the CRS, so independent of the grid asked for."""
        block = BLOCK_FIELDS * self.field_size_m * unit
        k = np.floor(coords / block).astype(np.int64)
        out = np.empty(coords.shape, dtype=np.int64)
        for kb in np.unique(k):
            rng = np.random.default_rng(
                _seed(self.seed, "bands", self.field_size_m, crs, axis, int(kb))
            )
            sizes = rng.uniform(0.5, 1.5, size=BLOCK_FIELDS)
            ends = np.cumsum(sizes) / sizes.sum() * block
            sel = k == kb
            j = np.searchsorted(ends[:-1], coords[sel] - kb * block, side="right")
            out[sel] = kb * BLOCK_FIELDS + j
        return out

    def truth(self, area: GeoBox) -> FieldTruth:
        """The field and crop type of every pixel of ``area`` (-1 on the tracks)."""
        crs = str(area.crs)
        unit = 1.0 / 111_320.0 if area.crs is not None and area.crs.geographic else 1.0
        x = np.asarray(area.coords["x"].values, dtype=np.float64)
        y = np.asarray(area.coords["y"].values, dtype=np.float64)
        rx, ry = abs(float(area.resolution.x)), abs(float(area.resolution.y))
        col, row = self._bands(x, "x", crs, unit), self._bands(y, "y", crs, unit)
        # A track: the first pixel of a band (west and north edges), the same on any grid.
        col_track = self._bands(x - rx, "x", crs, unit) != col
        row_track = self._bands(y + ry, "y", crs, unit) != row
        field = row[:, None] * 1_000_000 + col[None, :]
        track = row_track[:, None] | col_track[None, :]
        field = np.where(track, -1, field)
        ids, inverse = np.unique(field, return_inverse=True)
        kinds = np.array(
            [-1 if f < 0 else self._field_draw(crs, int(f))[0] for f in ids], dtype=np.int8
        )
        return FieldTruth(area, field, kinds[inverse.reshape(field.shape)])

    def _field_draw(self, crs: str, field: int) -> tuple[int, np.ndarray]:
        """A field's crop (index) and its own (green-up, senescence, peak, soil, redness)."""
        rng = np.random.default_rng(_seed(self.seed, "field", crs, field))
        kind = int(rng.integers(0, len(CROPS)))
        c = CROPS[kind]
        params = np.array(
            [
                c.green_up + rng.normal(0, 7),
                c.senescence + rng.normal(0, 7),
                np.clip(c.peak + rng.normal(0, 0.04), 0.3, 0.97),
                rng.uniform(0.75, 1.25),  # soil brightness
                rng.uniform(0.95, 1.1),  # soil redness (B4, B5)
            ]
        )
        return kind, params

    def _layout(self, area: GeoBox) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-pixel index into the fields (the last index: tracks), each field's crop and
        parameters, and a persistent per-pixel texture (a hash of the coordinates)."""
        truth = self.truth(area)
        crs = str(area.crs)
        ids, inverse = np.unique(truth.field, return_inverse=True)
        draws = [self._field_draw(crs, int(f)) for f in ids if f >= 0]
        kinds = np.array([k for k, _ in draws], dtype=np.int64)
        params = np.array([p for _, p in draws], dtype=np.float64).reshape(-1, 5)
        n = len(draws)
        # -1 (tracks) sorts first in ids: move it to the end
        has_track = bool(ids.size and ids[0] < 0)
        label = inverse.reshape(truth.field.shape) - (1 if has_track else 0)
        label = np.where(truth.field < 0, n, label)
        x = np.rint(np.asarray(area.coords["x"].values) * 10).astype(np.int64)
        y = np.rint(np.asarray(area.coords["y"].values) * 10).astype(np.int64)
        h = (x[None, :] * 73856093) ^ (y[:, None] * 19349663) ^ (self.seed * 83492791)
        h = (h * 2654435761) & 0xFFFFFFFF
        texture = (1.0 + 0.08 * (h / 2**32 - 0.5)).astype(np.float32)
        return label, kinds, params, texture

    def _spectra(self, doy: int, kinds: np.ndarray, params: np.ndarray) -> np.ndarray:
        """(n + 1, 10): each field's reflectance on day ``doy``; the last row the tracks'."""
        base = np.array([c.base for c in CROPS])[kinds]
        canopy = np.stack([c.canopy for c in CROPS])[kinds]
        residue = np.stack([c.residue for c in CROPS])[kinds]
        days = np.array([c.residue_days for c in CROPS])[kinds]
        up, down, peak, bright, red = params.T
        cover = base + (peak - base) * (_sigmoid((doy - up) / 8) - _sigmoid((doy - down) / 8))
        lying = _sigmoid((doy - down) / 6) - _sigmoid((doy - down - days) / 6)
        soil = SOIL[None, :] * bright[:, None]
        soil[:, 2:4] *= red[:, None]
        background = soil * (1 - lying[:, None]) + residue * lying[:, None]
        fields = background * (1 - cover[:, None]) + canopy * cover[:, None]
        track = SOIL * 0.8 * (1 - TRACK_COVER) + CROPS[2].canopy * TRACK_COVER
        return np.vstack([fields, track[None]]).astype(np.float32)

    def _scene(
        self,
        area: GeoBox,
        day: dt.date,
        layout: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        sensor: SensorSpec,
    ) -> tuple[np.ndarray, np.ndarray, float]:
        label, kinds, params, texture = layout
        rng = np.random.default_rng(
            _seed(self.seed, "scene", day.isoformat(), *area.extent.boundingbox)
        )
        doy = day.timetuple().tm_yday
        rows = _band_rows(sensor.bands)  # spectra by band name, in the caller's order
        spectra = self._spectra(doy, kinds, params)
        refl = spectra[:, rows].T[:, label]  # (bands, H, W)
        refl *= texture[None] * rng.normal(1.0, 0.02, size=(1, *label.shape)).astype(np.float32)
        b4, b8 = spectra[:, 2], spectra[:, 6]
        ndvi = ((b8 - b4) / (b8 + b4))[label]
        scl = np.where(ndvi > 0.3, 4, 5).astype(np.uint8)
        cloud_refl = CLOUD[rows]
        cover = float(np.clip(rng.normal(self.cloud_cover, 0.25), 0, 1))
        if cover > 0.02:
            h, w = label.shape
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            cloud = np.zeros((h, w), dtype=bool)
            for _ in range(int(1 + 6 * cover)):
                cy, cx = rng.uniform(0, h), rng.uniform(0, w)
                r = rng.uniform(0.1, 0.5) * max(h, w) * cover
                cloud |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            shadow = np.roll(cloud, (max(1, h // 30), max(1, w // 30)), axis=(0, 1)) & ~cloud
            refl[:, shadow] *= 0.35
            refl[:, cloud] = cloud_refl[:, None]
            scl[shadow] = 3
            scl[cloud] = np.where(rng.uniform(size=int(cloud.sum())) < 0.5, 8, 9)
            cloudy = 100.0 * float(cloud.mean())
        else:
            cloudy = 0.0
        data = np.clip(refl, 1, 10000).astype(np.uint16)
        return data, scl, cloudy

    def _days(self, windows: Sequence[FrameWindow]) -> list[dt.date]:
        """The overpass dates in the windows' range (every REVISIT_DAYS, seeded offset)."""
        start, end = windows[0].start, windows[-1].end
        first = start + dt.timedelta(days=_seed(self.seed, "orbit") % REVISIT_DAYS)
        return [first + dt.timedelta(days=d) for d in range(0, (end - first).days, REVISIT_DAYS)]

    def scene_index(
        self, area: GeoBox, windows: Sequence[FrameWindow], sensor: SensorSpec
    ) -> dict[str, str]:
        """Every synthetic scene of the range: a function of the seed, the fields' size and
        the generator alone, so its stamp."""
        stamp = f"seed {self.seed} fields {self.field_size_m:g} m generator {GENERATOR}"
        return {f"synthetic-{day.isoformat()}": stamp for day in self._days(windows)}

    def fetch(
        self,
        area: GeoBox,
        windows: Sequence[FrameWindow],
        sensor: SensorSpec,
        cloud_mask: CloudMask,
    ) -> FrameStack:
        layout = self._layout(area)
        scenes = []
        for day in self._days(windows):
            data, scl, cloudy = self._scene(area, day, layout, sensor)
            scenes.append(Scene(f"synthetic-{day.isoformat()}", day, cloudy, loaded(data, scl)))
        values, records = composite_windows(
            scenes, windows, sensor, cloud_mask, area_label="synthetic area"
        )
        return FrameStack(
            data=frame_stack_array(values, area, windows, sensor.bands),
            frames=records,
            provider=self.name,
            provider_version=self.version,
            synthetic=True,
            extra={
                "seed": self.seed,
                "generator": GENERATOR,
                "note": "SYNTHETIC data, not observations",
                SCENE_INDEX_KEY: scene_index_record(self.scene_index(area, windows, sensor)),
            },
        )

    # -- the labels' truth as polygons -----------------------------------------------------

    def field_polygons(self, area: GeoBox, inset_m: float = 0.0) -> Any:
        """Every field of ``area`` as a polygon (GeoDataFrame in the area's CRS) with its
        ``field_id``, ``crop`` name and ``crop_id``: the pixels it covers there (fields
        are rectangles), shrunk by ``inset_m``; fields cut by the area's edge are cut."""
        import geopandas as gpd
        import shapely

        truth = self.truth(area)
        a = area.affine
        recs: list[dict[str, Any]] = []
        for f in np.unique(truth.field):
            if f < 0:
                continue
            sel = truth.field == f
            rows, cols = np.nonzero(sel)
            r0, r1 = int(rows.min()), int(rows.max()) + 1
            c0, c1 = int(cols.min()), int(cols.max()) + 1
            x0, y0 = a @ (c0, r0)
            x1, y1 = a @ (c1, r1)
            geom = shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            if inset_m:
                geom = geom.buffer(-inset_m, join_style="mitre")
            if geom.is_empty:
                continue
            kind = int(truth.crop[sel][0])
            recs.append(
                {"field_id": int(f), "crop": CROP_NAMES[kind], "crop_id": kind, "geometry": geom}
            )
        return gpd.GeoDataFrame(recs, geometry="geometry", crs=str(area.crs))

    def write_field_labels(
        self, area: GeoBox, path: str | Path, *, inset_m: float = 0.0, crs: str = "EPSG:4326"
    ) -> Path:
        """The fields of ``area`` with their crop type as a GeoJSON file (a labels file for
        ``agrifm-pipeline classify --property crop``); returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.field_polygons(area, inset_m=inset_m).to_crs(crs).to_file(path, driver="GeoJSON")
        return path
