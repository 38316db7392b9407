"""The Kubernetes manifests validate against their operators' CRD schemas (PyTorchJob, RayJob; no cluster runs
here), run train.py on the mounted config file, and keep outputs on a shared volume (so a restarted pod
resumes). The SLURM launch line picks its rank count from the allocation; the SLURM scripts run for real on a
one-node cluster in tests/integration/test_slurm.py."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PRUNED = "x-posttrain-pruned"  # scripts/k8s_schema_subset.py marks the parts of a CRD schema it left out
# manifest -> (apiVersion, kind, schema file in deploy/k8s/schemas/)
MANIFESTS = {
    "pytorchjob-sft.yaml": ("kubeflow.org/v1", "PyTorchJob", "pytorchjob-v1.json"),
    "rayjob-grpo.yaml": ("ray.io/v1", "RayJob", "rayjob-v1.json"),
}


def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    cluster = doc["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def test_pytorchjob_runs_torchrun_on_the_configmap_config() -> None:
    (doc,) = yaml.safe_load_all((DEPLOY / "k8s" / "pytorchjob-sft.yaml").read_text())
    assert doc["kind"] == "PyTorchJob" and doc["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    (spec,) = _pod_specs(doc)
    container = spec["containers"][0]
    command = " ".join(container["command"] + container["args"])
    assert "torchrun" in command and "train.py --config /config/train.toml" in command
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["config"] == "/config" and "configMap" in volumes["config"]
    assert "--job.output_dir /outputs/" in command and "persistentVolumeClaim" in volumes["outputs"]
    assert spec["terminationGracePeriodSeconds"] >= 60  # time to checkpoint after SIGTERM


def test_rayjob_has_head_and_gpu_workers_and_the_config() -> None:
    (doc,) = yaml.safe_load_all((DEPLOY / "k8s" / "rayjob-grpo.yaml").read_text())
    assert doc["kind"] == "RayJob" and "--config /config/train.toml" in doc["spec"]["entrypoint"]
    head, *workers = _pod_specs(doc)
    assert any(v.get("configMap") for v in head["volumes"])
    assert all(w["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] > 0 for w in workers)


def test_slurm_scripts_are_valid_bash_with_requeue_and_signal() -> None:
    sbatch = (DEPLOY / "slurm" / "train.sbatch").read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@"):
        assert line in sbatch
    for script in ("train.sbatch", "launch.sh"):
        subprocess.run(["bash", "-n", str(DEPLOY / "slurm" / script)], check=True)


# ---------------------------------------------------------------- Kubernetes: CRD schemas
def _strict(schema: dict) -> dict:
    """Unknown fields are errors, as with `kubectl apply` (strict field validation): every object schema with
    properties and no rule of its own for other keys gets additionalProperties: false."""
    schema = dict(schema)
    for key in ("properties", "patternProperties"):
        if key in schema:
            schema[key] = {name: _strict(sub) for name, sub in schema[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(sub) for sub in schema[key]]
    if "properties" in schema and "additionalProperties" not in schema and not schema.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        schema["additionalProperties"] = False
    return schema


def _schema(name: str) -> dict:
    return _strict(json.loads((DEPLOY / "k8s" / "schemas" / name).read_text()))


def _errors(doc: dict, schema: dict) -> list[str]:
    """One line per violation, naming the field's path."""
    validator = jsonschema.Draft7Validator(schema)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc))


def _pruned_paths(value: object, schema: dict, path: str = "") -> list[str]:
    """Where the manifest sets something whose schema the subset left out (regenerate the subset then)."""
    if schema.get(PRUNED):
        return [path]
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in schema.get("properties", {}):
                found += _pruned_paths(item, schema["properties"][key], f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                found += _pruned_paths(item, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += _pruned_paths(item, schema["items"], f"{path}[{i}]")
    return found


def _manifest(name: str) -> dict:
    (doc,) = yaml.safe_load_all((DEPLOY / "k8s" / name).read_text())
    return doc


def test_every_manifest_has_a_crd_schema() -> None:
    assert sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")) == sorted(MANIFESTS)


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_validates_against_its_crd_schema(name: str) -> None:
    api_version, kind, schema_file = MANIFESTS[name]
    doc, schema = _manifest(name), _schema(schema_file)
    assert (doc["apiVersion"], doc["kind"]) == (api_version, kind)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])  # a DNS-1123 label
    assert _errors(doc, schema) == []
    assert _pruned_paths(doc, schema) == [], f"run scripts/k8s_schema_subset.py again for {name}"


def test_crd_schema_rejects_unknown_fields_wrong_types_and_bad_quantities() -> None:
    schema = _schema("pytorchjob-v1.json")
    doc = copy.deepcopy(_manifest("pytorchjob-sft.yaml"))
    worker = doc["spec"]["pytorchReplicaSpecs"]["Worker"]
    container = worker["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")  # a typo
    worker["replicas"] = "two"
    container["resources"]["limits"]["nvidia.com/gpu"] = "8 GPUs"
    errors = _errors(doc, schema)
    replica = "spec.pytorchReplicaSpecs.Worker"
    assert any(e.startswith(f"{replica}.template.spec.containers.0: Additional properties") and "volumeMount" in e
               for e in errors), errors
    assert any(e.startswith(f"{replica}.replicas: 'two' is not of type 'integer'") for e in errors), errors
    assert any(e.startswith(f"{replica}.template.spec.containers.0.resources.limits.nvidia.com/gpu:") for e in errors)


# ---------------------------------------------------------------- SLURM: ranks per node
def _launch_line(**env: str) -> subprocess.CompletedProcess:
    """deploy/slurm/launch.sh with LAUNCH_DRY_RUN=1: it resolves the rank count and prints the torchrun line."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPROC_PER_NODE", "POSTTRAIN_TASKS"))}
    clean.pop("OMP_NUM_THREADS", None)
    full_env = {**clean, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "LAUNCH_DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": "", "CONFIG_FILE": "train_configs/debug_sft.toml",
                "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1", "HEAD_NODE": "node1", **env}
    return subprocess.run([str(DEPLOY / "slurm" / "launch.sh")], env=full_env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize(
    ("env", "ranks", "threads"),
    [
        ({"NPROC_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96"}, 3, 32),  # the user's wins
        ({"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96"}, 8, 12),
        ({"POSTTRAIN_TASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "6"}, 2, 3),  # CPU node: --ntasks-per-node=2
        ({"SLURM_CPUS_ON_NODE": "3"}, 3, 1),  # CPU node, only CPUs asked for: one rank per CPU
    ],
)
def test_launch_line_ranks_per_node(env: dict[str, str], ranks: int, threads: int) -> None:
    proc = _launch_line(**env)
    assert proc.returncode == 0, proc.stderr
    assert f"ranks={ranks} OMP_NUM_THREADS={threads}:" in proc.stdout
    assert f"--nproc_per_node={ranks} " in proc.stdout and "--rdzv_endpoint=node1:29500 --rdzv_id=7" in proc.stdout


def test_launch_line_rejects_a_bad_rank_count_in_one_line() -> None:
    proc = _launch_line(NPROC_PER_NODE="eight")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "[launch.sh] error: NPROC_PER_NODE=eight is not a positive whole number"]


def test_launch_line_head_node_is_the_first_host_without_a_slurm_config() -> None:
    proc = _launch_line(HEAD_NODE="", SLURM_JOB_NODELIST="nodeA,nodeB", NPROC_PER_NODE="1")
    assert proc.returncode == 0, proc.stderr
    assert "--rdzv_endpoint=nodeA:29500" in proc.stdout
