"""Sentinel-2 sources behind one interface (see :mod:`agrifm_pipeline.providers.base`)."""

from __future__ import annotations

from typing import Any

from agrifm_pipeline.errors import BackendError
from agrifm_pipeline.providers.base import CloudMask, FrameRecord, FrameStack, Provider

PROVIDER_NAMES = ("gee", "local", "synthetic")

__all__ = ["PROVIDER_NAMES", "CloudMask", "FrameRecord", "FrameStack", "Provider", "make_provider"]


def make_provider(name: str, **options: Any) -> Provider:
    """Build a provider by name: ``gee`` (Earth Engine), ``local`` (``root=`` a directory or
    STAC catalog), ``synthetic`` (``seed=``). Options go to the provider's constructor."""
    if name == "local":
        from agrifm_pipeline.providers.local import LocalProvider

        if "root" not in options:
            raise BackendError(
                "backend='local' needs provider_options={'root': <directory of YYYY-MM-DD.tif scenes "
                "or a STAC catalog.json>}"
            )
        return LocalProvider(**options)
    if name == "gee":
        from agrifm_pipeline.providers.gee import EarthEngineProvider

        return EarthEngineProvider(**options)
    if name == "synthetic":
        from agrifm_pipeline.providers.synthetic import SyntheticProvider

        return SyntheticProvider(**options)
    raise BackendError(f"provider {name!r} is not known; use one of {PROVIDER_NAMES}")
