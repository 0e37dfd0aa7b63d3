"""Maps on top of any embedding product: similarity search and few-shot classification.

* :mod:`~agrifm_pipeline.mapping.embeddings` — a stored product (float32 grid or mosaic,
  int8 Zarr, int8 COG) read as float vectors per zone, with the version read.
* :mod:`~agrifm_pipeline.mapping.similar` — a query point or polygon -> each cell's
  cosine similarity to it.
* :mod:`~agrifm_pipeline.mapping.classify` — labelled polygons -> cells sampled under
  them, a classifier (logistic regression or k-NN) cross-validated with whole fields
  held out, and every cell classified.
* :mod:`~agrifm_pipeline.mapping.rasters` — the maps as COGs and PNGs.
* :mod:`~agrifm_pipeline.mapping.products` — a map made and committed as a version of
  its asset's partition, its lineage naming the embedding version it was made from.

No Dagster here: the CLI (``agrifm-pipeline similar`` / ``classify``) and the assets
``similarity_map`` / ``class_map`` (:mod:`agrifm_pipeline.defs.steps`) both call
:mod:`~agrifm_pipeline.mapping.products`.
"""

from agrifm_pipeline.mapping.classify import (
    MODELS,
    Labels,
    Samples,
    classify_grids,
    cross_validate,
    read_labels,
    sample,
)
from agrifm_pipeline.mapping.embeddings import Embeddings, Grid, load_embeddings
from agrifm_pipeline.mapping.products import (
    MapProduct,
    make_class_map,
    make_similarity,
    replay_config,
)
from agrifm_pipeline.mapping.similar import Query, SimilarityMap, parse_query, similarity

__all__ = [
    "MODELS",
    "Embeddings",
    "Grid",
    "Labels",
    "MapProduct",
    "Query",
    "Samples",
    "SimilarityMap",
    "classify_grids",
    "cross_validate",
    "load_embeddings",
    "make_class_map",
    "make_similarity",
    "parse_query",
    "read_labels",
    "replay_config",
    "sample",
    "similarity",
]
