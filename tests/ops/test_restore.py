"""The restore drill on a real moto server: a model prefix is uploaded, deleted (or overwritten) and brought back by
`python -m ops.restore`, from object versions or from the replica, with identical SHA-256 checksums."""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from datetime import UTC, datetime

import boto3
import pytest

from ops import restore

PRIMARY_REGION, REPLICA_REGION = "us-east-1", "us-west-2"


def _bucket(s3, region: str) -> str:
    name = f"restore-{uuid.uuid4().hex[:12]}"
    kwargs = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    s3.create_bucket(Bucket=name, **kwargs)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def _upload_model(s3, bucket: str, prefix: str, seed: str) -> dict[str, str]:
    """A model directory's files (config, tokenizer, a multi-MiB weights file); their SHA-256 by key."""
    files = {
        "config.json": b'{"model_type": "llama", "seed": "%s"}' % seed.encode(),
        "tokenizer.json": os.urandom(4096),
        "model.safetensors": os.urandom(3 * 1024 * 1024),
    }
    digests = {}
    for name, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body)
        digests[f"{prefix}/{name}"] = hashlib.sha256(body).hexdigest()
    return digests


def _current(s3, bucket: str, prefix: str) -> dict[str, str]:
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            found[obj["Key"]] = hashlib.sha256(body).hexdigest()
    return found


def _delete_prefix(s3, bucket: str, prefix: str) -> None:
    keys = [{"Key": k} for k in _current(s3, bucket, prefix)]
    s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    assert _current(s3, bucket, prefix) == {}


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return restore.main(list(argv), out=out), out.getvalue()


@pytest.fixture
def s3(aws_env: str):
    return boto3.client("s3", region_name=PRIMARY_REGION)


def test_deleted_prefix_comes_back_from_versions_with_identical_checksums(s3) -> None:
    bucket = _bucket(s3, PRIMARY_REGION)
    model = _upload_model(s3, bucket, "llama-drill", "a")
    _upload_model(s3, bucket, "other-model", "b")  # a neighbour the restore must not touch
    _delete_prefix(s3, bucket, "llama-drill")

    code, dry = _run("--bucket", bucket, "--region", PRIMARY_REGION, "--prefix", "llama-drill/", "--dry-run")
    assert code == restore.EXIT_OK
    assert "plan: copy 3 object(s)" in dry and "dry run: nothing changed" in dry
    assert _current(s3, bucket, "llama-drill") == {}  # the dry run changed nothing

    code, text = _run("--bucket", bucket, "--region", PRIMARY_REGION, "--prefix", "llama-drill/")
    assert code == restore.EXIT_OK, text
    assert _current(s3, bucket, "llama-drill") == model
    assert text.count("sha256 matches") == 3 and "[3/3]" in text

    # A second run finds nothing left to do, and says so without failing.
    code, text = _run("--bucket", bucket, "--region", PRIMARY_REGION, "--prefix", "llama-drill/")
    assert code == restore.EXIT_OK and "nothing to restore" in text


def test_point_in_time_restores_the_versions_current_then_and_removes_later_keys(s3) -> None:
    bucket = _bucket(s3, PRIMARY_REGION)
    before = _upload_model(s3, bucket, "llama-pit", "v1")
    time.sleep(1.2)  # S3 LastModified has one-second resolution
    at = datetime.now(UTC)
    time.sleep(1.2)
    after = _upload_model(s3, bucket, "llama-pit", "v2")  # a bad export overwrote every file...
    s3.put_object(Bucket=bucket, Key="llama-pit/extra.bin", Body=b"added later")  # ...and added one
    assert _current(s3, bucket, "llama-pit") != before and set(after) <= set(_current(s3, bucket, "llama-pit"))

    code, text = _run("--bucket", bucket, "--prefix", "llama-pit/", "--at", at.isoformat())
    assert code == restore.EXIT_OK, text
    assert _current(s3, bucket, "llama-pit") == before
    assert "deleted llama-pit/extra.bin" in text

    # The restore itself is undoable: the overwritten versions are still in the history.
    versions = s3.list_object_versions(Bucket=bucket, Prefix="llama-pit/model.safetensors")["Versions"]
    assert len(versions) == 3


def test_prefix_comes_back_from_the_replica_when_the_primary_lost_it(s3) -> None:
    replica_s3 = boto3.client("s3", region_name=REPLICA_REGION)
    primary = _bucket(s3, PRIMARY_REGION)
    replica = _bucket(replica_s3, REPLICA_REGION)
    model = _upload_model(s3, primary, "llama-dr", "r")
    # moto does not run replication: copy each object the way S3 replication writes the replica (same key, bytes).
    for key in model:
        body = s3.get_object(Bucket=primary, Key=key)["Body"].read()
        replica_s3.put_object(Bucket=replica, Key=key, Body=body)
    # The primary loses the prefix with its whole history (a version-level delete, as a compromised role could do).
    for v in s3.list_object_versions(Bucket=primary, Prefix="llama-dr/").get("Versions", []):
        s3.delete_object(Bucket=primary, Key=v["Key"], VersionId=v["VersionId"])
    code, text = _run("--bucket", primary, "--prefix", "llama-dr/")
    assert code == restore.EXIT_FOUND and "nothing to restore" in text  # versions cannot help any more

    code, text = _run(
        "--bucket", primary, "--replica-bucket", replica, "--replica-region", REPLICA_REGION,
        "--prefix", "llama-dr/", "--source", "replica",
    )  # fmt: skip
    assert code == restore.EXIT_OK, text
    assert _current(s3, primary, "llama-dr") == model
    assert f"from replica s3://{replica} ({REPLICA_REGION})" in text


def test_stack_names_the_buckets_as_the_program_does(s3) -> None:
    """--stack derives `<prefix>-<kind>-<account>-<region>` (infra/storage.py) from the caller's account."""
    name = restore.primary_bucket_name("llmp-dev", "models", "123456789012", PRIMARY_REGION)
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    _upload_model(s3, name, "debug-llama", "s")
    _delete_prefix(s3, name, "debug-llama")
    code, text = _run("--stack", "dev", "--prefix", "debug-llama/", "--dry-run")
    assert code == restore.EXIT_OK, text
    assert f"s3://{name}/debug-llama/" in text
    code, _ = _run("--stack", "dev", "--prefix", "debug-llama/", "--source", "replica", "--dry-run")
    assert code == restore.EXIT_USAGE  # dev has no backupReplicaRegion


def test_bad_input_is_a_usage_error_without_traceback(s3, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("--bucket", "no-such-bucket-i23", "--prefix", "x/")[0] == restore.EXIT_USAGE
    assert "NoSuchBucket" in capsys.readouterr().err
    assert _run("--bucket", "b", "--prefix", "x/", "--at", "yesterday")[0] == restore.EXIT_USAGE
    assert "--at 'yesterday'" in capsys.readouterr().err
    assert _run("--bucket", "b", "--prefix", "/")[0] == restore.EXIT_USAGE
    assert _run("--stack", "nosuchstack", "--prefix", "x/")[0] == restore.EXIT_USAGE


def test_documented_commands_parse() -> None:
    """Every `python -m ops.restore` line of docs/operations.md and the README is a valid invocation."""
    import shlex

    from tests.helpers import DOCS_DIR

    lines = [
        line.split("#")[0].strip()
        for doc in (DOCS_DIR / "operations.md", DOCS_DIR.parent / "README.md")
        for line in doc.read_text().splitlines()
        if line.startswith("python -m ops.restore")
    ]
    assert len(lines) >= 7
    for line in lines:
        args = restore.parser().parse_args(shlex.split(line)[3:])
        assert args.stack == "prod" and args.prefix
        restore.parse_at(args.at)
