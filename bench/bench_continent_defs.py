"""The definitions the continent bench's webserver loads: the pipeline's, with the bench's
resources over the seeded directory (``AGRIFM_BENCH_TMP``)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_continent import TINY, _resources

from agrifm_pipeline.definitions import build_defs

defs = build_defs(_resources(Path(os.environ["AGRIFM_BENCH_TMP"]), TINY))
