"""The one place that builds the Dagster ``Definitions`` (``defs``).

``workspace.yaml`` and ``dagster dev`` load ``defs``. Tests build their own
with :func:`build_defs` and the resources they need.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg

from agrifm_pipeline.compute import compute_from_env
from agrifm_pipeline.defs.assets import all_assets, region_product_assets, tile_year_assets
from agrifm_pipeline.defs.resources import AgriFMModel, S2Source, TileYearConfig, ZarrStorage
from agrifm_pipeline.defs.schedules import all_schedules
from agrifm_pipeline.defs.sensors import all_sensors
from agrifm_pipeline.errors import SettingsError
from agrifm_pipeline.providers import PROVIDER_NAMES
from agrifm_pipeline.settings import (
    BLOCK_SIDE_ENV,
    CHIP_PX_ENV,
    CHIPS_PER_SIDE_ENV,
    canonical_block_side,
    check_tile_geometry,
)

embed_tile_years = dg.define_asset_job(
    "embed_tile_years",
    selection=dg.AssetSelection.assets(*tile_year_assets),
    # One process per run (the run worker) does every step: checks are in the steps and
    # the heavy work is in the process or on the cluster, so step processes would only
    # import torch again (about 4 s and 1 GB each).
    executor_def=dg.in_process_executor,
    description="Frame stacks -> normalised tensors -> embedding grids -> chip vectors and previews.",
)
mosaic_regions = dg.define_asset_job(
    "mosaic_regions",
    selection=dg.AssetSelection.assets(*region_product_assets),
    description=(
        "One mosaic per registered region and year: float32, int8 and COG (the sensor makes "
        "those storage.mosaic_products names)."
    ),
)


def _s2_from_env(env: Mapping[str, str]) -> S2Source:
    """The deployment's Sentinel-2 source: ``AGRIFM_PIPELINE_S2_*`` variables, else the demo data."""
    fields = {
        "backend": "AGRIFM_PIPELINE_S2_BACKEND",
        "local_root": "AGRIFM_PIPELINE_S2_LOCAL_ROOT",
        "gee_project": "AGRIFM_PIPELINE_GEE_PROJECT",
        "gee_service_account_key": "AGRIFM_PIPELINE_GEE_KEY",
        "gee_endpoint": "AGRIFM_PIPELINE_GEE_ENDPOINT",
        **STAC_ENV,
    }
    given: dict[str, Any] = {k: env[v] for k, v in fields.items() if env.get(v)}
    backend = given.get("backend", "local")
    if backend not in PROVIDER_NAMES:
        raise SettingsError(
            f"AGRIFM_PIPELINE_S2_BACKEND={backend!r}; use one of {', '.join(PROVIDER_NAMES)}"
        )
    if backend == "stac":
        _check_stac_env(given)
    return S2Source(**given)


# The stac source's variables (see the README's "Open archives" section).
STAC_ENV = {
    "stac_profile": "AGRIFM_PIPELINE_STAC_PROFILE",
    "stac_api_url": "AGRIFM_PIPELINE_STAC_API_URL",
    "stac_collection": "AGRIFM_PIPELINE_STAC_COLLECTION",
    "stac_assets": "AGRIFM_PIPELINE_STAC_ASSETS",
    "stac_item_cache": "AGRIFM_PIPELINE_STAC_ITEM_CACHE",
    "stac_on_read_error": "AGRIFM_PIPELINE_STAC_ON_READ_ERROR",
    "stac_read_workers": "AGRIFM_PIPELINE_STAC_READ_WORKERS",
    "stac_harmonize": "AGRIFM_PIPELINE_STAC_HARMONIZE",
}


def _check_stac_env(given: dict[str, Any]) -> None:
    """The stac variables checked when the code location loads, each error naming its
    variable (the provider checks them again when it is built)."""
    from agrifm_pipeline.providers.stac import MAX_READ_WORKERS, check_on_read_error
    from agrifm_pipeline.providers.stac_profiles import resolve_profile

    try:
        resolve_profile(
            given.get("stac_profile", "earth-search"),
            api_url=given.get("stac_api_url"),
            collection=given.get("stac_collection"),
            assets=given.get("stac_assets"),
            harmonize=given.get("stac_harmonize"),
        )
    except SettingsError as exc:
        names = ", ".join(STAC_ENV[k] for k in STAC_ENV if k in given) or STAC_ENV["stac_profile"]
        raise SettingsError(f"{names}: {exc}") from None
    if "stac_on_read_error" in given:
        check_on_read_error(given["stac_on_read_error"], name=STAC_ENV["stac_on_read_error"])
    if "stac_read_workers" in given:
        raw = str(given["stac_read_workers"]).strip()
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_READ_WORKERS:
            raise SettingsError(
                f"{STAC_ENV['stac_read_workers']}={raw!r}; use a whole number 1..{MAX_READ_WORKERS}"
            )
        given["stac_read_workers"] = int(raw)


def _tile_year_from_env(env: Mapping[str, str]) -> TileYearConfig:
    """The tile geometry: ``AGRIFM_PIPELINE_CHIP_PX`` / ``_CHIPS_PER_SIDE`` (the demo's
    home sets them for its one-chip grid), else the design's 4 x 4 chips of 224 px; and
    the partition unit, ``AGRIFM_PIPELINE_BLOCK_SIDE`` (1: a tile).
    Checked here, naming the variables: the region sensor tiles with these values."""
    raw = {
        "chip_px": env.get(CHIP_PX_ENV, "").strip(),
        "chips_per_side": env.get(CHIPS_PER_SIDE_ENV, "").strip(),
    }
    defaults = TileYearConfig()
    chip_px, chips_per_side = check_tile_geometry(
        raw["chip_px"] or defaults.chip_px,
        raw["chips_per_side"] or defaults.chips_per_side,
        chip_px_name=CHIP_PX_ENV,
        chips_per_side_name=CHIPS_PER_SIDE_ENV,
    )
    checked: dict[str, Any] = {"chip_px": chip_px, "chips_per_side": chips_per_side}
    raw["block_side"] = env.get(BLOCK_SIDE_ENV, "").strip()
    if raw["block_side"]:
        checked["block_side"] = canonical_block_side(raw["block_side"], name=BLOCK_SIDE_ENV)
    return TileYearConfig(**{k: v for k, v in checked.items() if raw[k]})


def default_resources(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Resources on the embedded defaults; the environment picks the source, the storage
    root, the tile geometry and the regions directory (``AGRIFM_PIPELINE_REGIONS_DIR``)."""
    env = os.environ if env is None else env
    regions = env.get("AGRIFM_PIPELINE_REGIONS_DIR")
    return {
        "tile_year": _tile_year_from_env(env),
        "s2": _s2_from_env(env),
        "model": AgriFMModel(),
        "compute": compute_from_env(env),
        "storage": ZarrStorage(regions_dir=regions) if regions else ZarrStorage(),
    }


def build_defs(resources: Mapping[str, Any] | None = None) -> dg.Definitions:
    return dg.Definitions(
        assets=all_assets,
        jobs=[embed_tile_years, mosaic_regions],
        sensors=all_sensors,
        schedules=all_schedules,
        resources={**default_resources(), **(resources or {})},
        # Also the executor of the UI's materialisations and backfills (Dagster's implicit
        # asset job): one process per run, as for embed_tile_years.
        executor=dg.in_process_executor,
    )


defs = build_defs()
