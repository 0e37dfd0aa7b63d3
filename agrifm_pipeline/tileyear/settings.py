"""The resolved settings one tile-year step runs with (:class:`TileYearSettings`).

Of the three types that carry the tile-year settings (see :mod:`agrifm_pipeline.settings`),
this is the one a step runs with: every value resolved (the ``RS_EMBED_AGRIFM_*``
environment contract, :class:`~agrifm_pipeline.settings.AgriFMSettings`, overlaid with
the Dagster resource config, ``TileYearConfig``), each normalised by its one function in
:mod:`agrifm_pipeline.settings`; and what a partition's lineage records
(:meth:`TileYearSettings.as_record`) and its stage fingerprints cover
(:meth:`TileYearSettings.fingerprints`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from agrifm_pipeline.errors import SettingsError
from agrifm_pipeline.lineage import Fingerprints, stage_fingerprints
from agrifm_pipeline.providers.base import DEFAULT_MASKED_SCL, CloudMask
from agrifm_pipeline.settings import (
    AgriFMSettings,
    canonical_image_size,
    canonical_n_frames,
    canonical_norm_mode,
    check_min_chip_coverage,
    check_tile_geometry,
    load_settings,
)
from agrifm_pipeline.specs import AGRIFM_S2_BANDS, SensorSpec
from agrifm_pipeline.tiles import DEFAULT_CHIP_PX, DEFAULT_CHIPS_PER_SIDE, Tile, tile_size_m

DEFAULT_MIN_CHIP_COVERAGE = 0.05


@dataclass(frozen=True)
class TileYearSettings:
    """The resolved run settings: everything that decides what a tile-year's arrays contain.

    Defaults follow the ``RS_EMBED_AGRIFM_*`` settings (frames, image size,
    normalisation) and the design's tile geometry (4 x 4 chips of 224 px at
    10 m). :meth:`from_settings` resolves them from the environment contract
    (:class:`~agrifm_pipeline.settings.AgriFMSettings`) and overrides (the Dagster
    resource config's fields); :meth:`from_record` from a partition's lineage.
    """

    n_frames: int = 8
    image_size: int = 224
    norm_mode: str = "agrifm_stats"
    chip_px: int = DEFAULT_CHIP_PX
    chips_per_side: int = DEFAULT_CHIPS_PER_SIDE
    scale_m: float = 10.0
    collection: str = "COPERNICUS/S2_SR_HARMONIZED"
    bands: tuple[str, ...] = AGRIFM_S2_BANDS
    cloudy_pct: float = 30.0
    composite: str = "median"
    fill_value: float = 0.0
    cloud_mask: str = "scl"
    scl_classes: tuple[int, ...] = DEFAULT_MASKED_SCL
    # A chip is encoded only when at least this share of its pixel-frames hold data (not
    # fill); below it, its grid cells are NaN and it costs no encoder time. 5 % of a 224 px
    # chip at 10 m is about 25 ha (a few fields): less than that, and the chip's vectors
    # describe the fill more than the land. The grid's per-cell ``valid_fraction`` masks
    # finer than whole chips.
    min_chip_coverage: float = DEFAULT_MIN_CHIP_COVERAGE

    def __post_init__(self) -> None:
        # Each setting through its one normaliser (agrifm_pipeline.settings): values from
        # the environment contract are canonical already and come out unchanged.
        object.__setattr__(self, "n_frames", canonical_n_frames(self.n_frames))
        object.__setattr__(self, "image_size", canonical_image_size(self.image_size))
        object.__setattr__(self, "norm_mode", canonical_norm_mode(self.norm_mode))
        object.__setattr__(self, "bands", tuple(self.bands))
        object.__setattr__(self, "scl_classes", tuple(sorted(set(self.scl_classes))))
        check_tile_geometry(self.chip_px, self.chips_per_side)
        check_min_chip_coverage(self.min_chip_coverage)
        tile_size_m(self.chip_px, self.chips_per_side, self.scale_m)
        self.sensor()
        self.mask()

    @classmethod
    def from_settings(
        cls, settings: AgriFMSettings | None = None, **overrides: Any
    ) -> TileYearSettings:
        s = settings or load_settings()
        base = {"n_frames": s.n_frames, "image_size": s.image_size, "norm_mode": s.norm_mode}
        return cls(**{**base, **overrides})

    @property
    def tile_size_m(self) -> int:
        return tile_size_m(self.chip_px, self.chips_per_side, self.scale_m)

    def sensor(self) -> SensorSpec:
        return SensorSpec(
            collection=self.collection,
            bands=self.bands,
            scale_m=self.scale_m,
            cloudy_pct=self.cloudy_pct,
            composite=self.composite,
            fill_value=self.fill_value,
        )

    def mask(self) -> CloudMask:
        return CloudMask(mode=self.cloud_mask, scl_classes=self.scl_classes)

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> TileYearSettings:
        """Settings from :meth:`as_record` (e.g. a partition's lineage)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in rec.items() if k in names})

    def as_record(self) -> dict[str, Any]:
        rec = asdict(self)
        rec["bands"], rec["scl_classes"] = list(self.bands), list(self.scl_classes)
        return rec

    def check_tile(self, tile: Tile) -> None:
        if tile.size_m != self.tile_size_m:
            raise SettingsError(
                f"tile {tile.id} is {tile.size_m} m but the settings make {self.tile_size_m} m tiles "
                f"({self.chips_per_side} x {self.chip_px} px at {self.scale_m} m); "
                "register regions again with these settings or restore them"
            )

    # -- what each stage depends on (see agrifm_pipeline.lineage) -------------------------
    def fingerprints(
        self,
        *,
        provider: Mapping[str, Any],
        checkpoint_sha256: str,
        precision: str,
        encoder: str = "ours",
    ) -> Fingerprints:
        return stage_fingerprints(
            acquisition={
                "provider": dict(provider),
                "collection": self.collection,
                "bands": list(self.bands),
                "scale_m": self.scale_m,
                "n_frames": self.n_frames,
                "cloudy_pct": self.cloudy_pct,
                "composite": self.composite,
                "fill_value": self.fill_value,
                "cloud_mask": self.cloud_mask,
                "scl_classes": list(self.scl_classes) if self.cloud_mask == "scl" else [],
                "tile_px": self.chip_px * self.chips_per_side,
            },
            normalisation={
                "norm_mode": self.norm_mode,
                "image_size": self.image_size,
                "chip_px": self.chip_px,
            },
            embedding={
                "checkpoint_sha256": checkpoint_sha256,
                "precision": precision,
                "encoder": encoder,
                "min_chip_coverage": self.min_chip_coverage,
            },
        )
