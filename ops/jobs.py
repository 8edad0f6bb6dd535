"""`python -m ops.jobs status|logs|wait NAME`: follow a training job from submission to its model.

    python -m ops.jobs status run1 --stack dev --target eks          # one line: state, step/total, loss, ETA
    python -m ops.jobs logs run1 --stack dev --target sagemaker      # the trainer's output so far
    python -m ops.jobs wait run1 --stack dev --target eks            # progress until it ends, then the model
    python -m ops.launch_training ... --follow                       # submit, then `wait`

EKS jobs are read through the Kubernetes API (the Job's conditions, pod 0's `trainer` log: global rank 0 prints the
trainer's JSON lines); SageMaker jobs through DescribeTrainingJob and the job's CloudWatch Logs streams
(`/aws/sagemaker/TrainingJobs`, `<job>/algo-1-<n>`: the first host runs rank 0). Progress comes from the trainer's
records (training/metrics.py): the `start` event's `max_steps`, each logged step's `loss`, `tokens_per_s` and
`step_time_s`, and the `exported` event's `path`.

Exit status: `status`/`logs` 0; `wait` (and `--follow`) the job's outcome: 0 succeeded, 1 failed or stopped;
2 usage or config (no such job, no credentials, no stack outputs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from infra import outputs as out
from ops.stack_outputs import StackError, load_outputs, require

EXIT_SUCCEEDED, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TERMINAL = ("Succeeded", "Failed", "Stopped")
SAGEMAKER_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TRAINER_CONTAINER = "trainer"


class JobError(ValueError):
    """The job cannot be read (it does not exist, no access): exit 2."""


@dataclass
class JobState:
    phase: str
    """Pending, Running, Succeeded, Failed or Stopped (the same words for both targets)."""
    detail: str = ""
    """The platform's own words: a Job condition's reason and message, SageMaker's SecondaryStatus or FailureReason."""
    export: str | None = None
    """Where the job's spec says the model goes (`--export` / the `export` hyperparameter)."""


class Job(Protocol):
    name: str

    def state(self) -> JobState: ...

    def new_lines(self) -> list[str]:
        """Log lines of rank 0 not returned by an earlier call."""
        ...


# -- progress from the trainer's records -----------------------------------------------------------------------------
class Progress:
    """The trainer's JSON lines folded into one status line (step/total, loss, tokens/s, ETA)."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.step = 0
        self.loss: float | None = None
        self.tokens_per_s: float | None = None
        self.step_time_s: float | None = None
        self.exported: str | None = None

    def feed(self, line: str) -> bool:
        """Take one log line; True if it was one of the trainer's records."""
        try:
            record = json.loads(line)
        except ValueError:
            return False
        if not isinstance(record, dict) or "step" not in record:
            return False
        self.step = max(self.step, int(record["step"]))
        event = record.get("event")
        if event == "start":
            self.total = record.get("max_steps", self.total)
        elif event == "exported":
            self.exported = record.get("path")
        elif event is None and "loss" in record:
            self.loss = record["loss"]
            self.tokens_per_s = record.get("tokens_per_s")
            self.step_time_s = record.get("step_time_s")
        return True

    def line(self) -> str:
        if self.total is None and self.loss is None:
            return "no training step yet"
        parts = [f"step {self.step}/{self.total}" if self.total else f"step {self.step}"]
        if self.total:
            parts[0] += f" ({100 * self.step // self.total}%)"
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s")
        if self.total and self.step_time_s is not None and self.step < self.total:
            parts.append(f"ETA {_duration((self.total - self.step) * self.step_time_s)}")
        return ", ".join(parts)


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# -- EKS: the Kubernetes API -----------------------------------------------------------------------------------------
class EksJob:
    """An Indexed Job rendered by ops/training_k8s_job.py; pod 0 (completion index 0) runs global rank 0."""

    def __init__(self, batch: Any, core: Any, namespace: str, name: str) -> None:
        self.batch, self.core, self.namespace, self.name = batch, core, namespace, name
        self._seen: dict[str, int] = {}

    def state(self) -> JobState:
        from kubernetes.client.exceptions import ApiException

        try:
            job = self.batch.read_namespaced_job(self.name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise JobError(f"no Job {self.name!r} in namespace {self.namespace!r}") from None
            raise JobError(f"cannot read Job {self.name!r}: {exc.status} {exc.reason}") from None
        export = _flag(job.spec.template.spec.containers[0].command or [], "--export")
        status = job.status
        true = {c.type: c for c in status.conditions or [] if c.status == "True"}
        for kind, phase in (("Complete", "Succeeded"), ("Failed", "Failed")):
            if kind in true:
                c = true[kind]
                return JobState(phase, " ".join(filter(None, [c.reason, c.message])), export)
        if status.active:
            ready = status.ready or 0
            return JobState("Running", f"{status.active} pod(s) active, {ready} ready", export)
        return JobState("Pending", "no pod running yet (nodes scaling up, image pulling)", export)

    def new_lines(self) -> list[str]:
        from kubernetes.client.exceptions import ApiException

        selector = f"job-name={self.name},batch.kubernetes.io/job-completion-index=0"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        lines: list[str] = []
        # A replaced pod 0 (spot, drain) has its own log: read each once, oldest first.
        for pod in sorted(pods, key=lambda p: p.metadata.creation_timestamp or 0):
            pod_name = pod.metadata.name
            try:
                text = self.core.read_namespaced_pod_log(pod_name, self.namespace, container=TRAINER_CONTAINER)
            except ApiException:  # not started yet (ContainerCreating): nothing to read
                continue
            all_lines = text.splitlines()
            lines += all_lines[self._seen.get(pod_name, 0) :]
            self._seen[pod_name] = len(all_lines)
        return lines


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


# -- SageMaker: DescribeTrainingJob and CloudWatch Logs --------------------------------------------------------------
class SageMakerJob:
    PHASES: Mapping[str, str] = {
        "InProgress": "Running",
        "Completed": "Succeeded",
        "Failed": "Failed",
        "Stopping": "Running",
        "Stopped": "Stopped",
    }

    def __init__(self, sagemaker: Any, logs: Any, name: str) -> None:
        self.sm, self.logs, self.name = sagemaker, logs, name
        self._token: str | None = None
        self._stream: str | None = None

    def state(self) -> JobState:
        try:
            d = self.sm.describe_training_job(TrainingJobName=self.name)
        except self.sm.exceptions.ClientError as exc:
            raise JobError(f"cannot read training job {self.name!r}: {exc}") from None
        phase = self.PHASES.get(d["TrainingJobStatus"], d["TrainingJobStatus"])
        secondary = d.get("SecondaryStatus", "")
        if phase == "Running" and secondary in ("Starting", "Pending", "Downloading"):
            phase = "Pending"
        detail = d.get("FailureReason") or secondary
        return JobState(phase, detail, (d.get("HyperParameters") or {}).get("export"))

    def new_lines(self) -> list[str]:
        if self._stream is None:
            streams = self.logs.describe_log_streams(
                logGroupName=SAGEMAKER_LOG_GROUP, logStreamNamePrefix=f"{self.name}/algo-1"
            ).get("logStreams", [])
            if not streams:
                return []
            self._stream = streams[0]["logStreamName"]
        lines: list[str] = []
        while True:
            kwargs: dict[str, Any] = {"nextToken": self._token} if self._token else {"startFromHead": True}
            page = self.logs.get_log_events(logGroupName=SAGEMAKER_LOG_GROUP, logStreamName=self._stream, **kwargs)
            lines += [e["message"] for e in page.get("events", [])]
            if page.get("nextForwardToken") in (None, self._token):
                return lines
            self._token = page["nextForwardToken"]


# -- following -------------------------------------------------------------------------------------------------------
def serve_commands(export: str, outputs: Mapping[str, Any], stack: str) -> list[str]:
    """How to serve the exported model: locally from S3, and as the stack's served model."""
    lines = [f".venv/bin/python -m serving --model {export} --host 127.0.0.1 --port 8080 --allow-unauthenticated"]
    bucket = outputs.get(out.MODELS_BUCKET)
    if bucket and export.startswith(f"s3://{bucket}/"):
        prefix = export.removeprefix(f"s3://{bucket}/").strip("/")
        lines.append(
            f"on the stack: set llm-platform:servingModelPrefix: {prefix} in stacks/Pulumi.{stack}.yaml, then "
            f"`pulumi up --stack {stack}`"
        )
    return lines


def follow(
    job: Job,
    outputs: Mapping[str, Any],
    stack: str,
    out_: TextIO,
    poll_s: float = 15,
    show_logs: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print one progress line per change until the job ends, then its model and how to serve it; the outcome."""
    progress = Progress()
    tty = out_.isatty()
    last = ""
    while True:
        state = job.state()  # before reading logs: a job seen as ended has written its last line
        for line in job.new_lines():
            if not progress.feed(line) and show_logs:
                print(line, file=out_)
        text = f"{job.name}: {state.phase}, {progress.line()}" + (f" [{state.detail}]" if state.detail else "")
        if text != last:
            print(f"\r\x1b[2K{text}" if tty else text, end="" if tty else "\n", file=out_, flush=True)
            last = text
        if state.phase in TERMINAL:
            break
        sleep(poll_s)
    if tty:
        print(file=out_)
    if state.phase != "Succeeded":
        print(f"{job.name} {state.phase.lower()}: {state.detail or 'see `python -m ops.jobs logs`'}", file=out_)
        return EXIT_FAILED
    export = progress.exported or state.export
    if export:
        print(f"model: {export}", file=out_)
        print("serve it:", file=out_)
        for cmd in serve_commands(export, outputs, stack):
            print(f"  {cmd}", file=out_)
    return EXIT_SUCCEEDED


def open_job(target: str, name: str, outputs: Mapping[str, Any]) -> Job:
    """The job's reader for a stack: Kubernetes clients from the stack's kubeconfig, or boto3 clients."""
    if target == "eks":
        batch, core = kube_clients(require(outputs, out.KUBECONFIG))
        return EksJob(batch, core, require(outputs, out.TRAINING_NAMESPACE), name)
    import boto3

    region = outputs.get(out.REGION)
    return SageMakerJob(boto3.client("sagemaker", region_name=region), boto3.client("logs", region_name=region), name)


def kube_clients(kubeconfig: Any) -> tuple[Any, Any]:
    """BatchV1Api and CoreV1Api for the stack's kubeconfig output (a dict, or JSON/YAML text)."""
    import yaml
    from kubernetes import client, config

    cfg = kubeconfig if isinstance(kubeconfig, Mapping) else yaml.safe_load(kubeconfig)
    configuration = client.Configuration()
    config.load_kube_config_from_dict(dict(cfg), client_configuration=configuration)
    api = client.ApiClient(configuration)
    return client.BatchV1Api(api), client.CoreV1Api(api)


def run_command(command: str, job: Job, outputs: Mapping[str, Any], stack: str, out_: TextIO, poll_s: float) -> int:
    if command == "wait":
        return follow(job, outputs, stack, out_, poll_s=poll_s)
    if command == "logs":
        for line in job.new_lines():
            print(line, file=out_)
        return EXIT_SUCCEEDED
    state = job.state()
    progress = Progress()
    for line in job.new_lines():
        progress.feed(line)
    print(f"{job.name}: {state.phase}, {progress.line()}" + (f" [{state.detail}]" if state.detail else ""), file=out_)
    export = progress.exported or state.export
    if export:
        print(f"model: {export}{'' if state.phase == 'Succeeded' else ' (when it succeeds)'}", file=out_)
    return EXIT_SUCCEEDED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ops.jobs", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["status", "logs", "wait"])
    p.add_argument("name", help="the run name given to ops.launch_training --name")
    p.add_argument("--stack", required=True)
    p.add_argument("--target", required=True, choices=["eks", "sagemaker"])
    p.add_argument("--outputs", help="JSON file of stack outputs instead of running `pulumi stack output`")
    p.add_argument("--poll", type=float, default=15, help="wait: seconds between polls (default 15)")
    return p


def main(
    argv: list[str] | None = None,
    out_: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    opener: Callable[[str, str, Mapping[str, Any]], Job] = open_job,
) -> int:
    args = build_parser().parse_args(argv)
    try:
        outputs = load_outputs(args.stack, args.outputs)
        job = opener(args.target, args.name, outputs)
        return run_command(args.command, job, outputs, args.stack, out_, args.poll)
    except (JobError, StackError, OSError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on: python -m ops.jobs wait {args.name} ...", file=err)
        return 130
    except Exception as exc:  # botocore's, without importing botocore for the EKS path
        from botocore.exceptions import BotoCoreError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            print(f"error: no AWS credentials ({exc})", file=err)
            return EXIT_USAGE
        if isinstance(exc, BotoCoreError):
            print(f"error: {exc}", file=err)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    raise SystemExit(main())
