"""Storage behind one small protocol: a local directory or an S3 prefix.

The trainer never branches on "is this S3?" outside this module. S3 goes through boto3's default credential and
endpoint resolution, so the same code runs with Pod Identity on EKS, the execution role on SageMaker, and
`AWS_ENDPOINT_URL` pointing at a moto server in tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"not an S3 URI: {uri!r}")
    return bucket, key.strip("/")


class Storage(Protocol):
    """A tree of files addressed by '/'-separated relative paths under one root."""

    uri: str

    def exists(self, rel: str) -> bool: ...

    def read_text(self, rel: str) -> str: ...

    def write_text(self, rel: str, text: str) -> None: ...

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the immediate sub-directories of `rel`."""
        ...

    def upload_dir(self, local: Path, rel: str) -> None:
        """Copy every file under `local` to `rel` (merging with what is there)."""
        ...

    def download_dir(self, rel: str, local: Path) -> None: ...

    def delete_file(self, rel: str) -> None:
        """Delete one file; no error if it is absent."""
        ...

    def delete_dir(self, rel: str) -> None: ...

    # Binary files, for token shards (training/shards.py): whole-file writes that readers never see half done,
    # and ranged reads, so that a reader fetches the rows it needs and not the whole file.

    def upload_file(self, local: Path, rel: str) -> None:
        """Copy one local file to `rel`, atomically (a reader sees the whole file or none)."""
        ...

    def read_range(self, rel: str, start: int, length: int) -> bytes: ...

    def read_bytes(self, rel: str) -> bytes: ...

    def list_files(self, rel: str = "") -> list[str]:
        """Paths (relative to `rel`) of every file under `rel`, sorted."""
        ...

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        """Path (relative to `rel`, as `list_files` names it) -> size in bytes, for every file under `rel`, from the
        one listing (training/prepare.py balances its workers by input size)."""
        ...


class LocalStorage:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def _p(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def exists(self, rel: str) -> bool:
        return self._p(rel).exists()

    def read_text(self, rel: str) -> str:
        return self._p(rel).read_text(encoding="utf-8")

    def write_text(self, rel: str, text: str) -> None:
        path = self._p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: a reader (or a crash) never sees a half-written marker or state file.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)

    def list_dirs(self, rel: str = "") -> list[str]:
        path = self._p(rel)
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []

    def upload_dir(self, local: Path, rel: str) -> None:
        dest = self._p(rel)
        if dest.resolve() != local.resolve():
            shutil.copytree(local, dest, dirs_exist_ok=True)

    def download_dir(self, rel: str, local: Path) -> None:
        src = self._p(rel)
        if src.resolve() != local.resolve():
            shutil.copytree(src, local, dirs_exist_ok=True)

    def delete_file(self, rel: str) -> None:
        self._p(rel).unlink(missing_ok=True)

    def delete_dir(self, rel: str) -> None:
        shutil.rmtree(self._p(rel), ignore_errors=True)

    def upload_file(self, local: Path, rel: str) -> None:
        path = self._p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.copyfile(local, tmp)
        tmp.replace(path)

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        with open(self._p(rel), "rb") as f:
            return os.pread(f.fileno(), length, start)

    def read_bytes(self, rel: str) -> bytes:
        return self._p(rel).read_bytes()

    def list_files(self, rel: str = "") -> list[str]:
        return sorted(self.file_sizes(rel))

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        root = self._p(rel)
        if not root.is_dir():
            return {}
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


class S3Storage:
    def __init__(self, uri: str) -> None:
        import boto3

        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3(uri)
        self.client = boto3.client("s3")

    def _key(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    def _iter_objects(self, rel: str):
        """(key, size) of every object under `rel`: ListObjectsV2 returns each object's Size with its Key."""
        prefix = self._key(rel)
        prefix = prefix + "/" if prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"], int(obj["Size"])

    def _iter_keys(self, rel: str):
        for key, _ in self._iter_objects(rel):
            yield key

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read_text(self, rel: str) -> str:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read().decode("utf-8")

    def write_text(self, rel: str, text: str) -> None:
        # A single PUT is atomic in S3: readers see the whole object or none.
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=text.encode("utf-8"))

    def list_dirs(self, rel: str = "") -> list[str]:
        prefix = self._key(rel)
        prefix = prefix + "/" if prefix else ""
        names: set[str] = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/"
        ):
            for cp in page.get("CommonPrefixes", []):
                names.add(cp["Prefix"][len(prefix) :].rstrip("/"))
        return sorted(names)

    def upload_dir(self, local: Path, rel: str) -> None:
        # upload_file does multipart (and retries) for large shards; 8B-model shards are several GB.
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            self.client.upload_file(str(path), self.bucket, self._key(f"{rel}/{path.relative_to(local).as_posix()}"))

    def download_dir(self, rel: str, local: Path) -> None:
        base = self._key(rel) + "/"
        for key in self._iter_keys(rel):
            dest = local / key[len(base) :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, key, str(dest))

    def delete_file(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))

    def upload_file(self, local: Path, rel: str) -> None:
        # One PUT, or a multipart upload that becomes visible only when completed: atomic either way.
        self.client.upload_file(str(local), self.bucket, self._key(rel))

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        # HTTP range (RFC 9110 14.1.2: both ends inclusive).
        resp = self.client.get_object(
            Bucket=self.bucket, Key=self._key(rel), Range=f"bytes={start}-{start + length - 1}"
        )
        return resp["Body"].read()

    def read_bytes(self, rel: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()

    def list_files(self, rel: str = "") -> list[str]:
        return sorted(self.file_sizes(rel))

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        base = self._key(rel)
        base = base + "/" if base else ""
        return {k[len(base) :]: size for k, size in sorted(self._iter_objects(rel))}

    def delete_dir(self, rel: str) -> None:
        keys = list(self._iter_keys(rel))
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            )


def open_storage(uri: str) -> Storage:
    return S3Storage(uri) if is_s3(uri) else LocalStorage(uri)


def fetch(uri: str, cache_dir: Path, download: bool = True) -> Path:
    """A local path for `uri`: itself when local, else the S3 object or prefix downloaded under `cache_dir`.

    With `download=False`, only the path is computed: ranks on one node let local rank 0 download, wait at a
    barrier, then look up the same path, so they never write the same files concurrently.
    """
    if not is_s3(uri):
        return Path(uri)
    if not download:
        return cache_dir.joinpath(*split_s3(uri))
    import boto3
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    client = boto3.client("s3")
    dest = cache_dir / bucket / key
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError:
        # Not an object: treat the URI as a prefix ("directory"). A prefix with nothing under it leaves `dest`
        # missing, which the caller reports as a missing path.
        S3Storage(uri).download_dir("", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    client.download_file(bucket, key, str(dest))
    return dest


COMPLETE_MARKER = ".complete"


def fetch_dir_atomic(uri: str, dest: Path) -> Path:
    """Download the S3 prefix `uri` to `dest` so that `dest` exists only once every file is there.

    Files go to a `.partial-*` sibling first, then a marker, then one rename: a crash mid-download (a killed pod, a
    full disk, a network error) leaves no directory named `dest`, and the next attempt starts the partial over. A
    complete `dest` from an earlier attempt on this node is reused. Call from one process per node (local rank 0)
    and make the others wait on a barrier.
    """
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    try:
        S3Storage(uri).download_dir("", partial)
        if not partial.is_dir():
            partial.mkdir()  # an empty prefix: an empty (complete) directory, reported by the caller as "no model"
        (partial / COMPLETE_MARKER).write_text(uri, encoding="utf-8")
        shutil.rmtree(dest, ignore_errors=True)  # a leftover without the marker (from before this scheme)
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest
