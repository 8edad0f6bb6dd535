"""The artifacts a stack serves, made by the steps we own (docs/first-deploy.md, steps 5-7):

    python -m ops.artifacts image-tag                                   # the tag for the current commit
    python -m ops.artifacts push-image --stack dev --image serving [--dry-run]
    python -m ops.artifacts upload-model --stack dev --model-dir DIR --name debug-llama [--dry-run]
    python -m ops.artifacts put-api-keys --stack dev --keys-file keys [--hash] [--dry-run]

A dry run needs no AWS account: the account id comes from `--account-id`, else from the stack's outputs (`--outputs
FILE` or `pulumi stack output`), else names are printed with `<ACCOUNT_ID>` in them. Exit status: 0 done, 1 a
command or AWS call failed, 2 usage or config (a bad flag, no model directory, no AWS credentials).

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


ACCOUNT_PLACEHOLDER = "<ACCOUNT_ID>"
EXIT_FAILED = 1
EXIT_USAGE = 2


def account_from_outputs(outputs: dict[str, Any]) -> str | None:
    """The account id inside an ARN or ECR URL the stack exports (`arn:aws:iam::<account>:role/...`)."""
    from infra import outputs as keys

    for key in (keys.TRAINING_ROLE_ARN, keys.SERVING_ROLE_ARN, keys.SAGEMAKER_EXECUTION_ROLE_ARN):
        arn = str(outputs.get(key) or "")
        parts = arn.split(":")
        if len(parts) > 4 and parts[4].isdigit():
            return parts[4]
    url = str(outputs.get(keys.SERVING_REPOSITORY_URL) or outputs.get(keys.TRAINING_REPOSITORY_URL) or "")
    head = url.split(".", 1)[0]
    return head if head.isdigit() else None


def _account_id(args: argparse.Namespace, err: TextIO) -> str:
    """--account-id; else, for a dry run, the stack outputs or a placeholder; else the caller's account (STS)."""
    if args.account_id:
        return args.account_id
    if args.dry_run:
        from ops.stack_outputs import StackError, load_outputs

        try:
            account = account_from_outputs(load_outputs(args.stack, args.outputs))
        except (StackError, OSError, ValueError) as exc:
            account, why = None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        else:
            why = "the stack outputs name no account"
        if account:
            return account
        print(f"note: account id unknown (stack outputs: {why}); pass --account-id to see real names", file=err)
        return ACCOUNT_PLACEHOLDER
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
        p.add_argument(
            "--account-id",
            help="default: the caller's account (sts get-caller-identity); a dry run reads the stack outputs",
        )
        p.add_argument("--outputs", help="dry run: JSON stack outputs (else `pulumi stack output`) for the account id")
        p.add_argument(
            "--dry-run", action="store_true", help="print what would happen, change nothing (needs no AWS account)"
        )
    args = parser.parse_args(argv)

    try:
        if args.command == "image-tag":
            print(image_tag(), file=out)
            return 0
        cfg = load_stack(args.stack)
        account = "" if args.command == "put-api-keys" else _account_id(args, err)  # the secret's name has none
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
            bucket = models_bucket_name(cfg, account)
            s3 = None if args.dry_run else _client("s3", cfg.region)
            upload_model(s3, bucket, args.model_dir, args.name, args.dry_run, out)
            print(f"then set {cfg.project}:servingModelPrefix: {args.name.strip('/')}", file=out)
        elif args.command == "put-api-keys":
            name = api_keys_secret_name(cfg)
            text = keys_file_text(args.keys_file, args.hash)
            if args.dry_run:
                count = len(text.splitlines())
                stored = "sha256 digests of" if args.hash else "the keys themselves for"
                print(f"would create or update secret {name} in {cfg.region} with {stored} {count} key(s)", file=out)
                return 0
            verb = put_api_keys(_client("secretsmanager", cfg.region), name, text)
            print(f"{verb} secret {name}; the next `pulumi up` copies it into the serving-api-keys Secret", file=out)
    except (ArtifactError, ConfigError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    except subprocess.CalledProcessError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_FAILED
    except Exception as exc:  # botocore's errors, without importing botocore for every command
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            print(
                f"error: no AWS credentials ({exc}): configure them, or add --dry-run to see what would happen",
                file=err,
            )
            return EXIT_USAGE
        if isinstance(exc, (BotoCoreError, ClientError)):
            print(f"error: {exc}", file=err)
            return EXIT_FAILED
        raise
    return 0


def _client(service: str, region: str) -> Any:
    import boto3

    return boto3.client(service, region_name=region)


if __name__ == "__main__":
    sys.exit(main())
