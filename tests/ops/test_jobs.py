"""Following a training job to its model: `ops.jobs status|logs|wait` and `ops.launch_training --follow`, on EKS
through a fake Kubernetes API (the real client's models) and on SageMaker through moto (DescribeTrainingJob,
CloudWatch Logs). The log lines are the trainer's own records, written by training/metrics.py's Reporter."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from contextlib import redirect_stdout, suppress
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from kubernetes import client as k
from kubernetes.client.exceptions import ApiException

from infra import outputs as out
from ops import jobs
from ops.stack_outputs import load_outputs
from tests.helpers import REPO_ROOT, STACK_OUTPUTS_DEV
from training.metrics import Reporter


def trainer_lines(max_steps: int, steps: list[int], export: str | None) -> list[str]:
    """What rank 0 prints: the real Reporter's JSON lines."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        report = Reporter(is_main=True, series=None, total_steps=max_steps)
        report.event("start", 0, max_steps=max_steps, world_size=8, strategy="fsdp")
        for s in steps:
            record = {"step": s, "loss": 3.0 - s / 100, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 51234.5,
                      "step_time_s": 2.0}  # fmt: skip
            report.step_logged(record, tokens=1000)
        if export:
            report.event("checkpoint", steps[-1], save_s=3.2)
            report.event("exported", steps[-1], path=export)
        report.close()
    return ["torchrun: starting 8 workers", *buf.getvalue().splitlines()]


def test_progress_reads_the_trainers_records() -> None:
    p = jobs.Progress()
    for line in trainer_lines(1000, [10, 20], None):
        p.feed(line)
    # 980 steps left at 2 s each.
    assert p.line() == "step 20/1000 (2%), loss 2.8000, 51,234 tokens/s, ETA 0:32:40"
    assert jobs.Progress().line() == "no training step yet"


# -- EKS: a fake Kubernetes API that moves the Job along on each poll -------------------------------------------------
class FakeKube:
    """BatchV1Api.read_namespaced_job and CoreV1Api.list_namespaced_pod / read_namespaced_pod_log, scripted: each
    read of the Job advances to the next (phase, pod-0 log) stage."""

    def __init__(self, name: str, namespace: str, stages: list[tuple[str, list[str]]], export: str) -> None:
        self.name, self.namespace, self.stages, self.export = name, namespace, stages, export
        self.i = -1

    def read_namespaced_job(self, name: str, namespace: str) -> k.V1Job:
        if (name, namespace) != (self.name, self.namespace):
            raise ApiException(status=404, reason="Not Found")
        self.i = min(self.i + 1, len(self.stages) - 1)
        phase = self.stages[self.i][0]
        conditions = {
            "Complete": [k.V1JobCondition(type="Complete", status="True")],
            "Failed": [k.V1JobCondition(type="Failed", status="True", reason="BackoffLimitExceeded",
                                        message="Job has reached the specified backoff limit")],
        }.get(phase, [])  # fmt: skip
        container = k.V1Container(name="trainer", command=["python", "-m", "training", "--export", self.export])
        return k.V1Job(
            metadata=k.V1ObjectMeta(name=name, namespace=namespace),
            spec=k.V1JobSpec(template=k.V1PodTemplateSpec(spec=k.V1PodSpec(containers=[container]))),
            status=k.V1JobStatus(active=1 if phase == "Running" else None, ready=1, conditions=conditions),
        )

    def list_namespaced_pod(self, namespace: str, label_selector: str) -> k.V1PodList:
        assert label_selector == f"job-name={self.name},batch.kubernetes.io/job-completion-index=0"
        meta = k.V1ObjectMeta(name=f"{self.name}-0-abcde", creation_timestamp=datetime(2026, 12, 7, tzinfo=UTC))
        return k.V1PodList(items=[k.V1Pod(metadata=meta)])

    def read_namespaced_pod_log(self, name: str, namespace: str, container: str) -> str:
        assert container == "trainer"
        lines = self.stages[self.i][1]
        if not lines:
            raise ApiException(status=400, reason="container is waiting to start: ContainerCreating")
        return "\n".join(lines) + "\n"


@pytest.fixture
def outputs() -> dict[str, Any]:
    return load_outputs("dev", str(STACK_OUTPUTS_DEV))


def _eks_stages(outputs: dict[str, Any], last: str) -> tuple[list[tuple[str, list[str]]], str]:
    export = f"s3://{outputs[out.MODELS_BUCKET]}/run1"
    logs = trainer_lines(100, [10, 20, 30], None)
    done = trainer_lines(100, [10, 20, 30, 100], export if last == "Complete" else None)
    return [("Pending", []), ("Running", logs[:3]), ("Running", logs), (last, done)], export


def test_wait_follows_an_eks_job_to_its_model_and_the_command_that_serves_it(outputs: dict[str, Any]) -> None:
    stages, export = _eks_stages(outputs, "Complete")
    fake = FakeKube("run1", outputs[out.TRAINING_NAMESPACE], stages, export)
    buf = io.StringIO()
    rc = jobs.main(
        ["wait", "run1", "--stack", "dev", "--target", "eks", "--outputs", str(STACK_OUTPUTS_DEV), "--poll", "0"],
        out_=buf,
        opener=lambda target, name, o: jobs.EksJob(fake, fake, o[out.TRAINING_NAMESPACE], name),
    )
    text = buf.getvalue()
    print(text)  # the output docs/training.md shows
    assert rc == 0
    assert "run1: Pending, no training step yet [no pod running yet" in text
    assert "run1: Running, step 10/100 (10%), loss 2.9000, 51,234 tokens/s, ETA 0:03:00" in text
    assert "run1: Succeeded, step 100/100 (100%), loss 2.0000, 51,234 tokens/s" in text
    assert f"model: {export}" in text
    assert f"python -m serving --model {export} " in text
    assert "set llm-platform:servingModelPrefix: run1 in stacks/Pulumi.dev.yaml" in text


def test_a_failed_eks_job_exits_1_with_the_reason(outputs: dict[str, Any]) -> None:
    stages, export = _eks_stages(outputs, "Failed")
    fake = FakeKube("run1", outputs[out.TRAINING_NAMESPACE], stages, export)
    job = jobs.EksJob(fake, fake, outputs[out.TRAINING_NAMESPACE], "run1")
    buf = io.StringIO()
    assert jobs.follow(job, outputs, "dev", buf, poll_s=0, sleep=lambda s: None) == 1
    assert "run1 failed: BackoffLimitExceeded Job has reached the specified backoff limit" in buf.getvalue()
    assert "model:" not in buf.getvalue()


def test_an_unknown_eks_job_is_exit_2(outputs: dict[str, Any]) -> None:
    fake = FakeKube("run1", outputs[out.TRAINING_NAMESPACE], [("Pending", [])], "s3://x/y")
    err = io.StringIO()
    rc = jobs.main(
        ["status", "nope", "--stack", "dev", "--target", "eks", "--outputs", str(STACK_OUTPUTS_DEV)],
        err=err,
        opener=lambda target, name, o: jobs.EksJob(fake, fake, o[out.TRAINING_NAMESPACE], name),
    )
    assert rc == 2 and "no Job 'nope' in namespace" in err.getvalue()


# -- SageMaker: moto ---------------------------------------------------------------------------------------------------
def _sagemaker_logs(region: str, name: str, lines: list[str]) -> None:
    logs = boto3.client("logs", region_name=region)
    with suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_group(logGroupName=jobs.SAGEMAKER_LOG_GROUP)
    stream = f"{name}/algo-1-1765100000"
    logs.create_log_stream(logGroupName=jobs.SAGEMAKER_LOG_GROUP, logStreamName=stream)
    now_ms = int(time.time() * 1000)  # CloudWatch (and moto) drop events older than 14 days
    events = [{"timestamp": now_ms + i, "message": line} for i, line in enumerate(lines)]
    logs.put_log_events(logGroupName=jobs.SAGEMAKER_LOG_GROUP, logStreamName=stream, logEvents=events)


def test_launch_follow_on_sagemaker_ends_with_the_model_and_the_jobs_outcome(
    aws_env: str, outputs: dict[str, Any]
) -> None:
    export = f"s3://{outputs[out.MODELS_BUCKET]}/sm-follow"
    _sagemaker_logs(outputs[out.REGION], "sm-follow", trainer_lines(100, [50, 100], export))
    proc = subprocess.run(
        [sys.executable, "-m", "ops.launch_training", "--stack", "dev", "--outputs", str(STACK_OUTPUTS_DEV),
         "--target", "sagemaker", "--name", "sm-follow", "--image-tag", "v1", "--instance-type", "ml.p3.2xlarge",
         "--data", "corpora/c4", "--max-steps", "100", "--follow", "--poll", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    print(proc.stdout)  # the output docs/training.md shows
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].endswith(":training-job/sm-follow")
    assert "sm-follow: Succeeded, step 100/100 (100%), loss 2.0000, 51,234 tokens/s" in proc.stdout
    assert f"model: {export}" in proc.stdout and "servingModelPrefix: sm-follow" in proc.stdout

    status = io.StringIO()
    argv = ["--stack", "dev", "--target", "sagemaker", "--outputs", str(STACK_OUTPUTS_DEV)]
    assert jobs.main(["status", "sm-follow", *argv], out_=status) == 0
    assert status.getvalue().startswith("sm-follow: Succeeded, step 100/100")
    logs = io.StringIO()
    assert jobs.main(["logs", "sm-follow", *argv], out_=logs) == 0
    assert logs.getvalue().splitlines()[0] == "torchrun: starting 8 workers"


class FailedSageMaker:
    class exceptions:
        ClientError = Exception

    def describe_training_job(self, TrainingJobName: str) -> dict[str, Any]:
        return {
            "TrainingJobStatus": "Failed",
            "SecondaryStatus": "Failed",
            "FailureReason": "AlgorithmError: exit status 2",
            "HyperParameters": {"export": "s3://m/x"},
        }


def test_a_failed_sagemaker_job_exits_1_with_sagemakers_reason(aws_env: str, outputs: dict[str, Any]) -> None:
    logs = boto3.client("logs", region_name=outputs[out.REGION])
    job = jobs.SageMakerJob(FailedSageMaker(), logs, "sm-failed")
    buf = io.StringIO()
    assert jobs.follow(job, outputs, "dev", buf, poll_s=0) == 1
    assert "sm-failed failed: AlgorithmError: exit status 2" in buf.getvalue()
