"""agrifm-pipeline: AgriFM embeddings of Sentinel-2 time series, from one ROI to whole regions.

The public names are imported lazily, so ``import agrifm_pipeline.settings``
does not pull in torch and xarray.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BBox": "agrifm_pipeline.specs",
    "OutputSpec": "agrifm_pipeline.specs",
    "PointBuffer": "agrifm_pipeline.specs",
    "SensorSpec": "agrifm_pipeline.specs",
    "TemporalSpec": "agrifm_pipeline.specs",
    "Embedding": "agrifm_pipeline.api",
    "get_embedding": "agrifm_pipeline.api",
    "get_embeddings_batch": "agrifm_pipeline.api",
    "AgriFMError": "agrifm_pipeline.errors",
    "BackendError": "agrifm_pipeline.errors",
    "CheckpointError": "agrifm_pipeline.errors",
    "InputContractError": "agrifm_pipeline.errors",
    "RepoError": "agrifm_pipeline.errors",
    "SettingsError": "agrifm_pipeline.errors",
    "AgriFMSettings": "agrifm_pipeline.settings",
    "load_settings": "agrifm_pipeline.settings",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agrifm_pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
