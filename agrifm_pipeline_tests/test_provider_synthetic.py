"""The synthetic provider: deterministic per seed, a plausible season, labelled synthetic."""

from __future__ import annotations

import numpy as np
from odc.geo.geobox import GeoBox

from agrifm_pipeline.frames import frame_windows
from agrifm_pipeline.providers.base import CloudMask, Provider
from agrifm_pipeline.providers.synthetic import SyntheticProvider
from agrifm_pipeline.specs import SensorSpec


def test_synthetic_is_deterministic_plausible_and_labelled() -> None:
    area = GeoBox.from_bbox((500000.0, 5600000.0, 501280.0, 5601280.0), "EPSG:32631", resolution=10)
    wins = frame_windows(2020, 8)
    a = SyntheticProvider(seed=1).fetch(area, wins, SensorSpec(), CloudMask())
    b = SyntheticProvider(seed=1).fetch(area, wins, SensorSpec(), CloudMask())
    c = SyntheticProvider(seed=2).fetch(area, wins, SensorSpec(), CloudMask())
    assert np.array_equal(a.data.values, b.data.values) and not np.array_equal(
        a.data.values, c.data.values
    )
    assert a.synthetic and a.provider == "synthetic" and a.record()["synthetic"] is True
    v = a.data.values.astype(float)
    ndvi = ((v[:, 6] - v[:, 2]) / (v[:, 6] + v[:, 2])).mean(axis=(1, 2))
    assert ndvi.max() > 0.5 and ndvi[0] < 0.35 and ndvi.argmax() in (2, 3, 4, 5)  # a growing season
    assert v.max() <= 10000 and v[:, :, :].mean() > 100
    assert isinstance(SyntheticProvider(), Provider)
