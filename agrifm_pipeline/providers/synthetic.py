"""Deterministic, plausible Sentinel-2 series for demos and tests — and labelled as such.

The area is divided into fields (Voronoi cells of seeded points); each field
gets a crop type with a seasonal NDVI curve (double logistic: green-up and
senescence dates drawn per field), and band reflectances are mixed from a
soil and a vegetation spectrum by that NDVI. Scenes come every 5 days, as
Sentinel-2's revisit, each with seeded clouds (bright, SCL 8/9), their
shadows (dark, SCL 3) and a scene-level cloudy percentage; they are then
composited by the same code as real data. Everything is seeded from the
provider seed and the area's bounds, so the same request always gives the same
stack. Every stack says ``provider="synthetic"`` and ``synthetic=True``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from odc.geo.geobox import GeoBox

from agrifm_pipeline.frames import FrameWindow
from agrifm_pipeline.lineage import SCENE_INDEX_KEY, scene_index_record
from agrifm_pipeline.providers.base import CloudMask, FrameStack, frame_stack_array
from agrifm_pipeline.providers.compositing import Scene, composite_windows, loaded
from agrifm_pipeline.specs import SensorSpec


# Reflectance (DN) of bare soil and dense green vegetation for B2..B12.
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


# Spectra in AgriFM's band order (B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12).
SOIL = np.array([900, 1200, 1500, 1700, 1850, 1950, 2100, 2200, 2900, 2500], dtype=np.float32)
VEGETATION = np.array([300, 600, 350, 1100, 2800, 3500, 4000, 4200, 2200, 1100], dtype=np.float32)
CLOUD = np.array([7500, 7400, 7300, 7300, 7300, 7200, 7300, 7200, 5200, 4000], dtype=np.float32)
REVISIT_DAYS = 5
FIELD_SIZE_M = 400.0
# Crop calendars: (green-up day-of-year, senescence day-of-year, peak NDVI).
CROPS = {
    "winter_cereal": (70.0, 180.0, 0.85),
    "maize": (150.0, 260.0, 0.9),
    "grassland": (60.0, 300.0, 0.7),
    "sugar_beet": (130.0, 280.0, 0.85),
}


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class SyntheticProvider:
    """Seeded synthetic S2 L2A scenes, composited like real ones."""

    name = "synthetic"

    synthetic = True

    @staticmethod
    def identity(seed: int = 0, **_: Any) -> dict[str, Any]:
        """What names this source in lineage and fingerprints."""
        return {"name": "synthetic", "seed": int(seed)}

    def __init__(self, seed: int = 0, cloud_cover: float = 0.3) -> None:
        from agrifm_pipeline import __version__

        self.seed = int(seed)
        self.cloud_cover = float(cloud_cover)
        self.version = f"{__version__}+seed{self.seed}"

    def _fields(self, area: GeoBox) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel field index (H, W) and per-field (green-up, senescence, peak NDVI).

        Fields are rectangular parcels on seeded, uneven row and column bands,
        as arable land mostly is.
        """
        bbox = area.extent.boundingbox
        rng = np.random.default_rng(_seed(self.seed, "fields", *bbox))
        h, w = area.shape
        res = abs(area.resolution.x)
        mean_px = max(2.0, FIELD_SIZE_M / res)

        def bands(n_px: int) -> np.ndarray:
            edges = np.cumsum(rng.uniform(0.5, 1.5, size=int(n_px / mean_px) + 2) * mean_px).astype(
                int
            )
            return np.searchsorted(edges, np.arange(n_px), side="right")

        row_band, col_band = bands(h), bands(w)
        n_cols = int(col_band.max()) + 1
        label = row_band[:, None] * n_cols + col_band[None, :]
        n = int(label.max()) + 1
        names = list(CROPS)
        kinds = rng.integers(0, len(names), size=n)
        params = np.array([CROPS[names[k]] for k in kinds], dtype=np.float32)
        params[:, :2] += rng.normal(0, 8, size=(n, 2)).astype(np.float32)  # field-to-field dates
        return label, params

    def _scene(
        self, area: GeoBox, day: dt.date, label: np.ndarray, params: np.ndarray, sensor: SensorSpec
    ):
        rng = np.random.default_rng(
            _seed(self.seed, "scene", day.isoformat(), *area.extent.boundingbox)
        )
        doy = day.timetuple().tm_yday
        up, down, peak = params[:, 0], params[:, 1], params[:, 2]
        ndvi_field = 0.15 + (peak - 0.15) * (
            1 / (1 + np.exp(-(doy - up) / 8)) - 1 / (1 + np.exp(-(doy - down) / 8))
        )
        ndvi = np.clip(ndvi_field[label], 0.05, 0.95)  # (H, W)
        frac = ((ndvi - 0.05) / 0.9)[None]
        rows = _band_rows(sensor.bands)  # spectra by band name, in the caller's order
        soil, vegetation, cloud_refl = SOIL[rows], VEGETATION[rows], CLOUD[rows]
        refl = soil[:, None, None] * (1 - frac) + vegetation[:, None, None] * frac
        refl *= rng.normal(1.0, 0.03, size=(1, *label.shape)).astype(np.float32)
        scl = np.where(ndvi > 0.3, 4, 5).astype(np.uint8)
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
        """Every synthetic scene of the range: a function of the seed alone, so its stamp."""
        return {f"synthetic-{day.isoformat()}": f"seed {self.seed}" for day in self._days(windows)}

    def fetch(
        self,
        area: GeoBox,
        windows: Sequence[FrameWindow],
        sensor: SensorSpec,
        cloud_mask: CloudMask,
    ) -> FrameStack:
        label, params = self._fields(area)
        scenes = []
        for day in self._days(windows):
            data, scl, cloudy = self._scene(area, day, label, params, sensor)
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
                "note": "SYNTHETIC data, not observations",
                SCENE_INDEX_KEY: scene_index_record(self.scene_index(area, windows, sensor)),
            },
        )
