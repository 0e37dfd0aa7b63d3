"""One tile-year, stage by stage: the science the Dagster assets call.

Nothing here knows about Dagster. Each function takes plain inputs and returns
arrays plus the record of how they were made. The package, by layer (each module
imports only the ones above it):

* :mod:`~agrifm_pipeline.tileyear.settings` — :class:`TileYearSettings`, the resolved
  values a step runs with: their validation, lineage record and stage fingerprints.
* :mod:`~agrifm_pipeline.tileyear.acquisition` — the raw frame stack from a provider
  (:func:`acquire`), the scenes it would use (:func:`scene_index`), the stack as stored
  (:func:`frame_stack_dataset`).
* :mod:`~agrifm_pipeline.tileyear.normalise` — chips and the normalised tensors
  (:func:`tile_chips`, :func:`normalise_tile`, :func:`normalized_dataset`,
  :func:`model_input`), and the frames holding data per pixel and per chip
  (:func:`valid_frames`, :func:`chip_coverage`).
* :mod:`~agrifm_pipeline.tileyear.embed` — what embedding needs beyond the model: the
  chips to encode (:func:`covered_chips`, :func:`features_with_gaps`), the
  georeferenced grid (:func:`embedding_grid`) and its coverage
  (:func:`with_coverage`, :func:`coverage_attrs`, :func:`encoded_mask`).
* :mod:`~agrifm_pipeline.tileyear.products` — what is made from a stored grid: the
  chip table (:func:`chip_table`), the preview PNG (:func:`preview_png`), the mosaic
  (:func:`mosaic`).
* :mod:`~agrifm_pipeline.tileyear.quantise` — the int8 product of a grid or mosaic
  (:func:`quantise`, :func:`quantised_dataset`), and float vectors back from any product
  (:func:`dequantise`, :func:`read_embeddings`).
* :mod:`~agrifm_pipeline.tileyear.cog` — that product as a Cloud-Optimized GeoTIFF
  (:func:`cog_bytes`; :func:`read_cog` reads it back).

Every public name is re-exported here (``from agrifm_pipeline.tileyear import X``);
to monkeypatch one, patch it in the module that defines it.
"""

from agrifm_pipeline.tileyear.acquisition import acquire, frame_stack_dataset, scene_index
from agrifm_pipeline.tileyear.cog import cog_bytes
from agrifm_pipeline.tileyear.embed import (
    cell_coverage,
    coverage_attrs,
    covered_chips,
    embedding_grid,
    encoded_mask,
    features_with_gaps,
    with_coverage,
)
from agrifm_pipeline.tileyear.normalise import (
    STATS,
    chip_coverage,
    chip_statistics,
    model_input,
    normalise_tile,
    normalized_dataset,
    tile_chips,
    valid_frames,
)
from agrifm_pipeline.tileyear.products import (
    FILL_RGB,
    HATCH_RGB,
    band_frames,
    chip_table,
    coverage_caption,
    mosaic,
    pca3,
    preview_png,
)
from agrifm_pipeline.tileyear.quantise import (
    NODATA,
    QUANT_ATTRS,
    SCHEMES,
    Quantised,
    dequantise,
    dequantised,
    quantise,
    quantised_dataset,
    read_cog,
    read_embeddings,
)
from agrifm_pipeline.tileyear.settings import DEFAULT_MIN_CHIP_COVERAGE, TileYearSettings

__all__ = [
    "DEFAULT_MIN_CHIP_COVERAGE",
    "FILL_RGB",
    "HATCH_RGB",
    "NODATA",
    "QUANT_ATTRS",
    "SCHEMES",
    "STATS",
    "Quantised",
    "TileYearSettings",
    "acquire",
    "band_frames",
    "cell_coverage",
    "chip_coverage",
    "chip_statistics",
    "chip_table",
    "cog_bytes",
    "coverage_attrs",
    "coverage_caption",
    "covered_chips",
    "dequantise",
    "dequantised",
    "embedding_grid",
    "encoded_mask",
    "features_with_gaps",
    "frame_stack_dataset",
    "model_input",
    "mosaic",
    "normalise_tile",
    "normalized_dataset",
    "pca3",
    "preview_png",
    "quantise",
    "quantised_dataset",
    "read_cog",
    "read_embeddings",
    "scene_index",
    "tile_chips",
    "valid_frames",
    "with_coverage",
]
