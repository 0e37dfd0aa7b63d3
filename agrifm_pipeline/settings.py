"""Every setting's one rule, and the ``RS_EMBED_AGRIFM_*`` environment contract.

Three types carry the tile-year settings, one per role:

* :class:`AgriFMSettings` (here): the environment contract, every
  ``RS_EMBED_AGRIFM_*`` variable parsed; names and defaults are the adapter
  contract's (see the README's settings table). :func:`load_settings` reads the
  environment once; keyword overrides win over it.
* ``TileYearConfig`` (:mod:`agrifm_pipeline.defs.resources`): the Dagster resource
  config, what the launchpad may override (``None`` = the environment's value).
* :class:`~agrifm_pipeline.tileyear.TileYearSettings`: the resolved values one
  tile-year step runs with, and what its lineage and fingerprints record.

Each setting is normalised (parsed, bounded, spelt canonically) by exactly one
function here (:func:`canonical_norm_mode`, :func:`canonical_n_frames`,
:func:`canonical_image_size`, :func:`canonical_fetch_workers`,
:func:`check_tile_geometry`, :func:`check_min_chip_coverage`), which all three
types and the preprocessing call, so a value is accepted or refused, with the same
words, whichever way it came in. (The encoder's ``precision`` and ``device`` are
resolved once, by :func:`agrifm_pipeline.model.resolve_precision` and
:func:`~agrifm_pipeline.model.resolve_device`: they need torch.)

Below them, the pipeline's own variables (``AGRIFM_PIPELINE_*``): its home, the
storage root and options (:func:`pipeline_storage`, read and checked by
:func:`agrifm_pipeline.storage.fs.storage_from_env`), and the limits.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agrifm_pipeline.errors import SettingsError
from agrifm_pipeline.tiles import MAX_BLOCK_SIDE

if TYPE_CHECKING:
    from agrifm_pipeline.storage.fs import StorageLocation

ENV_PREFIX = "RS_EMBED_AGRIFM_"

DEFAULT_CKPT_URL = "https://glass.hku.hk/casual/AgriFM/AgriFM.pth"
DEFAULT_REPO_URL = "https://github.com/flyakon/AgriFM"
DEFAULT_CKPT_MIN_BYTES = 100 * 1024 * 1024
MIN_IMAGE_SIZE = 16

# Canonical normalisation modes and the spellings accepted for each.
NORM_ALIASES: dict[str, str] = {
    "agrifm_stats": "agrifm_stats",
    "zscore": "agrifm_stats",
    "stats": "agrifm_stats",
    "unit_scale": "unit_scale",
    "unit": "unit_scale",
    "reflectance": "unit_scale",
    "none": "none",
    "raw": "none",
    "off": "none",
}
NORM_MODES = ("agrifm_stats", "unit_scale", "none")

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _parse_int(name: str, raw: Any, minimum: int, maximum: int | None = None, why: str = "") -> int:
    """``raw`` as a whole number in [minimum, maximum]; ``why`` says what the maximum
    protects, in the error for a value above it."""
    accepted = f">= {minimum}" if maximum is None else f">= {minimum} and <= {maximum}"
    if isinstance(raw, bool):
        raise SettingsError(f"{name}={raw!r} is not an integer; use a whole number {accepted}")
    try:
        value = int(str(raw).strip()) if not isinstance(raw, int) else raw
    except ValueError:
        raise SettingsError(
            f"{name}={raw!r} is not an integer; use a whole number {accepted}"
        ) from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} is too small; use a whole number {accepted}")
    if maximum is not None and value > maximum:
        raise SettingsError(
            f"{name}={raw!r} is too large; use a whole number {accepted}"
            + (f": {why}" if why else "")
        )
    return value


def _parse_bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    key = str(raw).strip().lower()
    if key in _TRUE:
        return True
    if key in _FALSE:
        return False
    raise SettingsError(
        f"{name}={raw!r} is not a boolean; use one of {sorted(_TRUE)} or {sorted(_FALSE)}"
    )


def _parse_path(name: str, raw: Any) -> Path | None:
    if raw is None:
        return None
    text = str(raw).strip()
    if not text:
        return None
    return Path(os.path.expanduser(text))


def _parse_str(name: str, raw: Any) -> str:
    text = str(raw).strip()
    if not text:
        raise SettingsError(f"{name} is empty; unset it to use the default, or give a value")
    return text


def _parse_ckpt(name: str, raw: Any) -> str | None:
    # A checkpoint spec is a path or `untrained:<seed>`; kept as text so that the
    # resolver decides what it means (see agrifm_pipeline.checkpoint).
    if raw is None:
        return None
    text = str(raw).strip()
    return text or None


@dataclass(frozen=True)
class _Field:
    env: str
    parse: Callable[[str, Any], Any]


def _int_at_least(minimum: int) -> Callable[[str, Any], int]:
    return lambda name, raw: _parse_int(name, raw, minimum)


# -- one normaliser per setting ----------------------------------------------------------------
# Upper bounds: past them a value is a typo or a unit mistake, and would only surface
# later as memory exhausted or a provider overwhelmed, far from the setting.
MAX_FRAMES = 366
MAX_IMAGE_SIZE = 1024
MAX_FETCH_WORKERS = 128


def canonical_norm_mode(value: str, *, name: str = "norm_mode") -> str:
    """Map a normalisation name or alias onto one of :data:`NORM_MODES`."""
    key = str(value).strip().lower()
    if key not in NORM_ALIASES:
        accepted = ", ".join(
            f"{mode} (aliases: {', '.join(a for a, m in NORM_ALIASES.items() if m == mode and a != mode)})"
            for mode in NORM_MODES
        )
        raise SettingsError(f"{name}={value!r} is not a normalisation mode; use one of {accepted}")
    return NORM_ALIASES[key]


def canonical_n_frames(value: Any, *, name: str = "n_frames") -> int:
    """Frames per year: a whole number in 1..:data:`MAX_FRAMES`."""
    return _parse_int(
        name,
        value,
        1,
        MAX_FRAMES,
        "the frames split one year into windows, each at least a day long",
    )


def canonical_image_size(value: Any, *, name: str = "image_size") -> int:
    """The side every chip frame is resized to: a whole number in
    :data:`MIN_IMAGE_SIZE`..:data:`MAX_IMAGE_SIZE`."""
    return _parse_int(
        name,
        value,
        MIN_IMAGE_SIZE,
        MAX_IMAGE_SIZE,
        "every chip frame is resized to it, so memory grows with its square (at 1024 px "
        "one chip of 8 frames is 320 MiB of float32); AgriFM was trained at 224",
    )


def canonical_fetch_workers(value: Any, *, name: str = "fetch_workers") -> int:
    """Tile-years fetched at once: a whole number in 1..:data:`MAX_FETCH_WORKERS`."""
    return _parse_int(
        name,
        value,
        1,
        MAX_FETCH_WORKERS,
        "each is a thread with its own requests to the provider; more only queue there "
        "and hold memory",
    )


def check_min_chip_coverage(value: float, *, name: str = "min_chip_coverage") -> float:
    """``value`` itself (not converted: it is fingerprinted as given) when it is a share
    between 0 and 1, else :class:`SettingsError` naming ``name``."""
    if not 0.0 <= value <= 1.0:
        raise SettingsError(
            f"{name}={value}; use a share between 0 and 1 "
            "(0 encodes every chip, even all-fill ones)"
        )
    return value


BLOCK_SIDE_ENV = "AGRIFM_PIPELINE_BLOCK_SIDE"


def canonical_block_side(value: Any, *, name: str = "block_side") -> int:
    """Tiles per side of a Dagster partition: 1 (a partition per tile-year, the default)
    up to :data:`~agrifm_pipeline.tiles.MAX_BLOCK_SIDE` (a block of side x side tiles per
    partition, for regions past ~10,000 tiles; see docs/scaling.md)."""
    return _parse_int(
        name,
        value,
        1,
        MAX_BLOCK_SIDE,
        "a block's tiles are one partition, and one run does them all; 64 x 64 tiles is "
        "already a country",
    )


CHIP_PX_ENV = "AGRIFM_PIPELINE_CHIP_PX"
CHIPS_PER_SIDE_ENV = "AGRIFM_PIPELINE_CHIPS_PER_SIDE"
MIN_CHIP_PX = 16
MAX_CHIP_PX = 1024
MAX_CHIPS_PER_SIDE = 16
MAX_TILE_PX = 4096


def check_tile_geometry(
    chip_px: Any,
    chips_per_side: Any,
    *,
    chip_px_name: str = "chip_px",
    chips_per_side_name: str = "chips_per_side",
) -> tuple[int, int]:
    """(chip_px, chips_per_side) as whole numbers within their bounds, else SettingsError
    naming the setting (``*_name``: the variable or field it came from), the bound and
    why: a tile-year holds its whole tile in memory at once."""
    chip_px = _parse_int(
        chip_px_name,
        chip_px,
        MIN_CHIP_PX,
        MAX_CHIP_PX,
        "a chip is one encoder input, resized to RS_EMBED_AGRIFM_IMG (224 by default); a "
        "much larger chip only loses its detail in the resize",
    )
    chips_per_side = _parse_int(
        chips_per_side_name,
        chips_per_side,
        1,
        MAX_CHIPS_PER_SIDE,
        "a tile-year holds all its chips at once (16 x 16 chips of 8 frames at 224 px are "
        "about 4 GB of float32), and the design uses 4",
    )
    if chip_px * chips_per_side > MAX_TILE_PX:
        side = chip_px * chips_per_side
        raise SettingsError(
            f"{chip_px_name}={chip_px} x {chips_per_side_name}={chips_per_side} makes tiles "
            f"of {side:,} px a side, more than {MAX_TILE_PX:,}: a tile-year's frame stack "
            f"(8 frames x 10 bands of uint16) would be {side * side * 160 / 1e9:,.1f} GB; use "
            "fewer or smaller chips (the design: 4 x 224 px)"
        )
    return chip_px, chips_per_side


_FIELDS: dict[str, _Field] = {
    "n_frames": _Field("FRAMES", lambda name, raw: canonical_n_frames(raw, name=name)),
    "image_size": _Field("IMG", lambda name, raw: canonical_image_size(raw, name=name)),
    "norm_mode": _Field("NORM", lambda name, raw: canonical_norm_mode(raw, name=name)),
    "fetch_workers": _Field(
        "FETCH_WORKERS", lambda name, raw: canonical_fetch_workers(raw, name=name)
    ),
    "checkpoint": _Field("CKPT", _parse_ckpt),
    "auto_download": _Field("AUTO_DOWNLOAD", _parse_bool),
    "cache_dir": _Field("CACHE_DIR", _parse_path),
    "ckpt_file": _Field("CKPT_FILE", _parse_str),
    "ckpt_url": _Field("CKPT_URL", _parse_str),
    "ckpt_min_bytes": _Field("CKPT_MIN_BYTES", _int_at_least(0)),
    "repo_path": _Field("REPO_PATH", _parse_path),
    "repo_url": _Field("REPO_URL", _parse_str),
    "repo_cache": _Field("REPO_CACHE", _parse_path),
    "auto_download_repo": _Field("AUTO_DOWNLOAD_REPO", _parse_bool),
}


@dataclass(frozen=True)
class AgriFMSettings:
    """The environment contract: every ``RS_EMBED_AGRIFM_*`` setting, parsed and validated.

    Build with :func:`load_settings` (environment + overrides) or directly; use
    :meth:`replace` to change a field with validation. It says what the environment
    asks for; what one tile-year step runs with is
    :class:`~agrifm_pipeline.tileyear.TileYearSettings`, resolved from it.
    """

    n_frames: int = 8
    image_size: int = 224
    norm_mode: str = "agrifm_stats"
    fetch_workers: int = 8
    checkpoint: str | None = None
    auto_download: bool = True
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/rs_embed/agrifm").expanduser())
    ckpt_file: str = "AgriFM.pth"
    ckpt_url: str = DEFAULT_CKPT_URL
    ckpt_min_bytes: int = DEFAULT_CKPT_MIN_BYTES
    repo_path: Path | None = None
    repo_url: str = DEFAULT_REPO_URL
    repo_cache: Path = field(default_factory=lambda: Path("~/.cache/rs_embed").expanduser())
    auto_download_repo: bool = True

    def __post_init__(self) -> None:
        # Validate (and normalise) values given directly to the constructor too.
        for name, spec in _FIELDS.items():
            raw = getattr(self, name)
            if raw is None and name in ("checkpoint", "repo_path"):
                continue
            value = spec.parse(f"{name} ({ENV_PREFIX}{spec.env})", raw)
            if value is None and name in ("cache_dir", "repo_cache"):
                raise SettingsError(f"{ENV_PREFIX}{spec.env} is empty; give a directory")
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> AgriFMSettings:
        unknown = sorted(set(changes) - set(_FIELDS))
        if unknown:
            raise SettingsError(f"unknown setting(s) {unknown}; known: {sorted(_FIELDS)}")
        return dataclasses.replace(self, **changes)

    @property
    def checkpoint_cache_path(self) -> Path:
        return self.cache_dir / self.ckpt_file

    @property
    def repo_cache_path(self) -> Path:
        return self.repo_cache / "AgriFM"

    def as_record(self) -> dict[str, Any]:
        """JSON-friendly view, with the environment variable name of each field."""
        out: dict[str, Any] = {}
        for name, spec in _FIELDS.items():
            value = getattr(self, name)
            out[f"{ENV_PREFIX}{spec.env}"] = str(value) if isinstance(value, Path) else value
        return out

    @staticmethod
    def env_names() -> dict[str, str]:
        """Field name → environment variable name."""
        return {name: f"{ENV_PREFIX}{spec.env}" for name, spec in _FIELDS.items()}


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> AgriFMSettings:
    """Settings from ``env`` (default: ``os.environ``), then keyword overrides.

    Unset or empty variables take the contract's default. Raises
    :class:`SettingsError` naming the variable, the value and what is accepted.
    """
    env = os.environ if env is None else env
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise SettingsError(f"unknown setting(s) {unknown}; known: {sorted(_FIELDS)}")
    values: dict[str, Any] = {}
    for name, spec in _FIELDS.items():
        var = f"{ENV_PREFIX}{spec.env}"
        if name in overrides:
            raw = overrides[name]
            label = name
        elif env.get(var, "").strip() != "":
            raw = env[var]
            label = var
        else:
            continue
        if raw is None and name in ("checkpoint", "repo_path"):
            values[name] = None
            continue
        values[name] = spec.parse(label, raw)
    return AgriFMSettings(**values)


DEFAULT_PIPELINE_HOME = ".agrifm"
PIPELINE_STORAGE_ENV = "AGRIFM_PIPELINE_STORAGE"  # read by agrifm_pipeline.storage.fs
MAX_REGION_TILES_ENV = "AGRIFM_PIPELINE_MAX_REGION_TILES"
DEFAULT_MAX_REGION_TILES = 10_000


def pipeline_home(home: str | Path | None = None) -> Path:
    """The project-local home: ``home``, else ``AGRIFM_PIPELINE_HOME``, else ``.agrifm``.

    It holds the demo's Dagster instance (``dagster/``) and the default store (``store/``).
    """
    return Path(home or os.environ.get("AGRIFM_PIPELINE_HOME", DEFAULT_PIPELINE_HOME))


def env_flag(name: str, env: Mapping[str, str] | None = None) -> bool | None:
    """A yes/no environment variable: None when unset or empty, else its boolean.

    Accepts 1/0, true/false, yes/no, on/off (any case); anything else raises
    :class:`SettingsError` naming the variable.
    """
    env = os.environ if env is None else env
    raw = env.get(name, "")
    if not raw.strip():
        return None
    return _parse_bool(name, raw)


def max_region_tiles(env: Mapping[str, str] | None = None) -> int:
    """The most tiles one region may register: ``AGRIFM_PIPELINE_MAX_REGION_TILES``, else 10,000."""
    env = os.environ if env is None else env
    raw = env.get(MAX_REGION_TILES_ENV, "")
    if not raw.strip():
        return DEFAULT_MAX_REGION_TILES
    return _parse_int(MAX_REGION_TILES_ENV, raw, 1)


GEE_LIST_PER_TICK_ENV = "AGRIFM_PIPELINE_GEE_LIST_PER_TICK"
DEFAULT_GEE_LIST_PER_TICK = 500


def gee_list_per_tick(env: Mapping[str, str] | None = None) -> int:
    """Earth Engine tile-years the stale sensor lists per tick:
    ``AGRIFM_PIPELINE_GEE_LIST_PER_TICK``, else 500."""
    env = os.environ if env is None else env
    raw = env.get(GEE_LIST_PER_TICK_ENV, "")
    if not raw.strip():
        return DEFAULT_GEE_LIST_PER_TICK
    return _parse_int(GEE_LIST_PER_TICK_ENV, raw, 1)


def check_storage_root(root: str, *, name: str = PIPELINE_STORAGE_ENV) -> str:
    """``root`` if it is a directory path or a URL whose protocol fsspec can open, else
    :class:`~agrifm_pipeline.storage.errors.StorageRootError` (a SettingsError too)
    naming ``name``: :func:`agrifm_pipeline.storage.fs.check_storage_url`, the one check."""
    from agrifm_pipeline.storage.fs import check_storage_url

    return check_storage_url(root, name=name)


def pipeline_storage(
    env: Mapping[str, str] | None = None, home: str | Path | None = None
) -> StorageLocation:
    """The storage root and its options: ``AGRIFM_PIPELINE_STORAGE`` (checked) or
    ``<pipeline home>/store``, and ``AGRIFM_PIPELINE_STORAGE_OPTIONS`` (see
    :func:`agrifm_pipeline.storage.fs.storage_from_env`, which reads and checks both)."""
    from agrifm_pipeline.storage.fs import storage_from_env

    return storage_from_env(env, default_root=str(pipeline_home(home) / "store"))


def pipeline_storage_root(
    env: Mapping[str, str] | None = None, home: str | Path | None = None
) -> str:
    """The root of :func:`pipeline_storage`."""
    return pipeline_storage(env, home).root


MOSAIC_PRODUCTS_ENV = "AGRIFM_PIPELINE_MOSAIC_PRODUCTS"
# What a region's mosaic is made as: the float32 Zarr (region_mosaic), the int8 Zarr
# (region_mosaic_int8), Cloud-Optimized GeoTIFFs (region_mosaic_cog).
MOSAIC_PRODUCTS = ("float32", "int8", "cog")


def canonical_mosaic_products(
    given: str | Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    name: str = "mosaic_products",
) -> tuple[str, ...]:
    """The region products to make, in :data:`MOSAIC_PRODUCTS` order: ``given`` (a list, or
    comma-separated), else ``AGRIFM_PIPELINE_MOSAIC_PRODUCTS``, else all three. ``int8,cog``
    makes the int8 products instead of the float32 mosaic (the tile grids stay float32,
    the reference); an unknown or empty choice is a SettingsError naming the known ones."""
    env = os.environ if env is None else env
    if given is None:
        raw = env.get(MOSAIC_PRODUCTS_ENV, "").strip()
        if not raw:
            return MOSAIC_PRODUCTS
        given, name = raw, MOSAIC_PRODUCTS_ENV
    items = given.split(",") if isinstance(given, str) else list(given)
    chosen = {str(p).strip().lower() for p in items if str(p).strip()}
    unknown = sorted(chosen - set(MOSAIC_PRODUCTS))
    if unknown or not chosen:
        raise SettingsError(
            f"{name}={given!r}: {'unknown ' + ', '.join(unknown) if unknown else 'none chosen'}; "
            f"use one or more of {', '.join(MOSAIC_PRODUCTS)} (comma-separated)"
        )
    return tuple(p for p in MOSAIC_PRODUCTS if p in chosen)
