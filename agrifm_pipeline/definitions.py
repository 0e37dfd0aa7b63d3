"""The one place that builds the Dagster ``Definitions``.

The library (settings, preprocessing, encoder, checkpoint chain, single-ROI
API) comes first; the tile-year assets, sensors, schedules and checks are
added here as they land.
"""

from __future__ import annotations

import dagster as dg

defs = dg.Definitions()
