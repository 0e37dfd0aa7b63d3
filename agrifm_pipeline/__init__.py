"""agrifm-pipeline: AgriFM embeddings of Sentinel-2 time series, from one ROI to whole regions.

The public names are imported lazily, so ``import agrifm_pipeline.settings``
does not pull in torch and xarray.

The package is cut in layers, each importing only the ones below it (a test fails on a
circle or a back-edge); ``docs/architecture.md`` gives every module in one line:

* vocabulary: ``errors``, ``stages`` (the stage table), ``lineage``, ``tiles``,
  ``frames``, ``specs``, ``model.config``;
* ``storage/``: versioned, checksummed partitions (commits in ``storage.versions``);
* ``settings``, ``runtime``: every setting's one rule;
* sources and the model: ``checkpoint``, ``model/``, ``preprocess``, ``providers/``
  (compositing in ``providers.compositing``), ``regions``, ``registry``, ``roi``;
* science without Dagster: ``tileyear/``, ``inference``, ``api``, ``audit``,
  ``scene_listing``, ``catalog``, ``compute``;
* Dagster: ``defs/``, ``definitions``;
* commands: ``cli``, ``demo``.
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
