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


def key_of(stage: stages.Stage) -> dg.AssetKey:
    """A stage row's asset key."""
    return dg.AssetKey(stage.asset)
