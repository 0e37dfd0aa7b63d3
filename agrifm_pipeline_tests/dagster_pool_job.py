"""A code location for the dead-run tests: one step in the ``agrifm_encoder`` pool.

Launched by a real daemon through its code server, like the pipeline's runs. With the
tag ``agrifm/test_hold`` the step writes its process id to that path and sleeps, holding
the pool slot until the test kills it; without the tag (or once that file exists) it
finishes at once.
"""

import os
import time
from pathlib import Path

import dagster as dg

HOLD_TAG = "agrifm/test_hold"


@dg.op(pool="agrifm_encoder")
def encode_stand_in(context: dg.OpExecutionContext) -> None:
    pidfile = context.run.tags.get(HOLD_TAG)
    # Only the first attempt holds: a retry of the killed run (deploy/dagster.yaml retries
    # runs whose worker crashed) finishes like any other run.
    if pidfile and not Path(pidfile).exists():
        Path(pidfile).write_text(str(os.getpid()))
        time.sleep(600)


# In process: the run worker is the process that holds the slot.
@dg.job(executor_def=dg.in_process_executor)
def encoder_pool_job() -> None:
    encode_stand_in()


defs = dg.Definitions(jobs=[encoder_pool_job])
