"""Dagster building blocks: assets, checks, sensors, schedules and resources.

Only :mod:`agrifm_pipeline.definitions` puts them together. Each module imports
only the ones listed before it (every asset named through the stage table,
:mod:`agrifm_pipeline.stages`):

* ``keys``: the stage table's assets as Dagster asset keys;
* ``partitions``, ``requests``: the tile-year and region-year partitions, batched runs;
* ``resources``: the settings, the source, the model and the stores;
* ``checks``: the asset checks, judged per partition in the step that wrote it;
* ``audit``, ``staleness``: Dagster's record beside the store's; what is stale, and why;
* ``steps``: what each asset's step does, for each of its tile-years;
* ``tasks``: the same work, one tile-year per task on a cluster;
* ``assets``: the asset declarations, calling ``steps`` (or ``tasks``);
* ``sensors``, ``schedules``: every sensor; the weekly refresh.

The backfill policy, pools and per-partition asset checks are Dagster beta/preview
features used on purpose; their warnings are silenced here once.
"""

import warnings

import dagster as dg

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
