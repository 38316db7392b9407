"""The Kubernetes manifests parse, run train.py on the mounted config file, and keep outputs on a shared
volume (so a restarted pod resumes). The SLURM script is exercised for real in tests/integration/test_preemption.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


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
