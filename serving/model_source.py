"""Resolve `--model` to a local directory: a local path as is, or an s3:// prefix downloaded to a private cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import sys
from pathlib import Path

log = logging.getLogger("serving.model_source")


MANIFEST = ".llm-serving-manifest.json"  # local record of a complete download; never a name taken from S3


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/llm-serving/models or ~/.cache/llm-serving/models: per user, not a predictable path under a
    world-writable /tmp where another local user could plant a model directory first."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-serving" / "models"


def private_dir(path: Path) -> Path:
    """Create (0700) or check a directory only this user can write: a cache another user can write to is a cache
    they can put a model (code, via custom model classes; or weights) into."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"model cache {path} is not a directory")
    if st.st_uid != os.getuid():
        raise ValueError(f"model cache {path} is owned by uid {st.st_uid}, not this user ({os.getuid()})")
    if st.st_mode & 0o022:
        raise ValueError(f"model cache {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); use 0700")
    return path


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
    """A local Hugging Face model directory for `model`: the path itself, or an s3:// prefix downloaded to the cache."""
    if model.startswith("s3://"):
        return download_s3_prefix(model, Path(cache_dir) if cache_dir else default_cache_dir())
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a Hugging Face model directory (no config.json)")
    return path


def _relative_key(key: str, prefix: str) -> str | None:
    """The key's path below the prefix, or None for keys that are not plain files below it."""
    rel = key[len(prefix) :].lstrip("/") if prefix else key
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        return None  # directory markers (`x/`), `prefix/.`, `a//b`, `..`: never files of the model
    if parts[-1] == MANIFEST:
        return None
    return rel


def download_s3_prefix(uri: str, cache_dir: Path) -> Path:
    """Download every object under the prefix into a private cache; skip files the local manifest says are current.

    Completeness is recorded locally, never trusted from S3: after every file is in place, a manifest of the S3
    listing (key -> size, ETag) is written last, in the cache directory. At the next start the listing is compared
    with it: a pod killed mid-download, or a model changed in S3, downloads again what differs.
    """
    import boto3  # imported here: the gateway and local models never need it

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    root = private_dir(cache_dir)
    target = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target.mkdir(mode=0o700, exist_ok=True)
    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    listing: dict[str, dict[str, object]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for obj in page.get("Contents", []):
            rel = _relative_key(obj["Key"], prefix)
            if rel is not None:
                listing[rel] = {"key": obj["Key"], "size": obj["Size"], "etag": obj.get("ETag", "")}
    if "config.json" not in listing:
        raise FileNotFoundError(f"{uri} holds no config.json: not a Hugging Face model directory")
    manifest_path = target / MANIFEST
    try:
        recorded = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        recorded = {}
    count = 0
    for rel, meta in sorted(listing.items()):
        dest = target / rel
        if not dest.resolve().is_relative_to(target.resolve()) or dest.resolve() == target.resolve():
            raise ValueError(f"refusing S3 key that escapes the cache directory: {meta['key']}")
        if recorded.get(rel) == meta and dest.is_file() and dest.stat().st_size == meta["size"]:
            continue
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        s3.download_file(bucket, str(meta["key"]), str(dest))
        count += 1
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(listing, sort_keys=True))
    tmp.replace(manifest_path)  # atomic: the manifest exists only once every file does
    log.info("model %s: downloaded %d of %d files to %s", uri, count, len(listing), target)
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
