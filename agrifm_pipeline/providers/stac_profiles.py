"""Where the ``stac`` provider finds Sentinel-2 L2A: profiles of public STAC APIs.

A profile names an API, a collection, which asset key holds each band (by key: the
archives' common names differ from their keys), whether asset addresses must be
signed before they are read, and how the archive's digital numbers relate to the
harmonized scale (reflectance x 10000) the other providers give.

``earth-search`` (default)
    Element 84's Earth Search, collection ``sentinel-2-c1-l2a`` (ESA Collection-1:
    every item reprocessed with baseline 05.00 or later). Public buckets, https
    addresses, no account, no signing. Keys ``blue green red rededge1 rededge2
    rededge3 nir nir08 swir16 swir22 scl``.
``planetary-computer``
    Microsoft's Planetary Computer, collection ``sentinel-2-l2a`` (as ESA delivered
    it: baselines before and after 04.00 side by side). Keys ``B02`` … ``B12``,
    ``B8A``, ``SCL``. Blob addresses are read with a SAS token from
    ``<sas_url>/token/<account>/<container>``, signed in the worker at read time.

Any other STAC API: ``profile="custom"`` with ``api_url``, ``collection`` and
``assets`` (a band -> asset key map, as a mapping or JSON); the named profiles take
the same three as overrides (a mirror of Earth Search, another collection).

Harmonization (``harmonize="baseline"``, every profile): an item processed with
baseline 04.00 or later (``s2:processing_baseline``) carries a +1000 offset in its
reflectance DN, which is taken off at read time; DN 0 stays no data, and a valid
dark pixel (DN 1..1000, reflectance <= 0) becomes DN 1, the darkest valid value,
never no data. ``harmonize="none"`` reads DN as they are, for an archive that
already serves harmonized values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlparse

from agrifm_pipeline.errors import SettingsError

#: The scene-classification layer, named beside the sensor's bands in an asset map.
SCL = "SCL"
#: The bands Sentinel-2 L2A has, by the names ``SensorSpec.bands`` uses, with SCL.
S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12", SCL)
#: Bands and layers at 20 m or coarser in L2A (read with nearest neighbour like every band).
NATIVE_20M = frozenset({"B5", "B6", "B7", "B8A", "B11", "B12", SCL})
#: The offset baseline 04.00 and later add to reflectance DN, and the first such baseline.
BOA_OFFSET = 1000
OFFSET_BASELINE = (4, 0)
HARMONIZE_MODES = ("baseline", "none")
SIGNING_MODES = ("planetary-computer",)
CUSTOM = "custom"

EARTH_SEARCH_ASSETS = {
    "B1": "coastal",
    "B2": "blue",
    "B3": "green",
    "B4": "red",
    "B5": "rededge1",
    "B6": "rededge2",
    "B7": "rededge3",
    "B8": "nir",
    "B8A": "nir08",
    "B9": "nir09",
    "B11": "swir16",
    "B12": "swir22",
    SCL: "scl",
}
PLANETARY_COMPUTER_ASSETS = {
    "B1": "B01",
    "B2": "B02",
    "B3": "B03",
    "B4": "B04",
    "B5": "B05",
    "B6": "B06",
    "B7": "B07",
    "B8": "B08",
    "B8A": "B8A",
    "B9": "B09",
    "B11": "B11",
    "B12": "B12",
    SCL: "SCL",
}


@dataclass(frozen=True)
class StacProfile:
    """One STAC API's Sentinel-2 L2A collection, as the ``stac`` provider reads it."""

    name: str
    api_url: str
    collection: str
    assets: Mapping[str, str]  # band name (B2 … B12, B8A, SCL) -> asset key
    title: str = "a STAC API"
    signing: str | None = None  # "planetary-computer": SAS tokens per blob container
    sas_url: str | None = None  # the token service's root (…/api/sas/v1)
    harmonize: str = "baseline"
    notes: dict[str, str] = field(default_factory=dict)

    def asset_key(self, band: str) -> str:
        key = self.assets.get(band)
        if key is None:
            raise SettingsError(
                f"the {self.name} profile's asset map has no key for band {band!r} (it maps "
                f"{sorted(self.assets)}); give assets={{{band!r}: '<asset key>', …}} "
                "(AGRIFM_PIPELINE_STAC_ASSETS as JSON)"
            )
        return key

    def as_record(self) -> dict[str, Any]:
        return {
            "profile": self.name,
            "api": self.api_url,
            "collection": self.collection,
            "assets": dict(sorted(self.assets.items())),
            "signing": self.signing,
            "harmonize": self.harmonize,
        }


PROFILES: dict[str, StacProfile] = {
    "earth-search": StacProfile(
        name="earth-search",
        api_url="https://earth-search.aws.element84.com/v1",
        collection="sentinel-2-c1-l2a",
        assets=EARTH_SEARCH_ASSETS,
        title="Earth Search",
    ),
    "planetary-computer": StacProfile(
        name="planetary-computer",
        api_url="https://planetarycomputer.microsoft.com/api/stac/v1",
        collection="sentinel-2-l2a",
        assets=PLANETARY_COMPUTER_ASSETS,
        title="the Planetary Computer",
        signing="planetary-computer",
        sas_url="https://planetarycomputer.microsoft.com/api/sas/v1",
    ),
}
PROFILE_NAMES = (*PROFILES, CUSTOM)


def _url(value: str, name: str) -> str:
    text = str(value).strip().rstrip("/")
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise SettingsError(
            f"{name}={value!r} is not an http(s) URL; give the API's root, for example "
            f"{PROFILES['earth-search'].api_url}"
        )
    return text


def _band(name: str) -> str:
    """``B02``/``b2``/``scl`` -> ``B2``/``SCL``: the names ``SensorSpec.bands`` uses."""
    text = str(name).strip().upper()
    if text.startswith("B") and text[1:].isdigit():
        text = f"B{int(text[1:])}"
    return text


def parse_assets(value: Mapping[str, str] | str, *, name: str = "assets") -> dict[str, str]:
    """A band -> asset key map from a mapping or its JSON text; band names may be written
    ``B02`` or ``B2``; SCL must be mapped (the provider masks clouds with it)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise SettingsError(
                f"{name} is not valid JSON ({exc}); give an object such as "
                '{"B2": "blue", "B3": "green", …, "SCL": "scl"}'
            ) from None
    if not isinstance(value, Mapping) or not value:
        raise SettingsError(
            f"{name}={value!r} is not a band -> asset key map; give an object such as "
            '{"B2": "blue", "B3": "green", …, "SCL": "scl"}'
        )
    out: dict[str, str] = {}
    for band, key in value.items():
        b = _band(band)
        if b not in S2_BANDS:
            raise SettingsError(
                f"{name} maps {band!r}, which is not a Sentinel-2 L2A band; use band names "
                f"{', '.join(S2_BANDS)}"
            )
        if not isinstance(key, str) or not key.strip():
            raise SettingsError(f"{name} maps {band!r} to {key!r}; give the asset's key")
        out[b] = key.strip()
    if SCL not in out:
        raise SettingsError(
            f"{name} has no SCL asset; the provider reads the scene classification first "
            'and masks clouds with it: add "SCL": "<asset key>"'
        )
    return out


def resolve_profile(
    profile: str = "earth-search",
    *,
    api_url: str | None = None,
    collection: str | None = None,
    assets: Mapping[str, str] | str | None = None,
    sas_url: str | None = None,
    harmonize: str | None = None,
) -> StacProfile:
    """The profile ``profile`` with any of its parts replaced, checked.

    ``custom`` needs ``api_url``, ``collection`` and ``assets``; a named profile takes
    them as overrides. Every error names the setting and what would fix it.
    """
    name = str(profile or "earth-search").strip().lower()
    if name == CUSTOM:
        missing = [
            n for n, v in (("api_url", api_url), ("collection", collection), ("assets", assets))
            if not v
        ]  # fmt: skip
        if missing:
            raise SettingsError(
                f"stac profile 'custom' needs {', '.join(missing)} (AGRIFM_PIPELINE_STAC_API_URL, "
                "_COLLECTION, _ASSETS); or use a named profile: "
                f"{', '.join(PROFILES)}"
            )
        base = StacProfile(CUSTOM, "", "", {}, title="a STAC API")
    elif name in PROFILES:
        base = PROFILES[name]
    else:
        raise SettingsError(
            f"stac profile {profile!r} is not known; use one of {', '.join(PROFILE_NAMES)} "
            "(custom: give api_url, collection and assets)"
        )
    changes: dict[str, Any] = {}
    if api_url:
        changes["api_url"] = _url(api_url, "api_url")
    if collection:
        text = str(collection).strip()
        if not text or "/" in text:
            raise SettingsError(f"collection={collection!r}; give the collection's id")
        changes["collection"] = text
    if assets:
        changes["assets"] = parse_assets(assets)
    if sas_url:
        changes["sas_url"] = _url(sas_url, "sas_url")
    if harmonize:
        if harmonize not in HARMONIZE_MODES:
            raise SettingsError(
                f"harmonize={harmonize!r}; use 'baseline' (take the +1000 offset off items of "
                "baseline 04.00 and later) or 'none' (the archive serves harmonized DN)"
            )
        changes["harmonize"] = harmonize
    out = replace(base, **changes) if changes else base
    if out.signing is not None and not out.sas_url:
        raise SettingsError(f"the {out.name} profile signs its reads but has no sas_url")
    return out


def baseline_tuple(value: Any) -> tuple[int, int] | None:
    """``"05.10"`` -> (5, 10); None when ``value`` is not a processing baseline."""
    text = str(value).strip()
    major, dot, minor = text.partition(".")
    if not dot or not major.isdigit() or not minor.isdigit():
        return None
    return int(major), int(minor)


def boa_offset(baseline: tuple[int, int], harmonize: str) -> int:
    """The DN offset to take off an item's reflectance: 1000 from baseline 04.00 on."""
    if harmonize == "none":
        return 0
    return BOA_OFFSET if baseline >= OFFSET_BASELINE else 0
