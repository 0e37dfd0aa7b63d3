"""What the tests and benches that drive a real ``dagster-daemon`` share: waiting on it,
and starting a backfill as the UI's "Materialize" over partitions does."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg

T = TypeVar("T")


def wait_for(
    what: str, predicate: Callable[[], T], timeout: float, log: Path, poll: float = 0.5
) -> T:
    """``predicate()``'s first truthy value; after ``timeout`` seconds, an AssertionError
    naming ``what`` with the tail of the daemon's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    tail = log.read_text()[-6000:] if log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def add_asset_backfill(
    instance: dg.DagsterInstance,
    graph: Any,
    partition_keys: Sequence[str],
    selection: Sequence[dg.AssetKey],
    title: str,
) -> str:
    """An asset backfill of ``selection`` over ``partition_keys``, stored for the backfill
    daemon (what the UI writes when it launches one); its id."""
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id

    backfill_id = make_new_backfill_id()
    instance.add_backfill(
        PartitionBackfill.from_asset_partitions(
            backfill_id=backfill_id,
            asset_graph=graph,
            partition_names=list(partition_keys),
            asset_selection=list(selection),
            backfill_timestamp=time.time(),
            tags={},
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=title,
            description=None,
            run_config=None,
        )
    )
    return backfill_id
