"""`python -m ops.launch_training`: submit a training run to a stack's EKS training pool or to SageMaker.

    python -m ops.launch_training --stack dev --target eks --name run1 --nodes 2 --preset llama-1b \\
        --data corpora/c4-en --image-tag 2026-11-23 --dry-run
    python -m ops.launch_training --stack dev --target sagemaker --name run1 --instance-type ml.p4d.24xlarge \\
        --preset llama-8b --data corpora/c4-en --spot

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
from typing import Any

import yaml

from infra import outputs as out
from ops.stack_outputs import StackError, load_outputs, require
from ops.training_k8s_job import TrainingJobSpec, render_training_job
from ops.training_sagemaker_job import SageMakerJobSpec, build_training_job_request, submit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ops.launch_training", description=__doc__.splitlines()[0])
    p.add_argument("--stack", required=True, help="Pulumi stack name (dev, staging, prod)")
    p.add_argument("--target", required=True, choices=["eks", "sagemaker"])
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
    return p


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
    )
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
        return subprocess.run(cmd, input=manifest, text=True, check=False).returncode


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
    if args.dry_run:
        print(json.dumps(request, indent=2))
        return 0
    print(submit(request, region=outputs.get(out.REGION)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        outputs = load_outputs(args.stack, args.outputs)
        if args.target == "eks":
            return launch_eks(args, outputs)
        return launch_sagemaker(args, outputs)
    except (StackError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
