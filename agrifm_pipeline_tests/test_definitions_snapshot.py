"""The Definitions' public names, pinned: a rename must be deliberate.

Stored partitions, lineage, sensor cursors, run history and the UI's links all
hang on the names of assets, checks, sensors, schedules and jobs, and on the
partitions definitions. Renaming an asset strands every partition stored under
the old key; changing a partitions definition re-keys them. This test compares
what :func:`build_defs` declares with ``snapshots/definitions.json``.

To change the names on purpose, regenerate the snapshot and commit it with the
change (say in the commit how stored partitions follow)::

    AGRIFM_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest agrifm_pipeline_tests/test_definitions_snapshot.py
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from agrifm_pipeline.definitions import build_defs

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"
UPDATE_VAR = "AGRIFM_UPDATE_SNAPSHOTS"
HOW_TO_UPDATE = (
    "If this change is deliberate, regenerate the snapshot with\n"
    f"    {UPDATE_VAR}=1 .venv/bin/python -m pytest {Path(__file__).parent.name}/{Path(__file__).name}\n"
    f"and commit {Path(__file__).parent.name}/{SNAPSHOT.parent.name}/{SNAPSHOT.name} with it, "
    "saying how the partitions "
    "stored under the old names are carried over (a renamed asset strands them)."
)


def describe_partitions(pd: dg.PartitionsDefinition | None) -> Any:
    """A partitions definition as data; the static years are their first key and whether
    they run through the current year (the list itself grows every January)."""
    if pd is None:
        return None
    if isinstance(pd, dg.MultiPartitionsDefinition):
        return {
            "multi": {d.name: describe_partitions(d.partitions_def) for d in pd.partitions_defs}
        }
    if isinstance(pd, dg.DynamicPartitionsDefinition):
        return {"dynamic": pd.name}
    if isinstance(pd, dg.StaticPartitionsDefinition):
        keys = pd.get_partition_keys()
        if keys and keys[-1] == str(dt.date.today().year) and all(k.isdigit() for k in keys):
            return {"static_years": {"first": keys[0], "last": "the current year"}}
        return {"static": keys}
    return {type(pd).__name__: str(pd)}


def describe(defs: dg.Definitions) -> dict[str, Any]:
    """Every public name of ``defs`` and what hangs on it."""
    repo = defs.get_repository_def()
    graph = repo.asset_graph
    checks: dict[str, list[str]] = {}
    for key in graph.asset_check_keys:
        checks.setdefault(key.asset_key.to_user_string(), []).append(key.name)
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        name = key.to_user_string()
        assets[name] = {
            "kind": "observable" if node.is_observable else "materializable",
            "group": node.group_name,
            "partitions": describe_partitions(node.partitions_def),
            "deps": sorted(p.to_user_string() for p in node.parent_keys),
            "checks": sorted(checks.get(name, [])),
        }
    jobs = {j.name: j for j in repo.get_all_jobs()}

    def job_assets(name: str | None) -> list[str]:
        job = jobs.get(name) if name else None
        if job is None or job.asset_layer is None:
            return []
        return sorted(k.to_user_string() for k in job.asset_layer.executable_asset_keys)

    sensors = {}
    for s in sorted(repo.sensor_defs, key=lambda s: s.name):
        targets = {a for t in s.targets for a in job_assets(t.job_name)}
        if s.asset_selection is not None:
            targets |= {k.to_user_string() for k in s.asset_selection.resolve(graph)}
        sensors[s.name] = {"default_status": s.default_status.value, "targets": sorted(targets)}
    schedules = {
        s.name: {
            "cron": s.cron_schedule,
            "timezone": s.execution_timezone,
            "default_status": s.default_status.value,
            "targets": job_assets(s.job_name),
        }
        for s in sorted(repo.schedule_defs, key=lambda s: s.name)
    }
    named_jobs = {n: job_assets(n) for n in sorted(jobs) if not n.startswith("__")}
    return {
        "assets": assets,
        "sensors": sensors,
        "schedules": schedules,
        "jobs": named_jobs,
    }


def differences(want: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """What was added, removed or changed, section by section, name by name."""
    out = []
    for section in sorted(set(want) | set(got)):
        a, b = want.get(section, {}), got.get(section, {})
        for name in sorted(set(a) - set(b)):
            out.append(f"{section}: {name!r} is gone (renamed or removed?)")
        for name in sorted(set(b) - set(a)):
            out.append(f"{section}: {name!r} is new")
        for name in sorted(set(a) & set(b)):
            if a[name] != b[name]:
                out.append(f"{section}: {name!r} changed: {a[name]} -> {b[name]}")
    return out


@pytest.fixture(scope="module")
def declared() -> dict[str, Any]:
    return json.loads(json.dumps(describe(build_defs())))


def test_definitions_match_the_snapshot(declared: dict[str, Any]) -> None:
    if os.environ.get(UPDATE_VAR, "").strip().lower() in ("1", "yes", "true"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(declared, indent=1, sort_keys=True) + "\n")
    assert SNAPSHOT.exists(), f"no snapshot at {SNAPSHOT}.\n{HOW_TO_UPDATE}"
    want = json.loads(SNAPSHOT.read_text())
    diff = differences(want, declared)
    assert not diff, (
        "the Definitions differ from the snapshot:\n  " + "\n  ".join(diff) + ("\n" + HOW_TO_UPDATE)
    )


def test_the_snapshot_sees_a_renamed_asset_and_a_changed_partitioning(
    declared: dict[str, Any],
) -> None:
    """The comparison has teeth: an asset renamed, a check dropped and a partitions
    definition changed are each reported by name."""
    renamed = json.loads(json.dumps(declared))
    renamed["assets"]["s2_frames"] = renamed["assets"].pop("s2_frame_stack")
    assert "assets: 's2_frame_stack' is gone (renamed or removed?)" in differences(
        declared, renamed
    )
    assert "assets: 's2_frames' is new" in differences(declared, renamed)
    repartitioned = json.loads(json.dumps(declared))
    repartitioned["assets"]["agrifm_embedding_grid"]["partitions"] = {"dynamic": "tiles"}
    (line,) = differences(declared, repartitioned)
    assert line.startswith("assets: 'agrifm_embedding_grid' changed")
    tile_year = {"multi": {"tile": {"dynamic": "tiles"}, "year": {"static_years": {"first": "2017", "last": "the current year"}}}}  # fmt: skip
    assert declared["assets"]["s2_frame_stack"]["partitions"] == tile_year
