"""Sensors: region files -> tile and region partitions."""

import hashlib
import json
from typing import Any

import dagster as dg

from agrifm_pipeline.defs.partitions import regions_partitions, tiles_partitions
from agrifm_pipeline.defs.resources import TileYearConfig, ZarrStorage
from agrifm_pipeline.registry import RegionChange
from agrifm_pipeline.storage import IndexedReader


def register_regions(
    instance: dg.DagsterInstance, tile_year: TileYearConfig, storage: ZarrStorage
) -> tuple[list[RegionChange], list[str], list[str]]:
    """Scan the regions directory; return (changes, new tile keys, new region keys).

    Shared by the sensor and the demo command. Nothing is ever deleted: a
    removed region is marked ``removed`` and its tiles stay partitions.
    """
    changes = storage.registry().scan(
        storage.regions_dir,
        chip_px=tile_year.chip_px,
        chips_per_side=tile_year.chips_per_side,
        scale_m=tile_year.scale_m,
    )
    registry = storage.registry()
    known_tiles = set(instance.get_dynamic_partitions(tiles_partitions.name or "tiles"))
    known_regions = set(instance.get_dynamic_partitions(regions_partitions.name or "regions"))
    # Everything registered but not yet a partition (also heals a tick that died
    # after updating the registry and before its partition requests landed).
    new_tiles = sorted(set(registry.owners()) - known_tiles)
    new_regions = sorted(set(registry.active_regions()) - known_regions)
    return changes, new_tiles, new_regions


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers region files under the regions directory as tile and region partitions.",
)
def region_files_sensor(
    context: dg.SensorEvaluationContext, tile_year: TileYearConfig, storage: ZarrStorage
) -> dg.SensorResult | dg.SkipReason:
    changes, new_tiles, new_regions = register_regions(context.instance, tile_year, storage)
    if not (changes or new_tiles or new_regions):
        return dg.SkipReason(f"no new or changed region files in {storage.regions_dir}")
    for ch in changes:
        if ch.status == "error":
            context.log.error(f"region {ch.region}: {ch.message}")
        else:
            context.log.info(f"region {ch.region} {ch.status}: {len(ch.tiles)} tiles")
    requests = []
    if new_tiles:
        requests.append(tiles_partitions.build_add_request(new_tiles))
    if new_regions:
        requests.append(regions_partitions.build_add_request(new_regions))
    # No cursor: the registry document is the state (what each file's sha256 was).
    return dg.SensorResult(dynamic_partitions_requests=requests)


def mosaic_inputs(grids: Any, tiles: list[str], year: int) -> dict[str, str] | None:
    """tile -> its current grid version; None while any tile lacks a grid."""
    out = {}
    for t in tiles:
        v = grids.current(year, t)
        if v is None:
            return None
        out[t] = v.id
    return out


@dg.sensor(
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=["region_mosaic"],
    description=(
        "Requests a region's mosaic for a year once all its tiles have grids, and again "
        "whenever one of those grids is re-made."
    ),
)
def region_mosaic_sensor(
    context: dg.SensorEvaluationContext, storage: ZarrStorage
) -> dg.SensorResult | dg.SkipReason:
    from agrifm_pipeline.defs.partitions import region_year_key, year_keys

    # Both read through their per-year indexes: one read per year, not one per tile.
    mosaics = IndexedReader(storage.store("region_mosaic"))
    grids = IndexedReader(storage.store("agrifm_embedding_grid"))
    known = set(context.instance.get_dynamic_partitions(regions_partitions.name or "regions"))
    requests = []
    for region, entry in sorted(storage.registry().active_regions().items()):
        if region not in known:
            continue
        for year in map(int, year_keys()):
            inputs = mosaic_inputs(grids, entry["tiles"], year)
            if inputs is None:
                continue
            made = None
            v = mosaics.current(year, region)
            if v is not None:
                read = mosaics.judged_lineage(v).get("inputs", {})
                made = read.get("agrifm_embedding_grid", {}).get("versions")
            if made == inputs:
                continue
            stamp = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
            requests.append(
                dg.RunRequest(
                    run_key=f"mosaic:{region}:{year}:{stamp}",
                    asset_selection=[dg.AssetKey("region_mosaic")],
                    partition_key=str(region_year_key(region, year)),
                )
            )
    if not requests:
        return dg.SkipReason("every region mosaic is up to date with its tiles' grids")
    return dg.SensorResult(run_requests=requests)


all_sensors = [region_files_sensor, region_mosaic_sensor]
