"""Sentinel-2 sources behind one interface (see :mod:`agrifm_pipeline.providers.base`)."""

from __future__ import annotations

from typing import Any

from agrifm_pipeline.errors import BackendError
from agrifm_pipeline.providers.base import CloudMask, FrameRecord, FrameStack, Provider

# The one registry of providers: name -> (module, class). Each class says how it is
# identified in lineage and fingerprints (``identity``) and whether it serves real data.
PROVIDERS: dict[str, tuple[str, str]] = {
    "gee": ("agrifm_pipeline.providers.gee", "EarthEngineProvider"),
    "local": ("agrifm_pipeline.providers.local", "LocalProvider"),
    "stac": ("agrifm_pipeline.providers.stac", "StacProvider"),
    "synthetic": ("agrifm_pipeline.providers.synthetic", "SyntheticProvider"),
}
PROVIDER_NAMES = tuple(PROVIDERS)

__all__ = [
    "PROVIDERS",
    "PROVIDER_NAMES",
    "CloudMask",
    "FrameRecord",
    "FrameStack",
    "Provider",
    "make_provider",
    "provider_class",
    "real_data_providers",
]


def provider_class(name: str) -> Any:
    """The class registered under ``name`` (imported on first use)."""
    import importlib

    if name not in PROVIDERS:
        raise BackendError(f"provider {name!r} is not known; use one of {', '.join(PROVIDERS)}")
    module, cls = PROVIDERS[name]
    return getattr(importlib.import_module(module), cls)


def real_data_providers() -> tuple[str, ...]:
    """The providers that serve real observations (not ``synthetic``)."""
    return tuple(n for n in PROVIDERS if not getattr(provider_class(n), "synthetic", False))


def make_provider(name: str, **options: Any) -> Provider:
    """Build a provider by name: ``gee`` (Earth Engine), ``local`` (``root=`` a directory or
    STAC catalog), ``stac`` (a STAC API: ``profile=`` earth-search, planetary-computer or
    custom), ``synthetic`` (``seed=``). Options go to the provider's constructor."""
    if name == "local" and "root" not in options:
        raise BackendError(
            "backend='local' needs provider_options={'root': <directory of YYYY-MM-DD.tif scenes "
            "or a STAC catalog.json>}"
        )
    provider: Provider = provider_class(name)(**options)
    return provider
