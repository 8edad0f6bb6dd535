"""`python -m ops.launch_training`: submit a training run to a stack's EKS training pool or to SageMaker.

    python -m ops.launch_training --stack dev --target eks --name run1 --nodes 2 --preset llama-1b \\
        --data corpora/c4-en --image-tag 2026-11-23 --dry-run
    python -m ops.launch_training --stack dev --target sagemaker --name run1 --instance-type ml.p4d.24xlarge \\
        --preset llama-8b --data corpora/c4-en --spot
    python -m ops.launch_training --stack dev --target eks --job prepare --name c4-llama32 --workers 8 \\
        --data corpora/c4-en --model base/llama-3.2-1b --seq-len 4096 --image-tag 2026-11-23 --dry-run
    python -m ops.launch_training --stack dev --target eks --job prune --name smol-20l --model ft/smollm2 \\
        --data chat/train.jsonl --keep-layers 20 --image-tag 2026-11-23 --dry-run

`--follow` then shows one progress line until the job ends and prints the exported model and the command that
serves it (`python -m ops.jobs wait`); the exit status is the job's outcome.

Stack outputs come from `pulumi stack output --json` for `--stack`, or from `--outputs FILE` (that command's output
or the offline preview's JSON). `--dry-run` prints what would be submitted and touches nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from infra import outputs as out
from ops import prepare_job, prune_job
from ops.stack_outputs import StackError, load_outputs, require, training_pool
from ops.training_k8s_job import (
    TrainingJobSpec,
    render_training_job,
    run_locations,
    smallest_type,
    trainer_args,
)
from ops.training_sagemaker_job import SageMakerJobSpec, build_training_job_request, model_trainer_view, submit
from training import fit
from training.config import ConfigError, TrainConfig
from training.data import DataError
from training.model import ModelError
from training.sagemaker_entry import trainer_args as sagemaker_trainer_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ops.launch_training", description=__doc__.splitlines()[0])
    p.add_argument("--stack", required=True, help="Pulumi stack name (dev, staging, prod)")
    p.add_argument("--target", required=True, choices=["eks", "sagemaker"])
    p.add_argument(
        "--job",
        default="train",
        choices=sorted([*JOB_KINDS, PREPARE]),
        help="what the job runs (default: train); prepare: tokenize data once into shards (ops/prepare_job.py)",
    )
    p.add_argument("--outputs", help="JSON file of stack outputs instead of running `pulumi stack output`")
    p.add_argument("--name", required=True, help="run name: Job / training-job name and S3 prefix of the run")
    p.add_argument(
        "--image-tag",
        required=True,
        help="tag of the training image in the stack's ECR repository (tags are immutable: name the build, not latest)",
    )
    p.add_argument("--preset", help="trainer preset; default: finetune with --model, else debug (python -m training)")
    p.add_argument("--model", help="HF model directory: s3:// URI or a key in the stack's models bucket")
    p.add_argument(
        "--distill-from",
        help="teacher to distil from (python -m training --distill-from): s3:// URI or a key in the models bucket",
    )
    p.add_argument("--data", required=True, help="s3:// URI or a key in the stack's datasets bucket")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--nodes", type=int, default=1, help="EKS: nodes of the training pool (one pod per node)")
    p.add_argument(
        "--efa-devices", type=int, default=None, help="EKS: EFA devices per pod (default: all the pool's nodes have)"
    )
    p.add_argument("--instance-type", default="ml.p4d.24xlarge", help="SageMaker instance type")
    p.add_argument("--instance-count", type=int, default=1, help="SageMaker instances")
    p.add_argument("--spot", action="store_true", help="SageMaker managed spot training")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; submit nothing")
    p.add_argument(
        "--follow",
        action="store_true",
        help="after submitting, show progress until the job ends (ops.jobs wait); exit status = the job's outcome",
    )
    p.add_argument("--poll", type=float, default=15, help="--follow: seconds between polls (default 15)")
    # [prepare] `--job prepare` (its own flags): python -m training.prepare as an Indexed Job / Processing job.
    prepare_job.add_arguments(p)
    # [prune] `--job prune` (its own flags): python -m training.prune as a Job / training job (ops/prune_job.py).
    prune_job.add_arguments(p)
    return p


class LaunchError(ValueError):
    """What the job would fail on, found before anything is submitted (exit 2)."""


@dataclass(frozen=True)
class JobKind:
    """One kind of job the launcher submits. Adding a kind (prune, distill, prepare) is one entry in JOB_KINDS: the
    module the pods run with `python -m` and that module's own validation of the command line it will get."""

    module: str
    validate: Callable[[list[str], bool], Any]
    """(argv the job's module gets, whether the model's config.json may be read) -> the resolved config; raises
    the module's own errors for what it would refuse."""
    launch: Callable[[argparse.Namespace, dict[str, Any], Callable[[list[str], bool], Any]], int] | None = None
    """A kind that is not a torchrun training job (one process, its own renderer): (args, stack outputs, validate)
    -> exit status. None: launch_eks / launch_sagemaker with `module` and `validate`."""


def validate_training_argv(argv: list[str], read_model: bool) -> TrainConfig:
    """The trainer's own parsing and validation (training/__main__.py, training/config.py), in-process, on the
    exact flags the job will pass: what it refuses here it would refuse on a paid GPU node."""
    import training.__main__ as trainer

    try:
        args = trainer.build_parser().parse_args(argv)
    except SystemExit:  # argparse has printed why
        raise LaunchError(f"the trainer would refuse its command line: {' '.join(argv)}") from None
    cfg = trainer.resolve_config(args, read_model=read_model)
    cfg.validate_for_run()
    return cfg


def validate_prune_argv(argv: list[str], read_model: bool) -> Any:
    """The pruner's own parsing and validation (training/prune.py validate_argv), in-process, on the job's flags."""
    from training import prune

    try:
        return prune.validate_argv(argv, read_model)
    except SystemExit:  # argparse has printed why
        raise LaunchError(f"the pruner would refuse its command line: {' '.join(argv)}") from None
    except (ConfigError, DataError, ModelError) as e:
        raise LaunchError(f"the pruner would refuse this job: {e}") from None


JOB_KINDS: dict[str, JobKind] = {
    "train": JobKind(module="training", validate=validate_training_argv),
    "prune": JobKind(module=prune_job.MODULE, validate=validate_prune_argv, launch=prune_job.launch_prune),
}

PREPARE = "prepare"
"""`--job prepare`: data preparation (python -m training.prepare) is an Indexed Job / Processing job with its own
flags and renderer (ops/prepare_job.py), not a training Job, so it is dispatched before JOB_KINDS."""


def _overrides(args: argparse.Namespace, outputs: dict[str, Any]) -> list[str]:
    def in_models_bucket(path: str) -> str:
        if path.startswith("s3://") or path == "debug":
            return path
        return f"s3://{require(outputs, out.MODELS_BUCKET)}/{path.lstrip('/')}"

    paths = [f"model.path={in_models_bucket(args.model)}"] if args.model else []
    # distill: the teacher comes from the models bucket like the student (training/distill.py).
    if args.distill_from:
        paths.append(f"distill.teacher={in_models_bucket(args.distill_from)}")
    return [*paths, *args.overrides]


def _validated(args: argparse.Namespace, argv: list[str]) -> TrainConfig:
    try:
        return JOB_KINDS[args.job].validate(argv, not args.dry_run)
    except (ConfigError, DataError, ModelError) as e:
        raise LaunchError(f"the trainer would refuse this job: {e}") from None


def check_fit(cfg: TrainConfig, instance_type: str, nodes: int, flag: str) -> None:
    """Refuse a preset whose estimated memory per GPU (training/fit.py) exceeds the GPU of `instance_type`."""
    e = fit.check_fit(cfg, instance_type, nodes)
    if e is None or e.fits:
        return
    fewest = fit.fewest_nodes(cfg, instance_type)
    fix = f"pass {flag} {fewest}" if fewest else "use a larger GPU type"
    raise LaunchError(
        f"preset {cfg.name!r} does not fit {nodes} x {instance_type}: {e.describe()} (training/fit.py); {fix}, "
        "or lower parallel.micro_batch_size / data.seq_len with --set"
    )


def check_nodes(nodes: int, pool_name: str, pool: dict[str, Any], stack: str) -> None:
    """A Job with more pods than the pool can have nodes waits forever (one training pod per node)."""
    max_size = pool.get("max_size")
    if max_size is not None and nodes > int(max_size):
        raise LaunchError(
            f"--nodes {nodes} is more than the {pool_name!r} pool's maximum of {max_size} nodes, so pods would wait "
            f"for capacity forever: pass --nodes {max_size} or less, or raise trainingMaxSize in "
            f"stacks/Pulumi.{stack}.yaml and `pulumi up`"
        )


def launch_eks(args: argparse.Namespace, outputs: dict[str, Any]) -> int:
    spec = TrainingJobSpec(
        name=args.name,
        image_tag=args.image_tag,
        nodes=args.nodes,
        efa_devices=args.efa_devices,
        preset=args.preset or "",
        data=args.data,
        max_steps=args.max_steps,
        save_every=args.save_every,
        overrides=_overrides(args, outputs),
        module=JOB_KINDS[args.job].module,
    )
    pool_name, pool = training_pool(outputs)
    check_nodes(args.nodes, pool_name, pool, args.stack)
    cfg = _validated(args, trainer_args(spec, run_locations(outputs, spec.name, spec.data)))
    check_fit(cfg, smallest_type(pool), args.nodes, "--nodes")
    manifest = yaml.safe_dump_all(render_training_job(spec, outputs), sort_keys=False)
    if args.dry_run:
        print(manifest, end="")
        return 0
    cmd = ["kubectl", "apply", "-f", "-"]
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = outputs.get(out.KUBECONFIG)
        if kubeconfig:
            # The stack's kubeconfig authenticates with `aws eks get-token` under the caller's AWS identity.
            path = os.path.join(tmp, "kubeconfig")
            with open(path, "w", encoding="utf-8") as f:
                f.write(kubeconfig if isinstance(kubeconfig, str) else json.dumps(kubeconfig))
            cmd += ["--kubeconfig", path]
        rc = subprocess.run(cmd, input=manifest, text=True, check=False).returncode
    return _follow(args, outputs) if rc == 0 and args.follow else rc


def launch_sagemaker(args: argparse.Namespace, outputs: dict[str, Any]) -> int:
    spec = SageMakerJobSpec(
        name=args.name,
        image_tag=args.image_tag,
        instance_type=args.instance_type,
        instance_count=args.instance_count,
        preset=args.preset or "",
        data=args.data,
        max_steps=args.max_steps,
        save_every=args.save_every,
        overrides=_overrides(args, outputs),
        spot=args.spot,
    )
    request = build_training_job_request(spec, outputs)
    # What the image's entry point (training/sagemaker_entry.py) will turn the hyperparameters into.
    try:
        argv = sagemaker_trainer_args(request["HyperParameters"], {"SM_CHANNEL_TRAIN": "/opt/ml/input/data/train"})
    except SystemExit as e:
        raise LaunchError(str(e.code).removeprefix("error: ")) from None
    cfg = _validated(args, argv)
    check_fit(cfg, args.instance_type, args.instance_count, "--instance-count")
    if args.dry_run:
        print(json.dumps(request, indent=2))  # the CreateTrainingJob request, as boto3 sends it
        print("\nIn SageMaker Python SDK terms (sagemaker 3.x; not used, docs/training.md):", file=sys.stderr)
        print(model_trainer_view(request), file=sys.stderr)
        return 0
    print(submit(request, region=outputs.get(out.REGION)))
    return _follow(args, outputs) if args.follow else 0


def _follow(args: argparse.Namespace, outputs: dict[str, Any]) -> int:
    from ops import jobs

    job = jobs.open_job(args.target, args.name, outputs)
    return jobs.follow(job, outputs, args.stack, sys.stdout, poll_s=args.poll)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        outputs = load_outputs(args.stack, args.outputs)
        if args.job == PREPARE:
            return prepare_job.launch_prepare(args, outputs)
        kind = JOB_KINDS[args.job]
        if kind.launch is not None:
            return kind.launch(args, outputs, kind.validate)
        if args.target == "eks":
            return launch_eks(args, outputs)
        return launch_sagemaker(args, outputs)
    except (StackError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # botocore's, without importing botocore for the dry runs
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if isinstance(e, NoCredentialsError):
            print(f"error: no AWS credentials ({e}): configure them, or add --dry-run", file=sys.stderr)
            return 2
        if isinstance(e, (BotoCoreError, ClientError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
