"""The artifacts a stack serves, made by the steps we own (docs/first-deploy.md, steps 5-7):

    python -m ops.artifacts image-tag                                   # the tag for the current commit
    python -m ops.artifacts push-image --stack dev --image serving [--dry-run]
    python -m ops.artifacts upload-model --stack dev --model-dir DIR --name debug-llama [--dry-run]
    python -m ops.artifacts put-api-keys --stack dev --keys-file keys [--hash]

Names come from the stack config the same way the program derives them (infra/preflight.py), so what these commands
write is exactly what the preview-time checks look for. `make push-image` / `make upload-model` wrap the first two.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO

from infra.config import REPO_ROOT, ConfigError, StackConfig, load_stack
from infra.preflight import MODEL_MARKER, api_keys_secret_name, models_bucket_name

IMAGES = {
    "serving": "containers/serving.Dockerfile",
    "serving-vllm": "containers/serving-vllm.Dockerfile",
    "training": "containers/training.Dockerfile",
}
"""Image name -> Dockerfile. The vLLM gateway image goes to the serving repository with a `-vllm` tag suffix."""


class ArtifactError(RuntimeError):
    pass


def image_tag(repo: Path = REPO_ROOT) -> str:
    """An immutable tag for the checked-out commit: `git-<12 hex>`. Refuses a dirty tree: the image would not be
    reproducible from the tag, and ECR tags are immutable (a rebuild could never replace it)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()

    if git("status", "--porcelain", "--untracked-files=no"):
        raise ArtifactError("the working tree has uncommitted changes: commit them first (the tag names a commit)")
    return f"git-{git('rev-parse', '--short=12', 'HEAD')}"


def registry(account_id: str, region: str) -> str:
    return f"{account_id}.dkr.ecr.{region}.amazonaws.com"


def repository_url(cfg: StackConfig, account_id: str, image: str) -> str:
    """infra/registry.py names repositories `<prefix>/<image>`; the vLLM gateway shares the serving repository."""
    repo = "serving" if image == "serving-vllm" else image
    return f"{registry(account_id, cfg.region)}/{cfg.name_prefix}/{repo}"


def push_commands(cfg: StackConfig, account_id: str, image: str, tag: str) -> list[list[str]]:
    """The commands that build and push `image` for the stack (docker and the AWS CLI)."""
    if image == "serving-vllm":
        tag = f"{tag}-vllm"
    ref = f"{repository_url(cfg, account_id, image)}:{tag}"
    return [
        ["sh", "-c", f"aws ecr get-login-password --region {cfg.region} | docker login --username AWS "
         f"--password-stdin {registry(account_id, cfg.region)}"],
        ["docker", "build", "--platform", "linux/amd64", "-f", IMAGES[image], "-t", ref, "."],
        ["docker", "push", ref],
    ]  # fmt: skip


def model_files(model_dir: Path) -> list[Path]:
    if not (model_dir / MODEL_MARKER).is_file():
        raise ArtifactError(f"{model_dir} is not a model directory (no {MODEL_MARKER}; export one: docs/training.md)")
    return sorted(p for p in model_dir.rglob("*") if p.is_file())


def upload_model(s3: Any, bucket: str, model_dir: Path, name: str, dry_run: bool, out: TextIO) -> list[str]:
    """Upload a model directory to `s3://<bucket>/<name>/`, the layout the serving paths read. Returns the keys."""
    keys = []
    for path in model_files(model_dir):
        key = f"{name.strip('/')}/{path.relative_to(model_dir).as_posix()}"
        keys.append(key)
        print(f"{'would upload' if dry_run else 'upload'} {path} -> s3://{bucket}/{key}", file=out)
        if not dry_run:
            s3.upload_file(str(path), bucket, key)  # the bucket's default encryption (SSE-KMS) applies
    return keys


def keys_file_text(path: Path, hash_keys: bool) -> str:
    """The keys file (docs/serving.md: `<key-id> <key> [rpm=N] [tpm=N]` per line), optionally with every key replaced
    by its `sha256:` digest, which the server accepts: then neither Secrets Manager nor Pulumi state holds a usable
    key."""
    lines = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 2:
            raise ArtifactError(f"{path} line {lineno}: expected '<key-id> <key> [rpm=N] [tpm=N]'")
        if hash_keys and not parts[1].startswith("sha256:"):
            parts[1] = "sha256:" + hashlib.sha256(parts[1].encode()).hexdigest()
        lines.append(" ".join(parts))
    if not lines:
        raise ArtifactError(f"{path} holds no key")
    return "\n".join(lines) + "\n"


def put_api_keys(secrets: Any, name: str, text: str) -> str:
    """Create the stack's keys secret, or add a new version to it. Returns 'created' or 'updated'."""
    try:
        secrets.create_secret(Name=name, SecretString=text, Description="llm-platform serving API keys")
        return "created"
    except secrets.exceptions.ResourceExistsException:
        secrets.put_secret_value(SecretId=name, SecretString=text)
        return "updated"


def _account_id(args: argparse.Namespace) -> str:
    if args.account_id:
        return args.account_id
    import boto3

    return boto3.client("sts").get_caller_identity()["Account"]


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.artifacts", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("image-tag", help="print the image tag for the checked-out commit")
    push = sub.add_parser("push-image", help="build and push an image to the stack's ECR repository")
    push.add_argument("--image", choices=sorted(IMAGES), default="serving")
    model = sub.add_parser("upload-model", help="upload a model directory to the stack's models bucket")
    model.add_argument("--model-dir", type=Path, required=True)
    model.add_argument("--name", required=True, help="key prefix: the servingModelPrefix to set")
    keys = sub.add_parser("put-api-keys", help="store the serving keys file in the stack's Secrets Manager secret")
    keys.add_argument("--keys-file", type=Path, required=True)
    keys.add_argument("--hash", action="store_true", help="store sha256 digests instead of the keys")
    for p in (push, model, keys):
        p.add_argument("--stack", required=True)
        p.add_argument("--account-id", help="default: the caller's account (sts get-caller-identity)")
    for p in (push, model):
        p.add_argument("--dry-run", action="store_true", help="print what would happen, change nothing")
    args = parser.parse_args(argv)

    try:
        if args.command == "image-tag":
            print(image_tag(), file=out)
            return 0
        cfg = load_stack(args.stack)
        account = _account_id(args)
        if args.command == "push-image":
            tag = image_tag()
            for cmd in push_commands(cfg, account, args.image, tag):
                print(("would run: " if args.dry_run else "+ ") + shlex.join(cmd), file=out)
                if not args.dry_run:
                    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
            if args.image == "serving":
                print(f"then set {cfg.project}:servingImageTag: {tag} in stacks/Pulumi.{cfg.stack}.yaml", file=out)
            else:
                print(f"image: {push_commands(cfg, account, args.image, tag)[-1][-1]}", file=out)
        elif args.command == "upload-model":
            import boto3

            bucket = models_bucket_name(cfg, account)
            upload_model(
                boto3.client("s3", region_name=cfg.region), bucket, args.model_dir, args.name, args.dry_run, out
            )
            print(f"then set {cfg.project}:servingModelPrefix: {args.name.strip('/')}", file=out)
        elif args.command == "put-api-keys":
            import boto3

            name = api_keys_secret_name(cfg)
            client = boto3.client("secretsmanager", region_name=cfg.region)
            verb = put_api_keys(client, name, keys_file_text(args.keys_file, args.hash))
            print(f"{verb} secret {name}; the next `pulumi up` copies it into the serving-api-keys Secret", file=out)
    except (ArtifactError, ConfigError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
