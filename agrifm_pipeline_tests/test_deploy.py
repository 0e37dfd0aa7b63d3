"""The deployment files, checked offline.

deploy/k8s/values.yaml is checked against the official Dagster Helm chart's values
schema: the keys and types it declares for the sections we set. The schema below is
written from the chart's generated ``helm/dagster/values.schema.json`` in
github.com/dagster-io/dagster (read at commit bdb8547fab497826eeec292bc160b549a0a329ef,
2026-12-01): for each object, the properties it allows (``additionalProperties: false``
where the chart says so) and the keys it requires of a section we set.
Helm validates the chart's defaults merged with our values, so a section's keys that
the defaults supply are not required of the override file here.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from agrifm_pipeline.compute import GPU

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"

_STR, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_OBJ, _ARR = {"type": "object"}, {"type": "array"}
_IMAGE = {
    "type": "object",
    "properties": {
        "repository": _STR,
        "tag": {"type": ["string", "integer", "null"]},
        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    },
    "required": ["repository", "pullPolicy"],
}
_ENV = {"anyOf": [{"type": "object", "additionalProperties": _STR}, _ARR]}
_K8S_RUN_LAUNCHER = {
    "type": "object",
    "properties": {
        "image": {"anyOf": [_IMAGE, {"type": "null"}]},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "jobNamespace": {"type": ["string", "null"]},
        "loadInclusterConfig": _BOOL,
        "kubeconfigFile": {"type": ["string", "null"]},
        "envConfigMaps": _ARR,
        "envSecrets": _ARR,
        "envVars": {"type": "array", "items": _STR},
        "volumeMounts": _ARR,
        "volumes": _ARR,
        "labels": {"type": ["object", "null"]},
        "failPodOnRunFailure": {"type": ["boolean", "null"]},
        "resources": {"type": ["object", "null"]},
        "schedulerName": {"type": ["string", "null"]},
        "securityContext": {"type": ["object", "null"]},
        "runK8sConfig": {
            "type": ["object", "null"],
            "properties": {
                k: {"type": ["object", "null"]}
                for k in (
                    "containerConfig",
                    "podSpecConfig",
                    "podTemplateSpecMetadata",
                    "jobSpecConfig",
                    "jobMetadata",
                )
            },
            "additionalProperties": False,
        },
    },
    "required": [
        "imagePullPolicy",
        "loadInclusterConfig",
        "envConfigMaps",
        "envSecrets",
        "envVars",
        "volumeMounts",
        "volumes",
    ],
    "additionalProperties": False,
}
_QUEUED = {
    "type": "object",
    "properties": {
        "maxConcurrentRuns": {"type": ["integer", "object", "null"]},
        "tagConcurrencyLimits": {"type": ["array", "null"]},
        "dequeueIntervalSeconds": {"type": ["integer", "object", "null"]},
        "dequeueNumWorkers": {"type": ["integer", "object", "null"]},
        "dequeueUseThreads": {"type": ["boolean", "null"]},
        "blockOpConcurrencyLimitedRuns": {"type": ["object", "null"]},
    },
    "additionalProperties": False,
}
_DAEMON_KEYS = [
    "enabled",
    "image",
    "runCoordinator",
    "heartbeatTolerance",
    "env",
    "envConfigMaps",
    "envSecrets",
    "deploymentLabels",
    "labels",
    "nodeSelector",
    "affinity",
    "tolerations",
    "podSecurityContext",
    "securityContext",
    "resources",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "annotations",
    "runMonitoring",
    "runRetries",
    "sensors",
    "schedules",
    "schedulerName",
    "volumeMounts",
    "volumes",
    "initContainerResources",
]
CHART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **{
            k: _OBJ
            for k in [
                "dagsterWebserver",
                "rabbitmq",
                "redis",
                "flower",
                "ingress",
                "computeLogManager",
                "scheduler",
                "pythonLogs",
                "busybox",
                "migrate",
                "serviceAccount",
                "global",
                "retention",
                "additionalInstanceConfig",
            ]
        },
        "generatePostgresqlPasswordSecret": _BOOL,
        "generateCeleryConfigSecret": _BOOL,
        "imagePullSecrets": _ARR,
        "telemetry": {
            "type": "object",
            "properties": {"enabled": _BOOL},
            "required": ["enabled"],
            "additionalProperties": False,
        },
        "dagster-user-deployments": {
            "type": "object",
            "properties": {
                "enabled": _BOOL,
                "deployments": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": _STR,
                            "image": _IMAGE,
                            "dagsterApiGrpcArgs": {"type": "array", "items": _STR},
                            "port": _INT,
                            "env": _ENV,
                            "envConfigMaps": _ARR,
                            "envSecrets": _ARR,
                            "resources": _OBJ,
                            "nodeSelector": _OBJ,
                            "tolerations": _ARR,
                        },
                        "required": ["name", "image", "dagsterApiGrpcArgs", "port"],
                    },
                },
            },
        },
        "postgresql": {
            "type": "object",
            "properties": {
                "image": _IMAGE,
                "enabled": _BOOL,
                "postgresqlHost": _STR,
                "postgresqlUsername": _STR,
                "postgresqlPassword": _STR,
                "postgresqlDatabase": _STR,
                "service": {"type": "object", "properties": {"port": _INT}, "required": ["port"]},
            },
        },
        "runLauncher": {
            "type": "object",
            "properties": {
                "type": {"enum": ["CeleryK8sRunLauncher", "K8sRunLauncher", "CustomRunLauncher"]},
                "config": {
                    "type": "object",
                    "properties": {
                        "celeryK8sRunLauncher": {"type": ["object", "null"]},
                        "k8sRunLauncher": {"anyOf": [_K8S_RUN_LAUNCHER, {"type": "null"}]},
                        "customRunLauncher": {"type": ["object", "null"]},
                    },
                },
            },
            "required": ["type", "config"],
            "additionalProperties": False,
            "if": {"properties": {"type": {"const": "K8sRunLauncher"}}},
            "then": {"properties": {"config": {"required": ["k8sRunLauncher"]}}},
        },
        "dagsterDaemon": {
            "type": "object",
            "properties": {
                **{k: {} for k in _DAEMON_KEYS},
                "enabled": _BOOL,
                "runMonitoring": _OBJ,
                "runRetries": _OBJ,
                "runCoordinator": {
                    "type": "object",
                    "properties": {
                        "enabled": _BOOL,
                        "type": {"enum": ["QueuedRunCoordinator", "CustomRunCoordinator"]},
                        "config": {
                            "type": "object",
                            "properties": {
                                "queuedRunCoordinator": {"anyOf": [_QUEUED, {"type": "null"}]},
                                "customRunCoordinator": {"type": ["object", "null"]},
                            },
                        },
                    },
                    "required": ["enabled", "type", "config"],
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}


def _values() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "k8s" / "values.yaml").read_text())


def test_helm_values_fit_the_charts_schema() -> None:
    jsonschema.validate(_values(), CHART_SCHEMA)


@pytest.mark.parametrize(
    "broken",
    [
        {"runLauncher": {"type": "K8sRunLauncher", "config": {}}},  # no k8sRunLauncher
        {"dagsterDaemon": {"runMonitoring": True}},  # not an object
        {"dagsterDaemon": {"runMonitor": {}}},  # misspelt: the chart refuses unknown keys
        {"postgresql": {"service": {"port": "5432"}}},  # a string where a port is a number
    ],
)
def test_the_schema_check_refuses_what_the_chart_would(broken: dict[str, Any]) -> None:
    values = _values()
    for key, section in broken.items():
        values[key] = {**values[key], **section} if key == "dagsterDaemon" else section
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, CHART_SCHEMA)


def test_values_keep_the_instance_settings_of_deploy_dagster_yaml() -> None:
    values = _values()
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    daemon = values["dagsterDaemon"]
    monitoring = instance["run_monitoring"]
    assert daemon["runMonitoring"]["enabled"] is monitoring["enabled"] is True
    assert (
        daemon["runMonitoring"]["freeSlotsAfterRunEndSeconds"]
        == monitoring["free_slots_after_run_end_seconds"]
    )
    queued = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert queued["maxConcurrentRuns"] == instance["concurrency"]["runs"]["max_concurrent_runs"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is False  # an external database


def test_code_location_args_name_a_module_with_definitions() -> None:
    (deployment,) = _values()["dagster-user-deployments"]["deployments"]
    args = deployment["dagsterApiGrpcArgs"]
    module = args[args.index("--module-name") + 1]
    assert importlib.import_module(module).defs is not None
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd is not None and module in cmd.group(1)


def test_dockerfile_builds_from_the_repository() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", dockerfile, re.M)  # CUDA: --build-arg
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in dockerfile
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.M):
        *sources, _dest = shlex.split(line)
        for src in sources:
            assert (REPO_ROOT / src).exists(), f"COPY {src}: not in the repository"
    extras = re.findall(r'"\.\[(\w+)\]"', dockerfile)
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert extras and all(re.search(rf"^{e} = \[", pyproject, re.M) for e in extras)


def test_dask_workers_spec() -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "dask-workers.yaml").read_text()) if d]
    by_name = {d["metadata"]["name"]: d for d in docs}
    scheduler_port = next(
        p["port"] for p in by_name["agrifm-dask-scheduler"]["spec"]["ports"] if p["name"] == "comm"
    )
    address = f"tcp://agrifm-dask-scheduler:{scheduler_port}"
    values = _values()
    env = values["dagster-user-deployments"]["deployments"][0]["env"]
    assert {"name": "AGRIFM_PIPELINE_DASK_ADDRESS", "value": address} in env
    gpu = by_name["agrifm-dask-gpu-workers"]["spec"]["template"]["spec"]
    (container,) = gpu["containers"]
    cmd = container["command"]
    assert cmd[:3] == ["dask", "worker", address]
    assert cmd[cmd.index("--resources") + 1] == f"{GPU}=1"  # what encoding tasks ask for
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["tolerations"] and gpu["nodeSelector"]


def test_gpu_run_tags_are_dagster_k8s_config() -> None:
    tags = yaml.safe_load((DEPLOY / "k8s" / "gpu-run-tags.yaml").read_text())
    config = tags["dagster-k8s/config"]
    # The keys the K8sRunLauncher reads from the tag (dagster-k8s UserDefinedDagsterK8sConfig).
    assert set(config) <= {
        "container_config",
        "pod_template_spec_metadata",
        "pod_spec_config",
        "job_config",
        "job_metadata",
        "job_spec_config",
        "merge_behavior",
    }
    assert config["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert config["pod_spec_config"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_a_tile_year_run_is_one_process_with_its_checks_inside_the_steps() -> None:
    """What a run launched in a deployment starts: the run worker alone runs every step
    (no step process, no check step), so one process of the run imports torch."""
    import dagster as dg

    from agrifm_pipeline.definitions import defs

    job = defs.resolve_job_def("embed_tile_years")
    assert job.executor_def is dg.in_process_executor
    # So is a backfill or a materialisation started in the UI (Dagster's implicit asset
    # job): with the default multiprocess executor each of its five steps would be a
    # process importing torch again.
    ui_job = defs.resolve_implicit_job_def_def_for_assets([dg.AssetKey("s2_frame_stack")])
    assert ui_job is not None and ui_job.executor_def is dg.in_process_executor
    steps = {node.name for node in job.graph.node_dict.values()}
    assert steps == {
        "s2_frame_stack",
        "normalise_and_embed",
        "chip_embeddings",
        "embedding_preview",
        "agrifm_embedding_int8",
    }
    checks = job.asset_layer.asset_graph.asset_check_keys
    assert {k.name for k in checks} == {
        "frame_stack_shape_and_dtype",
        "frame_stack_clear_fraction",
        "normalized_tensors_finite",
        "embedding_finite",
        "embedding_non_degenerate",
    }
