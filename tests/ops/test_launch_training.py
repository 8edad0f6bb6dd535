"""The launcher: EKS job rendering (strict Kubernetes schema, placement from the stack's pool) and SageMaker jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import kubernetes_validate
import pytest
import yaml

from infra import outputs as out
from ops.stack_outputs import StackError, load_outputs, parse_outputs, training_pool
from ops.training_k8s_job import TrainingJobSpec, render_training_job
from tests.helpers import REPO_ROOT, STACK_OUTPUTS_DEV
from training.sagemaker_entry import torchrun_argv

FIXTURE = STACK_OUTPUTS_DEV
K8S_VERSION = "1.33"


@pytest.fixture
def outputs() -> dict[str, Any]:
    return load_outputs("dev", str(FIXTURE))


def launch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.launch_training", "--stack", "dev", "--outputs", str(FIXTURE), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_outputs_file_accepts_flat_and_preview_formats(tmp_path: Path) -> None:
    preview = json.loads(FIXTURE.read_text())
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(preview["outputs"]))
    assert load_outputs("dev", str(flat)) == load_outputs("dev", str(FIXTURE)) == preview["outputs"]
    assert parse_outputs({out.STACK: "dev"}) == {out.STACK: "dev"}
    # The fixture speaks the stack's vocabulary: every key is a constant of infra.outputs.
    known = {v for k, v in vars(out).items() if k.isupper() and isinstance(v, str)}
    assert set(preview["outputs"]) <= known


def test_eks_dry_run_renders_valid_objects_placed_on_the_training_pool(outputs: dict[str, Any]) -> None:
    proc = launch("--target", "eks", "--name", "run1", "--nodes", "2", "--data", "corpora/c4", "--max-steps", "500",
                  "--image-tag", "v1", "--set", "optim.lr=1e-4", "--model", "base/llama-3.2-1b",
                  "--dry-run")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    objs = list(yaml.safe_load_all(proc.stdout))
    assert [o["kind"] for o in objs] == ["Service", "Job"]
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)

    service, job = objs
    _, pool = training_pool(outputs)
    pod = job["spec"]["template"]["spec"]
    ns = outputs[out.TRAINING_NAMESPACE]
    assert service["metadata"]["namespace"] == job["metadata"]["namespace"] == ns
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    # The scheduling contract: exactly the pool's labels and a toleration for each of its taints.
    assert pod["nodeSelector"] == pool["labels"]
    for taint in pool["taints"]:
        assert {"key": taint["key"], "operator": "Equal", "value": taint["value"], "effect": taint["effect"]} in pod[
            "tolerations"
        ]
    assert pod["serviceAccountName"] == outputs[out.TRAINING_SERVICE_ACCOUNT]
    # Service selects the Job's pods.
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()

    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimitPerIndex"] > 0
    container = pod["containers"][0]
    assert container["image"] == f"{outputs[out.TRAINING_REPOSITORY_URL]}:v1"
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(pool["gpus_per_node"])
    assert limits["vpc.amazonaws.com/efa"] == "1"  # the fixture's training pool has EFA
    cmd = container["command"]
    # torchrun through the wrapper that exits 143 on SIGTERM, with the workers' share of the grace period.
    assert cmd[:3] == ["python", "-m", "training.torchrun"] and "--nnodes=2" in cmd
    assert pod["terminationGracePeriodSeconds"] == 120 and "--shutdown-timeout=105" in cmd
    assert "--nnodes=2" in cmd and f"--nproc_per_node={pool['gpus_per_node']}" in cmd
    assert f"--rdzv_endpoint=run1-0.run1.{ns}.svc.cluster.local:29500" in cmd
    joined = " ".join(cmd)
    assert f"--data s3://{outputs[out.DATASETS_BUCKET]}/corpora/c4" in joined
    assert f"--output s3://{outputs[out.CHECKPOINTS_BUCKET]}/run1" in joined
    assert f"--export s3://{outputs[out.MODELS_BUCKET]}/run1" in joined
    assert "--set optim.lr=1e-4" in joined
    assert f"--set model.path=s3://{outputs[out.MODELS_BUCKET]}/base/llama-3.2-1b" in joined
    assert "--preset" not in cmd, "a real model without --preset gets the trainer's finetune preset, not debug"
    # Prometheus: the trainer serves its metrics port and the pods say so, as the serving Deployment's do.
    assert joined.endswith("--set metrics_port=9400")
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]
    assert job["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9400",
        "prometheus.io/path": "/metrics",
    }


def test_eks_job_without_efa_requests_only_gpus(outputs: dict[str, Any]) -> None:
    outputs[out.GPU_POOLS]["training"]["efa"] = False
    _, job = render_training_job(TrainingJobSpec(name="noefa", data="s3://elsewhere/d"), outputs)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert set(container["resources"]["limits"]) == {"nvidia.com/gpu"}
    assert "--data" in container["command"] and "s3://elsewhere/d" in container["command"]


def test_stack_without_training_pool_is_a_clear_error(outputs: dict[str, Any], tmp_path: Path) -> None:
    del outputs[out.GPU_POOLS]["training"]
    with pytest.raises(StackError, match="purpose 'training'"):
        render_training_job(TrainingJobSpec(name="x", data="d"), outputs)
    f = tmp_path / "o.json"
    f.write_text(json.dumps(outputs))
    proc = subprocess.run(
        [sys.executable, "-m", "ops.launch_training", "--stack", "dev", "--outputs", str(f), "--target", "eks",
         "--name", "x", "--image-tag", "v1", "--data", "d", "--dry-run"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "purpose 'training'" in proc.stderr


def test_sagemaker_job_created_against_moto_with_the_stacks_role_and_buckets(
    aws_env: str, outputs: dict[str, Any]
) -> None:
    proc = launch("--target", "sagemaker", "--name", "sm-run-1", "--image-tag", "v1",
                  "--instance-type", "ml.p3.2xlarge", "--instance-count", "2", "--data", "corpora/c4",
                  "--max-steps", "100", "--spot",
                  "--set", "optim.lr=1e-4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(":training-job/sm-run-1")

    sm = boto3.client("sagemaker", region_name=outputs[out.REGION])
    job = sm.describe_training_job(TrainingJobName="sm-run-1")
    assert job["RoleArn"] == outputs[out.SAGEMAKER_EXECUTION_ROLE_ARN]
    assert job["AlgorithmSpecification"]["TrainingImage"] == f"{outputs[out.TRAINING_REPOSITORY_URL]}:v1"
    assert job["ResourceConfig"]["InstanceType"] == "ml.p3.2xlarge"
    assert job["ResourceConfig"]["InstanceCount"] == 2
    channel = job["InputDataConfig"][0]
    assert channel["ChannelName"] == "train"
    assert channel["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{outputs[out.DATASETS_BUCKET]}/corpora/c4"
    assert job["OutputDataConfig"]["S3OutputPath"].startswith(f"s3://{outputs[out.MODELS_BUCKET]}/")
    hp = job["HyperParameters"]
    assert hp["output"] == f"s3://{outputs[out.CHECKPOINTS_BUCKET]}/sm-run-1"
    assert hp["export"] == f"s3://{outputs[out.MODELS_BUCKET]}/sm-run-1"
    assert hp["max-steps"] == "100" and hp["optim.lr"] == "1e-4"
    assert job["EnableManagedSpotTraining"] is True

    # The same hyperparameters, read back inside the container, become the trainer's command line.
    env = {"SM_CHANNEL_TRAIN": "/opt/ml/input/data/train", "SM_HOSTS": '["algo-1", "algo-2"]',
           "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "8"}  # fmt: skip
    argv = torchrun_argv(hp, env)
    joined = " ".join(argv)
    assert "--nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=algo-1" in joined
    # StopTrainingJob's 120 s SIGTERM window, less the agent's margin, and the wrapper that exits 143.
    assert "-m training.torchrun --shutdown-timeout=105" in joined
    # No --preset given to the launcher: none is passed, the trainer picks (debug here, finetune with a model).
    assert f"--data /opt/ml/input/data/train --output {hp['output']}" in joined and "--preset" not in joined
    assert "--set optim.lr=1e-4" in joined and "--max-steps 100" in joined


def test_sagemaker_dry_run_submits_nothing(aws_env: str) -> None:
    proc = launch("--target", "sagemaker", "--name", "sm-dry", "--image-tag", "v1", "--data", "d", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["TrainingJobName"] == "sm-dry"
    names = [j["TrainingJobName"] for j in boto3.client("sagemaker").list_training_jobs()["TrainingJobSummaries"]]
    assert "sm-dry" not in names


def test_eks_job_failure_policy_does_not_count_disruptions(outputs: dict[str, Any]) -> None:
    """Spot interruption, drains and preemption replace the pod without spending retries; each node (index) has its
    own budget and one exhausted index fails the Job; a replacement waits for the old pod to be gone."""
    _, job = render_training_job(TrainingJobSpec(name="fp", nodes=4, data="d", backoff_limit=3), outputs)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy only applies to pods that are not restarted in place
    assert "backoffLimit" not in spec and spec["backoffLimitPerIndex"] == 3 and spec["maxFailedIndexes"] == 0
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    ]


def test_eks_rendezvous_waits_for_a_cold_scale_up(outputs: dict[str, Any]) -> None:
    _, job = render_training_job(TrainingJobSpec(name="rdzv", nodes=2, data="d"), outputs)
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    conf = dict(
        kv.split("=") for kv in next(a for a in cmd if a.startswith("--rdzv_conf=")).split("=", 1)[1].split(",")
    )
    # c10d's defaults (60 s store reads, 600 s join) are shorter than a GPU node scale-up plus an image pull
    assert int(conf["read_timeout"]) >= 600 and int(conf["join_timeout"]) >= 1200


def test_eks_job_is_burstable_with_memory_and_scratch_requests(outputs: dict[str, Any]) -> None:
    _, job = render_training_job(TrainingJobSpec(name="qos", data="d", scratch_gib=150), outputs)
    pod = job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    requests = resources["requests"]
    # g6e.12xlarge: 48 vCPUs, 384 GiB; requests stay below the node's allocatable
    assert requests["cpu"] == "40" and requests["memory"] == "307Gi"
    assert requests["ephemeral-storage"] == "150Gi"
    assert {v["name"]: v for v in pod["volumes"]}["scratch"]["emptyDir"] == {"sizeLimit": "150Gi"}
    # by default: half the NVMe instance store of the pool's type (g6e.12xlarge: 3800 GB), which the nodes'
    # NodeConfig puts under the kubelet (infra/cluster.py)
    _, job = render_training_job(TrainingJobSpec(name="qos", data="d"), outputs)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "1769Gi"
    assert {v["name"]: v for v in pod["volumes"]}["scratch"]["emptyDir"] == {"sizeLimit": "1769Gi"}
    # Burstable, not BestEffort: requests set; the GPU and EFA extended resources are equal in both
    assert "memory" not in resources["limits"]
    assert {k: requests[k] for k in resources["limits"]} == resources["limits"]


@pytest.mark.parametrize(
    ("instance_type", "devices", "rdma"),
    [
        ("g6e.12xlarge", "1", False),  # G-series: EFA without GPUDirect RDMA (aws/aws-ofi-nccl#547)
        ("g6e.48xlarge", "4", False),
        ("p4d.24xlarge", "4", True),
        ("p5.48xlarge", "32", True),
        ("p5en.48xlarge", "16", True),
    ],
)
def test_eks_efa_devices_and_env_follow_the_instance_family(
    outputs: dict[str, Any], instance_type: str, devices: str, rdma: bool
) -> None:
    from facts.instance_types import GPU_INSTANCE_TYPES

    pool = outputs[out.GPU_POOLS]["training"]
    pool.update(instance_types=[instance_type], gpus_per_node=GPU_INSTANCE_TYPES[instance_type].gpus, efa=True)
    _, job = render_training_job(TrainingJobSpec(name="efa", data="d"), outputs)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["vpc.amazonaws.com/efa"] == devices
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FI_PROVIDER"] == "efa"
    assert env.get("FI_EFA_USE_DEVICE_RDMA") == ("1" if rdma else None)
    # an explicit count still wins
    _, job = render_training_job(TrainingJobSpec(name="efa", data="d", efa_devices=2), outputs)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["vpc.amazonaws.com/efa"] == "2"


def test_distillation_job_reads_the_teacher_from_the_models_bucket(outputs: dict[str, Any]) -> None:
    models = outputs[out.MODELS_BUCKET]
    eks = launch("--target", "eks", "--name", "kd1", "--data", "chat", "--image-tag", "v1", "--model", "pruned/s20",
                 "--distill-from", "ft/teacher", "--set", "distill.alpha=0.7", "--dry-run")  # fmt: skip
    assert eks.returncode == 0, eks.stderr
    joined = " ".join(list(yaml.safe_load_all(eks.stdout))[1]["spec"]["template"]["spec"]["containers"][0]["command"])
    assert f"--set model.path=s3://{models}/pruned/s20 --set distill.teacher=s3://{models}/ft/teacher" in joined
    assert "--set distill.alpha=0.7" in joined
    sm = launch("--target", "sagemaker", "--name", "kd2", "--data", "chat", "--image-tag", "v1",
                "--distill-from", "s3://elsewhere/teacher", "--dry-run")  # fmt: skip
    assert sm.returncode == 0, sm.stderr
    hp = json.loads(sm.stdout)["HyperParameters"]
    assert hp["distill.teacher"] == "s3://elsewhere/teacher"
