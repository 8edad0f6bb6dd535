"""Resolve `--model` to a local directory: a local path as is, or an s3:// prefix downloaded to a cache."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("serving.model_source")


EXPORT_INFO = "llm-platform.json"
"""Written by the trainer's export (training/export.py): {"served_model_name": ...}."""


def named_by_export(cfg, model_dir: Path):  # (ServingConfig, Path) -> ServingConfig
    """Without --served-model-name, serve an exported model under the name its export recorded."""
    import dataclasses
    import json

    info = model_dir / EXPORT_INFO
    if cfg.served_model_name or not info.is_file():
        return cfg
    name = json.loads(info.read_text(encoding="utf-8")).get("served_model_name")
    if not isinstance(name, str) or not name:
        return cfg
    log.info("model %s: serving it as %r (recorded in %s)", cfg.model, name, EXPORT_INFO)
    return dataclasses.replace(cfg, served_model_name=name)


def resolve_model_dir(model: str, cache_dir: str) -> Path:
    if model.startswith("s3://"):
        return download_s3_prefix(model, Path(cache_dir))
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a Hugging Face model directory (no config.json)")
    return path


def download_s3_prefix(uri: str, cache_dir: Path) -> Path:
    """Download every object under the prefix; skip files already present with the same size.

    The cache key is a hash of the URI, so two models never share a directory. A `.complete` marker is written last:
    a pod killed mid-download re-downloads instead of loading a partial model.
    """
    import boto3  # imported here: the gateway and local models never need it

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    target = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]
    marker = target / ".complete"
    if marker.is_file():
        log.info("model %s already cached at %s", uri, target)
        return target
    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    paginator = s3.get_paginator("list_objects_v2")
    count = 0
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :].lstrip("/") if prefix else obj["Key"]
            if not rel or rel.endswith("/"):
                continue
            dest = target / rel
            if dest.resolve().is_relative_to(target.resolve()) is False:
                raise ValueError(f"refusing S3 key that escapes the cache directory: {obj['Key']}")
            if dest.is_file() and dest.stat().st_size == obj["Size"]:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(dest))
            count += 1
    if not (target / "config.json").is_file():
        raise FileNotFoundError(f"{uri} holds no config.json: not a Hugging Face model directory")
    marker.touch()
    log.info("downloaded %d files from %s to %s", count, uri, target)
    return target


def main(argv: list[str]) -> int:
    """`python -m serving.model_source <model> <cache-dir>` prints the local directory (for image entry scripts)."""
    if len(argv) != 2:
        print("usage: python -m serving.model_source <dir|s3://bucket/prefix> <cache-dir>", file=sys.stderr)
        return 2
    print(resolve_model_dir(argv[0], argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
