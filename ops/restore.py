"""Bring a model (or checkpoint) prefix back into the primary bucket, from its object versions or from the
cross-region replica (infra/backup.py); docs/operations.md, "Backup and restore", is the runbook.

    python -m ops.restore --stack prod --prefix llama-3.1-8b-instruct --dry-run
    python -m ops.restore --stack prod --prefix llama-3.1-8b-instruct                       # undelete from versions
    python -m ops.restore --stack prod --prefix llama-3.1-8b-instruct --at 2026-12-01T09:00:00Z
    python -m ops.restore --stack prod --prefix llama-3.1-8b-instruct --source replica
    python -m ops.restore --stack prod --kind checkpoints --prefix run-42/ --source replica --at 2026-12-01T09:00:00Z

From versions (the default): every key under the prefix gets the newest version that is not a delete marker, or with
`--at` the version that was current at that instant; keys created after `--at` get a delete marker (reversible, like
any delete in a versioned bucket). From the replica: every key under the prefix in the replica bucket (as of `--at`
when given) is copied into the primary bucket. A copy is a new current version: nothing in the history is lost, so a
restore can itself be undone with another restore. Each copied object is read back and its SHA-256 compared with the
source's (`--no-verify` skips that for very large prefixes).

`--dry-run` prints the plan and changes nothing; it makes only list calls, so read-only credentials suffice.
Exit codes: 0 restored (or, with --dry-run, planned); 1 nothing to restore under the prefix, or a restored object's
checksum differs from its source; 2 usage, configuration or access errors (unknown stack, missing bucket, no
credentials, a bad --at).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from infra.backup import REPLICATED_KINDS, replica_bucket_name
from infra.config import ConfigError, load_stack

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2
KINDS = ("models", "checkpoints", "datasets")


class RestoreError(RuntimeError):
    """An expected failure (exit 2): the message says what to fix."""


@dataclass(frozen=True)
class Target:
    """Where a restore reads from and writes to."""

    bucket: str
    """The primary bucket the prefix is restored into."""
    region: str
    source: Literal["versions", "replica"]
    replica_bucket: str = ""
    replica_region: str = ""


@dataclass(frozen=True)
class Step:
    """One key's restore: copy a source version over it, or delete a key that did not exist at --at."""

    key: str
    action: Literal["copy", "delete"]
    source_bucket: str = ""
    version_id: str | None = None
    size: int = 0
    last_modified: datetime | None = None


@dataclass
class Outcome:
    restored: int = 0
    deleted: int = 0
    bytes: int = 0
    mismatched: list[str] | None = None


def primary_bucket_name(name_prefix: str, kind: str, account_id: str, region: str) -> str:
    """The stack's data bucket of `kind` (infra/storage.py names them `<prefix>-<kind>-<account>-<region>`)."""
    return f"{name_prefix}-{kind}-{account_id}-{region}"


def _versions(s3: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Every version and delete marker under `prefix`, each with `IsDeleteMarker` set."""
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            yield {**v, "IsDeleteMarker": False}
        for m in page.get("DeleteMarkers", []):
            yield {**m, "IsDeleteMarker": True}


def _by_key(entries: Iterator[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Entries per key, newest first (S3's own order within a key, made explicit)."""
    keys: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        keys.setdefault(e["Key"], []).append(e)
    for history in keys.values():
        history.sort(key=lambda e: (e["LastModified"], e.get("IsLatest", False)), reverse=True)
    return keys


def _state_at(history: list[dict[str, Any]], at: datetime | None) -> dict[str, Any] | None:
    """The entry that was current at `at` (None: the key did not exist then). Without `at`: the newest version that is
    not a delete marker (an undelete)."""
    if at is None:
        return next((e for e in history if not e["IsDeleteMarker"]), None)
    entry = next((e for e in history if e["LastModified"] <= at), None)
    return None if entry is None or entry["IsDeleteMarker"] else entry


def plan_from_versions(s3: Any, bucket: str, prefix: str, at: datetime | None) -> list[Step]:
    steps = []
    for key, history in sorted(_by_key(_versions(s3, bucket, prefix)).items()):
        wanted = _state_at(history, at)
        current = history[0]
        if wanted is None:
            if at is not None and not current["IsDeleteMarker"]:
                steps.append(Step(key, "delete", last_modified=current["LastModified"]))
            continue
        if wanted is current:
            continue  # already what it should be
        steps.append(Step(key, "copy", bucket, wanted["VersionId"], wanted["Size"], wanted["LastModified"]))
    return steps


def plan_from_replica(replica: Any, bucket: str, prefix: str, at: datetime | None) -> list[Step]:
    steps = []
    for key, history in sorted(_by_key(_versions(replica, bucket, prefix)).items()):
        current = history[0]
        wanted = _state_at(history, at) if at is not None else (None if current["IsDeleteMarker"] else current)
        if wanted is not None:
            steps.append(Step(key, "copy", bucket, wanted["VersionId"], wanted["Size"], wanted["LastModified"]))
    return steps


def _sha256(s3: Any, bucket: str, key: str, version_id: str | None = None) -> str:
    args = {"Bucket": bucket, "Key": key, **({"VersionId": version_id} if version_id else {})}
    body = s3.get_object(**args)["Body"]
    digest = hashlib.sha256()
    for chunk in iter(lambda: body.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} TiB"


def apply(steps: list[Step], target: Target, s3: Any, source_s3: Any, verify: bool, out: TextIO) -> Outcome:
    """Carry out the plan, one line of progress per key."""
    outcome = Outcome(mismatched=[])
    for i, step in enumerate(steps, 1):
        where = f"[{i}/{len(steps)}]"
        if step.action == "delete":
            s3.delete_object(Bucket=target.bucket, Key=step.key)
            outcome.deleted += 1
            print(f"{where} deleted {step.key} (did not exist at the restore point; a delete marker)", file=out)
            continue
        source = {"Bucket": step.source_bucket, "Key": step.key, "VersionId": step.version_id}
        # The managed copy: CopyObject, or UploadPartCopy in parts for objects over 5 GiB (S3's CopyObject limit).
        s3.copy(source, target.bucket, step.key, SourceClient=source_s3)
        outcome.restored += 1
        outcome.bytes += step.size
        line = f"{where} restored {step.key} ({_size(step.size)}) from {step.source_bucket} version {step.version_id}"
        if verify:
            same = _sha256(source_s3, step.source_bucket, step.key, step.version_id) == _sha256(
                s3, target.bucket, step.key
            )
            line += ", sha256 matches" if same else ", SHA-256 DIFFERS"
            if not same:
                outcome.mismatched.append(step.key)
        print(line, file=out)
    return outcome


def parse_at(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RestoreError(f"--at {text!r}: not an ISO 8601 time such as 2026-12-01T09:00:00Z") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def resolve_target(args: argparse.Namespace) -> Target:
    """Bucket names as the program derives them from the stack config and account, unless given explicitly."""
    region = args.region
    replica_region = args.replica_region
    bucket, replica_bucket = args.bucket, args.replica_bucket
    if args.stack:
        try:
            cfg = load_stack(args.stack)
        except ConfigError as exc:
            raise RestoreError(str(exc)) from None
        region = region or cfg.region
        replica_region = replica_region or cfg.protection.backup_replica_region
        if not bucket or (args.source == "replica" and not replica_bucket):
            account = boto3.client("sts", region_name=region).get_caller_identity()["Account"]
            bucket = bucket or primary_bucket_name(cfg.name_prefix, args.kind, account, region)
            if args.source == "replica":
                if not replica_region:
                    raise RestoreError(
                        f"stack {args.stack} has no backupReplicaRegion: restore from versions (--source versions)"
                    )
                if args.kind not in REPLICATED_KINDS:
                    raise RestoreError(f"--kind {args.kind} is not replicated (only {', '.join(REPLICATED_KINDS)})")
                replica_bucket = replica_bucket or replica_bucket_name(
                    cfg.name_prefix, args.kind, account, replica_region
                )
    if not bucket:
        raise RestoreError("name the stack (--stack) or the bucket (--bucket)")
    if args.source == "replica" and not replica_bucket:
        raise RestoreError("--source replica needs --stack or --replica-bucket")
    region = region or boto3.session.Session().region_name or "us-east-1"
    return Target(bucket, region, args.source, replica_bucket or "", replica_region or region)


def restore(args: argparse.Namespace, out: TextIO) -> int:
    at = parse_at(args.at)
    target = resolve_target(args)
    s3 = boto3.client("s3", region_name=target.region)
    source_s3 = s3
    if target.source == "replica":
        source_s3 = boto3.client("s3", region_name=target.replica_region)
        steps = plan_from_replica(source_s3, target.replica_bucket, args.prefix, at)
        origin = f"replica s3://{target.replica_bucket} ({target.replica_region})"
    else:
        steps = plan_from_versions(s3, target.bucket, args.prefix, at)
        origin = f"object versions of s3://{target.bucket}"
    when = f"as of {at.isoformat()}" if at else "latest"
    print(f"restore s3://{target.bucket}/{args.prefix} from {origin}, {when}", file=out)
    if not steps:
        print("nothing to restore: no key under the prefix differs from the restore point", file=out)
        return EXIT_FOUND if not _prefix_known(s3, source_s3, target, args.prefix) else EXIT_OK
    copies = [s for s in steps if s.action == "copy"]
    deletes = [s for s in steps if s.action == "delete"]
    total = sum(s.size for s in copies)
    print(f"plan: copy {len(copies)} object(s) ({_size(total)}), delete {len(deletes)}", file=out)
    if args.dry_run:
        for s in steps:
            detail = f"version {s.version_id} of {s.last_modified:%Y-%m-%dT%H:%M:%SZ}" if s.action == "copy" else ""
            print(f"  would {s.action} {s.key} {detail}".rstrip(), file=out)
        print("dry run: nothing changed", file=out)
        return EXIT_OK
    outcome = apply(steps, target, s3, source_s3, args.verify, out)
    print(
        f"restored {outcome.restored} object(s) ({_size(outcome.bytes)}), deleted {outcome.deleted}"
        + (f"; {len(outcome.mismatched or [])} checksum mismatch(es)" if outcome.mismatched else ""),
        file=out,
    )
    return EXIT_FOUND if outcome.mismatched else EXIT_OK


def _prefix_known(s3: Any, source_s3: Any, target: Target, prefix: str) -> bool:
    """Whether the prefix has any history at all (an empty plan on a known prefix means: already restored)."""
    client, bucket = (source_s3, target.replica_bucket) if target.source == "replica" else (s3, target.bucket)
    page = client.list_object_versions(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return bool(page.get("Versions") or page.get("DeleteMarkers"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ops.restore", description=__doc__.split("\n\n")[0])
    p.add_argument("--stack", help="stack whose buckets to use (names derived as the program derives them)")
    p.add_argument("--kind", choices=KINDS, default="models", help="which data bucket (default: models)")
    p.add_argument("--prefix", required=True, help="key prefix to restore, e.g. llama-3.1-8b-instruct/")
    p.add_argument("--source", choices=("versions", "replica"), default="versions", help="where to restore from")
    p.add_argument("--at", help="restore the state as of this time (ISO 8601, UTC if no zone), not the latest")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing (list calls only)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the SHA-256 read-back")
    p.add_argument("--bucket", help="the primary bucket (instead of deriving it from --stack)")
    p.add_argument("--replica-bucket", help="the replica bucket (instead of deriving it from --stack)")
    p.add_argument("--region", help="the primary bucket's region (default: the stack's)")
    p.add_argument("--replica-region", help="the replica's region (default: the stack's backupReplicaRegion)")
    return p


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = parser().parse_args(argv)
    if not args.prefix.strip("/"):
        print("error: --prefix must name a prefix, not the whole bucket", file=sys.stderr)
        return EXIT_USAGE
    try:
        return restore(args, out)
    except RestoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except ClientError as exc:
        err = exc.response.get("Error", {})
        print(f"error: {exc.operation_name}: {err.get('Code')}: {err.get('Message')}", file=sys.stderr)
    except BotoCoreError as exc:  # no credentials, no region, endpoint unreachable
        print(f"error: {exc}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
