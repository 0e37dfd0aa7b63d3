"""A small pipeline on the real sample: 2 tiles x 2 years with the tiny reference checkpoint.

Tiles are 2 x 2 chips of 64 px at 10 m (1280 m); the sample (64 x 64 px near
574680 E, 5621800 N) falls across the two tiles of row 4392, so both hold real
pixels and one is mostly fill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import geopandas as gpd
import shapely

from agrifm_pipeline.definitions import build_defs
from agrifm_pipeline.defs.partitions import tile_year_key
from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
from agrifm_pipeline.defs.resources import AgriFMModel, S2Source, TileYearConfig, ZarrStorage

REPO_ROOT = Path(__file__).resolve().parents[1]
TILES = ["32631_1280m_E0448_N4392", "32631_1280m_E0449_N4392"]
YEARS = [2018, 2019]
TINY = REPO_ROOT / "agrifm_pipeline_tests" / "fixtures" / "agrifm" / "tiny_p444.pth"


@dataclass
class Pipeline:
    root: Path
    resources: dict[str, Any]
    defs: dg.Definitions
    instance: dg.DagsterInstance

    @property
    def storage(self) -> ZarrStorage:
        return self.resources["storage"]  # type: ignore[no-any-return]

    def materialise(
        self, tiles: list[str], years: list[int], **tags: str
    ) -> dg.ExecuteInProcessResult:
        job = self.defs.resolve_job_def("embed_tile_years")
        return job.execute_in_process(
            instance=self.instance,
            tags={
                RANGE_START: str(tile_year_key(tiles[0], years[0])),
                RANGE_END: str(tile_year_key(tiles[-1], years[-1])),
                **tags,
            },
        )


def make_resources(
    root: Path, checkpoint: str | Path = TINY, keep_tensors: bool = False, **tile_year: Any
) -> dict[str, Any]:
    cfg = {"chip_px": 64, "chips_per_side": 2, "image_size": 64, "n_frames": 8, **tile_year}
    return {
        "tile_year": TileYearConfig(**cfg),
        "s2": S2Source(local_root=str(REPO_ROOT / "data" / "s2_sample")),
        "model": AgriFMModel(checkpoint=str(checkpoint), device="cpu"),
        "storage": ZarrStorage(
            root=str(root / "store"), regions_dir=str(root / "regions"), keep_tensors=keep_tensors
        ),
    }


def make_pipeline(root: Path, instance: dg.DagsterInstance | None = None, **kw: Any) -> Pipeline:
    resources = make_resources(root, **kw)
    defs = build_defs(resources)
    instance = instance or dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("tiles", TILES)
    return Pipeline(root, resources, defs, instance)


def write_region(
    path: Path, x0: float, y0: float, x1: float, y1: float, crs: str = "EPSG:32631"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    gpd.GeoDataFrame(geometry=[shapely.box(x0, y0, x1, y1)], crs=crs).to_file(
        path, driver="GeoJSON"
    )
    return path
