"""Resources: the tile-year settings, the Sentinel-2 source, the model and the stores.

Every field left at ``None`` takes its value from the ``RS_EMBED_AGRIFM_*``
environment when it is used (runs and sensors read the same environment), so
the launchpad shows the overridable settings and the environment stays the
single default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import dagster as dg
from pydantic import Field

from agrifm_pipeline import stages
from agrifm_pipeline.catalog import StacCatalog
from agrifm_pipeline.checkpoint import ResolvedCheckpoint, resolve_checkpoint
from agrifm_pipeline.errors import SettingsError
from agrifm_pipeline.inference import EmbeddingEngine, InferenceOptions, get_engine
from agrifm_pipeline.lineage import Fingerprints
from agrifm_pipeline.model import resolve_precision
from agrifm_pipeline.providers import PROVIDER_NAMES, Provider, make_provider, provider_class
from agrifm_pipeline.providers.gee import DEFAULT_DEPLOYMENT_SLOTS
from agrifm_pipeline.registry import RegionRegistry
from agrifm_pipeline.runtime import freeze_long_lived
from agrifm_pipeline.settings import (
    MOSAIC_PRODUCTS,
    AgriFMSettings,
    canonical_mosaic_products,
    load_settings,
    pipeline_storage,
    pipeline_storage_root,
)
from agrifm_pipeline.storage import (
    FileStore,
    PartitionStore,
    ZarrStore,
    storage_options_from_env,
)
from agrifm_pipeline.tiles import MAX_BLOCK_SIDE
from agrifm_pipeline.tileyear import DEFAULT_MIN_CHIP_COVERAGE, TileYearSettings


def default_storage_root() -> str:
    """``AGRIFM_PIPELINE_STORAGE`` (an unknown URL protocol is a SettingsError naming it)
    or ``<AGRIFM_PIPELINE_HOME or .agrifm>/store``."""
    return pipeline_storage_root()


# Why a tile-year is stale, as the stale sensor tells causes apart: the checkpoint; the other
# embedding settings (precision, encoder, min_chip_coverage); normalisation settings;
# acquisition settings (collection, bands, frames, cloud filter and mask, composite, tile
# size); the source (another provider or root, or scenes changed, added or removed there);
# a stage's code version; a partition missing from the store or failing verification.
RERUN_CAUSES = (
    "checkpoint",
    "embedding",
    "normalisation",
    "acquisition",
    "source",
    "code",
    "repair",
)
# A changed source re-makes frames from other data (a new root, another provider, a scene
# reprocessed): reported by the audit and the sensor, re-run only when configured.
DEFAULT_RERUN_ON = tuple(c for c in RERUN_CAUSES if c != "source")
RERUN_ON_ENV = "AGRIFM_PIPELINE_RERUN_ON"


def rerun_causes(
    given: list[str] | None = None, env: Mapping[str, str] | None = None
) -> frozenset[str]:
    """``given``, else ``AGRIFM_PIPELINE_RERUN_ON`` (comma-separated; ``all`` or ``none``),
    else :data:`DEFAULT_RERUN_ON`; an unknown cause is a SettingsError naming the known ones."""
    env = os.environ if env is None else env
    if given is None:
        raw = env.get(RERUN_ON_ENV, "").strip()
        if not raw:
            return frozenset(DEFAULT_RERUN_ON)
        given = [] if raw == "none" else list(RERUN_CAUSES) if raw == "all" else raw.split(",")
    causes = {c.strip() for c in given if c.strip()}
    unknown = sorted(causes - set(RERUN_CAUSES))
    if unknown:
        raise SettingsError(
            f"rerun_on names {unknown}; use any of {', '.join(RERUN_CAUSES)} "
            f"(or {RERUN_ON_ENV}=all / none)"
        )
    return frozenset(causes)


class TileYearConfig(dg.ConfigurableResource):
    """What a tile-year's arrays contain. ``None`` = the RS_EMBED_AGRIFM_* value."""

    n_frames: int | None = Field(
        default=None, description="frames per year (RS_EMBED_AGRIFM_FRAMES)"
    )
    image_size: int | None = Field(
        default=None, description="chip resize target (RS_EMBED_AGRIFM_IMG)"
    )
    norm_mode: str | None = Field(
        default=None, description="agrifm_stats | unit_scale | none (RS_EMBED_AGRIFM_NORM)"
    )
    chip_px: int = Field(default=224, description="chip side in pixels")
    chips_per_side: int = Field(default=4, description="chips per tile side")
    scale_m: float = Field(default=10.0, description="pixel size in metres (UTM)")
    block_side: int = Field(
        default=1,
        ge=1,
        le=MAX_BLOCK_SIDE,
        description=(
            "tiles per side of a tiles-dimension partition (AGRIFM_PIPELINE_BLOCK_SIDE): 1 = "
            "one partition per tile-year; n = one per block of n x n tiles (a continent: 8), "
            "each tile still its own versions in the store. Read when a region's tiles "
            "become partitions; a tile already a partition stays one"
        ),
    )
    collection: str = "COPERNICUS/S2_SR_HARMONIZED"
    cloudy_pct: float = Field(
        default=30.0, description="scene filter: CLOUDY_PIXEL_PERCENTAGE <= this"
    )
    composite: str = Field(default="median", description="median | mosaic")
    fill_value: float = 0.0
    cloud_mask: str = Field(default="scl", description="scl (per-pixel SCL masking) | none")
    min_clear_fraction: float = Field(
        default=0.2, description="asset check: least mean clear fraction"
    )
    rerun_on: list[str] | None = Field(
        default=None,
        description=(
            "stale sensor: the causes whose stale tile-years it re-runs automatically, of "
            f"{', '.join(RERUN_CAUSES)}; None = AGRIFM_PIPELINE_RERUN_ON (comma-separated), "
            "else every cause but source (a changed source is reported, not re-run)"
        ),
    )
    min_chip_coverage: float = Field(
        default=DEFAULT_MIN_CHIP_COVERAGE,
        description=(
            "encode a chip only when at least this share of its pixel-frames hold data; "
            "the others are NaN in the grid and cost no encoder time (0 = every chip)"
        ),
    )

    def rerun_causes(self) -> frozenset[str]:
        """The causes the stale sensor re-runs automatically (see :data:`RERUN_CAUSES`)."""
        return rerun_causes(self.rerun_on)

    def agrifm_settings(self) -> AgriFMSettings:
        overrides = {
            k: v
            for k, v in (
                ("n_frames", self.n_frames),
                ("image_size", self.image_size),
                ("norm_mode", self.norm_mode),
            )
            if v is not None
        }
        return load_settings(None, **overrides)

    def resolve(self) -> TileYearSettings:
        return TileYearSettings.from_settings(
            self.agrifm_settings(),
            chip_px=self.chip_px,
            chips_per_side=self.chips_per_side,
            scale_m=self.scale_m,
            collection=self.collection,
            cloudy_pct=self.cloudy_pct,
            composite=self.composite,
            fill_value=self.fill_value,
            cloud_mask=self.cloud_mask,
            min_chip_coverage=self.min_chip_coverage,
        )


class S2Source(dg.ConfigurableResource):
    """Where Sentinel-2 frames come from: ``local`` files/STAC, Earth Engine, a STAC API
    (``stac``: Earth Search, the Planetary Computer, any other), or ``synthetic``."""

    backend: str = Field(default="local", description=" | ".join(PROVIDER_NAMES))
    local_root: str = Field(
        default="data/s2_sample", description="local: scene directory or STAC catalog"
    )
    gee_project: str | None = Field(default=None, description="gee: Cloud project id")
    gee_service_account_key: str | None = Field(
        default=None, description="gee: key file (else default credentials)"
    )
    gee_endpoint: str = Field(default="default", description="gee: default | highvolume | URL")
    gee_max_concurrent: int = Field(
        default=16, description="gee: concurrent requests per process (< 40)"
    )
    gee_deployment_slots: int = Field(
        default=DEFAULT_DEPLOYMENT_SLOTS,
        description=(
            "gee: concurrent requests of every process that shares gee_slots_dir together "
            "(< 40, Earth Engine's limit per Cloud project)"
        ),
    )
    gee_slots_dir: str | None = Field(
        default=None,
        description=(
            "gee: directory of the deployment-wide slot locks, shared by every worker (across "
            "nodes: on a file system with cluster-wide locks); default "
            "RS_EMBED_AGRIFM_GEE_SLOTS_DIR, else one per node and project in the temp dir"
        ),
    )
    synthetic_seed: int = 0
    synthetic_field_m: float = Field(
        default=400.0, description="synthetic: the fields' mean side in metres"
    )
    stac_profile: str = Field(
        default="earth-search",
        description="stac: earth-search | planetary-computer | custom (give api, collection, assets)",
    )
    stac_api_url: str | None = Field(default=None, description="stac: the API's root URL")
    stac_collection: str | None = Field(default=None, description="stac: the collection id")
    stac_assets: str | None = Field(
        default=None, description='stac: band -> asset key JSON ({"B2": "blue", …, "SCL": "scl"})'
    )
    stac_item_cache: str | None = Field(
        default=None,
        description=(
            "stac: where each tile-year's item JSON is kept (a path or fsspec URL; 'none' = "
            "search every time); default <AGRIFM_PIPELINE_STORAGE root>/_sources/stac"
        ),
    )
    stac_on_read_error: str = Field(
        default="fail",
        description=(
            "stac: fail (a read failing after its retries fails the tile-year) | record (left "
            "out, counted and named in the frame record)"
        ),
    )
    stac_read_workers: int = Field(default=8, description="stac: reads in flight per tile-year")
    stac_harmonize: str | None = Field(
        default=None,
        description=(
            "stac: baseline (the profile's default: take the +1000 offset off items of "
            "baseline 04.00 and later) | none (the archive serves harmonized DN)"
        ),
    )
    fetch_workers: int | None = Field(
        default=None, description="tile-years fetched at once (RS_EMBED_AGRIFM_FETCH_WORKERS)"
    )

    def _options(self) -> dict[str, Any]:
        """This source's constructor options for its provider."""
        if self.backend == "local":
            return {"root": self.local_root}
        if self.backend == "gee":
            return {
                "project": self.gee_project,
                "service_account_key": self.gee_service_account_key,
                "endpoint": self.gee_endpoint,
                "max_concurrent": self.gee_max_concurrent,
                "deployment_slots": self.gee_deployment_slots,
                "slots_dir": self.gee_slots_dir or None,
            }
        if self.backend == "stac":
            return self._stac_options()
        return {"seed": self.synthetic_seed, "field_size_m": self.synthetic_field_m}

    def _stac_options(self) -> dict[str, Any]:
        cache = (self.stac_item_cache or "").strip()
        options: dict[str, Any] = {}
        if cache.lower() == "none":
            cache = ""
        elif not cache:  # beside the outputs, with the storage root's own options
            location = pipeline_storage()
            cache, options = f"{location.root.rstrip('/')}/_sources/stac", location.options
        return {
            "profile": self.stac_profile,
            "api_url": self.stac_api_url or None,
            "collection": self.stac_collection or None,
            "assets": self.stac_assets or None,
            "item_cache": cache or None,
            "item_cache_options": options,
            "on_read_error": self.stac_on_read_error,
            "read_workers": self.stac_read_workers,
            "harmonize": self.stac_harmonize or None,
        }

    def provider(self) -> Provider:
        return make_provider(self.backend, **self._options())

    def identity(self) -> dict[str, Any]:
        """What names the data source in lineage and fingerprints (the provider's own word)."""
        out: dict[str, Any] = provider_class(self.backend).identity(**self._options())
        return out

    def workers(self) -> int:
        return self.fetch_workers or load_settings().fetch_workers


class AgriFMModel(dg.ConfigurableResource):
    """The encoder: checkpoint (None = RS_EMBED_AGRIFM_CKPT, then cache, then download), device, precision."""

    checkpoint: str | None = Field(
        default=None, description="path, or untrained:<seed> (never a fallback)"
    )
    device: str = Field(default="auto", description="cpu | cuda | auto")
    precision: str = Field(default="float32", description="float32 | bfloat16 (autocast)")
    batch_size: int = Field(default=8, description="chips per forward pass")
    encoder: str = Field(default="ours", description="ours | official (needs the source tree)")

    def resolved(self) -> ResolvedCheckpoint:
        return resolve_checkpoint(self.checkpoint or None, load_settings())

    def precision_class(self) -> str:
        return resolve_precision(self.precision)[0]

    def engine(self) -> EmbeddingEngine:
        engine = get_engine(
            self.checkpoint or None,
            settings=load_settings(),
            options=InferenceOptions(
                device=self.device,
                precision=self.precision,
                batch_size=self.batch_size,
                encoder=self.encoder,
            ),
        )
        freeze_long_lived(engine)  # the step's process holds it to the end
        return engine


# The stored assets by kind of store, in the stage table's order (upstream first).
ZARR_ASSETS = tuple(s.asset for s in stages.TABLE if s.store == "zarr")
FILE_ASSETS = tuple(s.asset for s in stages.TABLE if s.store == "files")


Store = TypeVar("Store", bound=PartitionStore)


class ZarrStorage(dg.ConfigurableResource):
    """Where outputs live: a local directory or any fsspec URL (s3://, gs://, …).

    Every partition is a set of immutable versions and a pointer to the current one
    (see :mod:`agrifm_pipeline.storage`); ``storage_options`` reach every read and
    write (Zarr stores, Parquet, PNG, the region registry and the STAC catalog).
    """

    root: str = Field(default_factory=default_storage_root, description="storage root")
    storage_options: dict[str, Any] = Field(
        default_factory=storage_options_from_env,
        description=(
            "fsspec options for the root (endpoint_url, profile, anon…); default "
            "AGRIFM_PIPELINE_STORAGE_OPTIONS (JSON)"
        ),
    )
    zarr_format: int = Field(default=2, description="2 (GDAL/QGIS open it) or 3")
    regions_dir: str = Field(
        default="data/regions", description="region files watched by the sensor"
    )
    keep_tensors: bool = Field(
        default=False,
        description=(
            "normalized_tensors: also store the float32 model input (4x the raw frames' "
            "bytes); off = per-chip statistics and lineage, and the embedding step "
            "normalises the stored frames again (exactly, verified)"
        ),
    )
    mosaic_products: list[str] | None = Field(
        default=None,
        description=(
            "what the mosaic sensor makes of a region's grids: any of float32 (region_mosaic), "
            "int8 (region_mosaic_int8), cog (region_mosaic_cog, a GeoTIFF per UTM zone); "
            "None = AGRIFM_PIPELINE_MOSAIC_PRODUCTS (comma-separated), else all three"
        ),
    )

    def store(self, asset: str) -> ZarrStore:
        store = ZarrStore(
            self.root, asset, zarr_format=self.zarr_format, storage_options=self.storage_options
        )
        return self._sized(store)

    def files(self, asset: str) -> FileStore:
        return self._sized(FileStore(self.root, asset, storage_options=self.storage_options))

    def _sized(self, store: Store) -> Store:
        """A tile-year asset's index is sized, when a year's is first made, for the
        registered tiles (asked once per year and process)."""
        row = stages.BY_ASSET.get(store.asset)
        if row is not None and row.partitions == "tile-year":
            store.index_size_hint = lambda: len(self.registry().owners())
        return store

    def stage_store(self, name: str) -> PartitionStore:
        """A stored asset's partitions (``name``: the asset or its stage), in the kind of
        store its stage-table row names; any other name is a KeyError naming the assets."""
        row = stages.stage(name)
        return self.store(row.asset) if row.store == "zarr" else self.files(row.asset)

    def all_stores(self) -> list[PartitionStore]:
        """Every stored asset's partitions, upstream first (verify, gc, the catalog)."""
        return [self.stage_store(s.asset) for s in stages.TABLE]

    def region_products(self) -> tuple[stages.Stage, ...]:
        """The region products this deployment makes (``mosaic_products``), table order."""
        by_name = dict(zip(MOSAIC_PRODUCTS, stages.REGION_PRODUCTS, strict=True))
        return tuple(by_name[p] for p in canonical_mosaic_products(self.mosaic_products))

    def registry(self) -> RegionRegistry:
        return RegionRegistry(self.root, storage_options=self.storage_options)

    def catalog(self) -> StacCatalog:
        return StacCatalog(self.root, storage_options=self.storage_options)


def run_fingerprints(
    cfg: TileYearSettings, s2: S2Source, checkpoint_sha256: str, model: AgriFMModel | None = None
) -> Fingerprints:
    """Stage fingerprints for these resources: what the assets record and the stale
    sensor compares against, computed in one place so the two always agree.
    (Without a model only the acquisition and normalisation stages are meaningful.)"""
    return cfg.fingerprints(
        provider=s2.identity(),
        checkpoint_sha256=checkpoint_sha256,
        precision=model.precision_class() if model is not None else "float32",
        encoder=model.encoder if model is not None else "ours",
    )
