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
    # a growing season: winter well below a mid-year peak (grassland stays green in winter)
    assert ndvi.max() > 0.5 and ndvi[0] < ndvi.max() - 0.15 and ndvi.argmax() in (2, 3, 4, 5)
    assert v.max() <= 10000 and v[:, :, :].mean() > 100
    assert isinstance(SyntheticProvider(), Provider)


def test_what_the_synthetic_source_draws_is_in_its_identity_and_scene_stamps() -> None:
    """A change in how the source draws (the generator, the fields' size) reads as another
    source: stored synthetic frames of the old drawing are then stale, not current."""
    from agrifm_pipeline.defs.resources import S2Source, TileYearConfig, run_fingerprints
    from agrifm_pipeline.providers.synthetic import GENERATOR

    area = GeoBox.from_bbox((500000.0, 5600000.0, 500640.0, 5600640.0), "EPSG:32631", resolution=10)
    wins = frame_windows(2020, 4)
    a, b = SyntheticProvider(seed=1), SyntheticProvider(seed=1, field_size_m=800)
    assert SyntheticProvider.identity(seed=1)["generator"] == GENERATOR
    stamps = set(a.scene_index(area, wins, SensorSpec()).values())
    assert stamps == {f"seed 1 fields 400 m generator {GENERATOR}"}
    assert stamps != set(b.scene_index(area, wins, SensorSpec()).values())
    cfg = TileYearConfig(chip_px=32, chips_per_side=2, n_frames=4, image_size=32).resolve()
    fps = [
        run_fingerprints(
            cfg, S2Source(backend="synthetic", synthetic_seed=1, synthetic_field_m=m), ""
        )
        for m in (400.0, 800.0)
    ]
    assert fps[0].acquisition.as_record() != fps[1].acquisition.as_record()
