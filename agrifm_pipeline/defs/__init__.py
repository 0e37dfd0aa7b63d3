"""Dagster building blocks: assets, checks, sensors, schedules and resources.

Only :mod:`agrifm_pipeline.definitions` puts them together. The backfill
policy, pools and per-partition asset checks are Dagster beta/preview
features used on purpose; their warnings are silenced here once.
"""

import warnings

import dagster as dg

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
