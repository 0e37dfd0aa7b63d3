"""The stage table's assets as Dagster asset keys.

:mod:`agrifm_pipeline.stages` names every asset once; the Dagster layer refers to
the assets through these keys and the rows' fields, never by a written name.
"""

from __future__ import annotations

import dagster as dg

from agrifm_pipeline import stages

FRAMES = dg.AssetKey(stages.FRAMES.asset)
NORMALIZED = dg.AssetKey(stages.TENSORS.asset)
EMBEDDING = dg.AssetKey(stages.GRID.asset)
CHIPS = dg.AssetKey(stages.CHIPS.asset)
PREVIEW = dg.AssetKey(stages.PREVIEW.asset)
MOSAIC = dg.AssetKey(stages.MOSAIC.asset)
CHECKPOINT = dg.AssetKey(stages.CHECKPOINT_ASSET)
AUDIT = dg.AssetKey(stages.AUDIT_ASSET)
GRID_INT8 = dg.AssetKey(stages.GRID_INT8.asset)
MOSAIC_INT8 = dg.AssetKey(stages.MOSAIC_INT8.asset)
MOSAIC_COG = dg.AssetKey(stages.MOSAIC_COG.asset)
SIMILARITY = dg.AssetKey(stages.SIMILARITY.asset)
CLASSES = dg.AssetKey(stages.CLASSES.asset)


def key_of(stage: stages.Stage) -> dg.AssetKey:
    """A stage row's asset key."""
    return dg.AssetKey(stage.asset)
