"""The UI's view: dagster-webserver on 127.0.0.1 over a test instance, read through GraphQL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from .pipeline_helpers import REPO_ROOT, TILES, make_pipeline

WEBSERVER = Path(sys.executable).with_name("dagster-webserver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _graphql(url: str, query: str) -> dict[str, Any]:
    req = urllib.request.Request(
        url + "/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = json.loads(resp.read())
    assert "errors" not in body, body
    return body["data"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One run over two partitions, served by dagster-webserver (the tests only read it)."""
    tmp_path = tmp_path_factory.mktemp("served")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    defs_file = tmp_path / "test_defs.py"
    defs_file.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(REPO_ROOT)!r})
            from pathlib import Path
            from agrifm_pipeline.definitions import build_defs
            from agrifm_pipeline_tests.pipeline_helpers import make_resources
            defs = build_defs(make_resources(Path({str(tmp_path)!r})))
            """
        )
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        pipe = make_pipeline(tmp_path, instance=instance)
        # One run over two partitions, as a backfill run is.
        assert pipe.materialise(TILES, [2019]).success
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    proc = subprocess.Popen(
        [str(WEBSERVER), "-f", str(defs_file), "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/server_info", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("dagster-webserver did not come up") from None
                time.sleep(0.5)
        yield url, tmp_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_graph_partitions_and_lineage_through_graphql(served: tuple[str, Path]) -> None:
    url, _ = served
    nodes = _graphql(url, "{ assetNodes { assetKey { path } dependencyKeys { path } } }")
    graph = {
        n["assetKey"]["path"][0]: {d["path"][0] for d in n["dependencyKeys"]}
        for n in nodes["assetNodes"]
    }
    assert graph["normalized_tensors"] == {"s2_frame_stack"}
    assert graph["agrifm_embedding_grid"] == {"normalized_tensors", "agrifm_checkpoint"}
    assert graph["region_mosaic"] == {"agrifm_embedding_grid"}
    assert {"chip_embeddings", "embedding_preview"} <= set(graph)

    dims = _graphql(
        url,
        '{ assetNodeOrError(assetKey: {path: ["agrifm_embedding_grid"]}) '
        "{ ... on AssetNode { partitionKeysByDimension { name partitionKeys } } } }",
    )["assetNodeOrError"]["partitionKeysByDimension"]
    by_name = {d["name"]: d["partitionKeys"] for d in dims}
    assert by_name["tile"] == TILES
    assert by_name["year"][0] == "2017" and "2019" in by_name["year"]

    key = f"{TILES[1]}|2019"
    mats = _graphql(
        url,
        '{ assetOrError(assetKey: {path: ["agrifm_embedding_grid"]}) { ... on Asset { '
        f'assetMaterializations(partitions: ["{key}"]) {{ partition metadataEntries {{ label '
        "... on JsonMetadataEntry { jsonString } ... on TextMetadataEntry { text } "
        "... on IntMetadataEntry { intValue } } } } } }",
    )["assetOrError"]["assetMaterializations"]
    assert [m["partition"] for m in mats] == [key]
    entries = {e["label"]: e for e in mats[0]["metadataEntries"]}
    assert entries["n_frames"]["intValue"] == 8
    assert entries["norm_mode"]["text"] == "agrifm_stats"
    lineage = json.loads(entries["lineage"]["jsonString"])
    assert lineage["tile"] == TILES[1] and lineage["year"] == 2019
    assert len(lineage["embedding"]["checkpoint"]["sha256"]) == 64
    assert len(lineage["acquisition"]["frames"]) == 8


def test_check_status_per_partition_through_graphql(served: tuple[str, Path]) -> None:
    """After a run over several partitions, every check of every asset has exactly one
    execution per partition, none left planned or in progress, each with its partition,
    a status that is its evaluation's verdict and the materialization it judged."""
    url, _ = served
    keys = {f"{t}|2019" for t in TILES}
    seen = 0
    for asset in ("s2_frame_stack", "normalized_tensors", "agrifm_embedding_grid"):
        names = [
            c["name"]
            for c in _graphql(
                url,
                f'{{ assetNodeOrError(assetKey: {{path: ["{asset}"]}}) {{ ... on AssetNode {{ '
                "assetChecksOrError { ... on AssetChecks { checks { name } } } } } }",
            )["assetNodeOrError"]["assetChecksOrError"]["checks"]
        ]
        assert names, asset
        for name in names:
            runs = _graphql(
                url,
                f'{{ assetCheckExecutions(assetKey: {{path: ["{asset}"]}}, checkName: "{name}", '
                "limit: 50) { runId status partition evaluation { partition success "
                "targetMaterialization { runId } } } }",
            )["assetCheckExecutions"]
            assert sorted(r["partition"] for r in runs) == sorted(keys), (asset, name, runs)
            for r in runs:
                assert r["status"] in ("SUCCEEDED", "FAILED"), (asset, name, r)
                assert r["evaluation"]["partition"] == r["partition"]
                assert (r["status"] == "SUCCEEDED") == r["evaluation"]["success"]
                # It judged the materialization its own run made of that partition.
                assert r["evaluation"]["targetMaterialization"]["runId"] == r["runId"]
                seen += 1
    assert seen >= 2 * 5  # five checks, two partitions


def _ui_check_partition_statuses(url: str, asset: str, check: str) -> dict[str, str]:
    """What the check's Partitions tab shows, cell by cell: the UI's own query
    (AssetCheckPartitionHealthQuery in dagster-ui's useAssetCheckPartitionData.tsx) and
    its reading of a two-dimensional answer. Cells it leaves out are "Missing"."""
    node = _graphql(
        url,
        f'{{ assetNodeOrError(assetKey: {{path: ["{asset}"]}}) {{ ... on AssetNode {{ '
        f'assetCheckOrError(checkName: "{check}") {{ ... on AssetCheck {{ '
        "partitionKeysByDimension { name partitionKeys } partitionStatuses { __typename "
        "... on AssetCheckMultiPartitionStatuses { primaryDimensionName ranges { "
        "primaryDimStartKey primaryDimEndKey secondaryDim { __typename "
        "... on AssetCheckDefaultPartitionStatuses { succeededPartitions failedPartitions "
        "inProgressPartitions skippedPartitions executionFailedPartitions } } } } } } } } } }",
    )["assetNodeOrError"]["assetCheckOrError"]
    dims = {d["name"]: d["partitionKeys"] for d in node["partitionKeysByDimension"]}
    statuses = node["partitionStatuses"]
    assert statuses["__typename"] == "AssetCheckMultiPartitionStatuses", statuses
    assert statuses["primaryDimensionName"] == "tile"
    tiles = dims["tile"]
    cells: dict[str, str] = {}
    for r in statuses["ranges"]:
        first, last = tiles.index(r["primaryDimStartKey"]), tiles.index(r["primaryDimEndKey"])
        secondary = r["secondaryDim"]
        assert secondary["__typename"] == "AssetCheckDefaultPartitionStatuses", secondary
        for tile in tiles[first : last + 1]:
            for field, status in (
                ("succeededPartitions", "Passed"),
                ("failedPartitions", "Failed"),
                ("inProgressPartitions", "In progress"),
                ("skippedPartitions", "Skipped"),
                ("executionFailedPartitions", "Execution failed"),
            ):
                for year in secondary[field]:
                    cells[f"{tile}|{year}"] = status
    return cells


def test_check_partitions_tab_shows_each_partitions_verdict(served: tuple[str, Path]) -> None:
    """The check's Partitions tab in the UI (a preview feature of Dagster 1.13) says, for
    every partition the run wrote, what the check found there (passed, or failed with the
    check's severity), and "Missing" only where no run checked anything: each evaluation
    targets the materialization it judged. (Recorded before the materialization, or
    without naming it, every cell read "Missing" while the check's overview said
    "Succeeded".)"""
    url, _ = served
    written = {f"{t}|2019" for t in TILES}
    for asset, check in (
        ("s2_frame_stack", "frame_stack_shape_and_dtype"),
        ("s2_frame_stack", "frame_stack_clear_fraction"),
        ("normalized_tensors", "normalized_tensors_finite"),
        ("agrifm_embedding_grid", "embedding_finite"),
        ("agrifm_embedding_grid", "embedding_non_degenerate"),
    ):
        verdicts = {
            r["partition"]: "Passed" if r["evaluation"]["success"] else "Failed"
            for r in _graphql(
                url,
                f'{{ assetCheckExecutions(assetKey: {{path: ["{asset}"]}}, '
                f'checkName: "{check}", limit: 50) {{ partition evaluation {{ success '
                "targetMaterialization { runId } } run { runId } } }",
            )["assetCheckExecutions"]
        }
        assert set(verdicts) == written, (asset, check, verdicts)
        assert _ui_check_partition_statuses(url, asset, check) == verdicts, (asset, check)
    # The partly covered tile warns on its clear fraction: the tab shows it failed there.
    clear = _ui_check_partition_statuses(url, "s2_frame_stack", "frame_stack_clear_fraction")
    assert clear[f"{TILES[0]}|2019"] == "Failed" and clear[f"{TILES[1]}|2019"] == "Passed"
