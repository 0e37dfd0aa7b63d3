"""A code location for the backfill-resume test: the pipeline's tile-year assets as the
daemon sees them (the same keys, dependencies, partitions definition and backfill
policy), with each step's work simulated. A step sleeps ``AGRIFM_SIM_WORK_S`` seconds,
then appends a line ``run_id asset partition`` for each asset-partition it made to the
file ``AGRIFM_SIM_LOG`` names (one ``write`` in append mode, so concurrent runs' lines
never interleave), and reports the materialisations.
"""

import graphlib
import os
import time
from collections.abc import Iterator

import dagster as dg

from agrifm_pipeline import definitions as pipeline
from agrifm_pipeline.defs.assets import tile_year_assets

WORK_ENV = "AGRIFM_SIM_WORK_S"
LOG_ENV = "AGRIFM_SIM_LOG"


def _simulated(real: dg.AssetsDefinition) -> dg.AssetsDefinition:
    specs = [spec.replace_attributes(skippable=True) for spec in real.specs]
    # A multi-asset yields its assets upstream first.
    order = list(
        graphlib.TopologicalSorter(
            {s.key: {d.asset_key for d in s.deps} & set(real.keys) for s in specs}
        ).static_order()
    )

    @dg.multi_asset(
        name=f"sim_{real.node_def.name}",
        specs=specs,
        backfill_policy=real.backfill_policy,
        can_subset=True,
    )
    def step(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        time.sleep(float(os.environ.get(WORK_ENV, "1")))
        keys = [k for k in order if k in context.selected_asset_keys]
        lines = "".join(
            f"{context.run.run_id} {key.to_user_string()} {pk}\n"
            for key in keys
            for pk in context.partition_keys
        )
        fd = os.open(os.environ[LOG_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)
        for key in keys:
            yield dg.MaterializeResult(asset_key=key)

    return step


defs = dg.Definitions(
    assets=[_simulated(a) for a in tile_year_assets], executor=pipeline.defs.executor
)
