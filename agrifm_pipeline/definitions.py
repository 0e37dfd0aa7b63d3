"""The one place that builds the Dagster ``Definitions`` (``defs``).

``workspace.yaml`` and ``dagster dev`` load ``defs``. Tests build their own
with :func:`build_defs` and the resources they need.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

from agrifm_pipeline.defs.assets import all_assets, region_mosaic, tile_year_assets
from agrifm_pipeline.defs.checks import all_checks
from agrifm_pipeline.defs.resources import AgriFMModel, S2Source, TileYearConfig, ZarrStorage
from agrifm_pipeline.defs.schedules import all_schedules
from agrifm_pipeline.defs.sensors import all_sensors
from agrifm_pipeline.defs.staleness import all_staleness_sensors, lineage_audit

embed_tile_years = dg.define_asset_job(
    "embed_tile_years",
    selection=dg.AssetSelection.assets(*tile_year_assets),
    description="Frame stacks -> normalised tensors -> embedding grids -> chip vectors and previews.",
)
mosaic_regions = dg.define_asset_job(
    "mosaic_regions",
    selection=dg.AssetSelection.assets(region_mosaic),
    description="One mosaic per registered region and year.",
)


def default_resources() -> dict[str, Any]:
    return {
        "tile_year": TileYearConfig(),
        "s2": S2Source(),
        "model": AgriFMModel(),
        "storage": ZarrStorage(),
    }


def build_defs(resources: Mapping[str, Any] | None = None) -> dg.Definitions:
    return dg.Definitions(
        assets=[*all_assets, lineage_audit],  # type: ignore[list-item]
        asset_checks=all_checks,
        jobs=[embed_tile_years, mosaic_regions],
        sensors=[*all_sensors, *all_staleness_sensors],
        schedules=all_schedules,
        resources={**default_resources(), **(resources or {})},
    )


defs = build_defs()
