"""Prepared token shards: the format `python -m training.prepare` writes and the trainer streams.

Layout under the output location (a local directory or an s3:// prefix):

    manifest.json             written last: its presence means the dataset is complete (see `Manifest`)
    shards/shard-00000.bin    packed sequences, row after row, no header
    shards/shard-00000.json   the shard's sequence count, size and sha256 (written after the shard; a rerun skips
                              shards that have one)

A shard is a C-ordered array of shape [sequences, planes, seq_len + 1] of `dtype` (little-endian uint16 when the
vocabulary fits, else uint32): plane 0 holds a window of the packed token stream (inputs and shifted labels), plane
1, present only for chat data, its label mask (1: trained on). `numpy.memmap(path, dtype, mode="r").reshape(-1,
planes, seq_len + 1)` reads one. The manifest's shard table is the index: shard i holds global sequences
[first, first + sequences). Rows are fixed-size, so a sequence is one ranged read at a computed offset; no per-row
index file is needed (Megatron's .idx exists for variable-length documents, which packing removes).

Why not MDS (mosaicml-streaming 0.13): it pins torch 2.14 and transformers 4.x and pulls Azure, GCS, OCI and CUDA
wheels into a CPU image whose stack is pinned otherwise (checked with `pip install --dry-run`).

The trainer reads a manifest through `ShardedSequences`: each rank fetches only the rows its micro-batches need, in
blocks of rows (ranged GETs on S3) kept in a bounded local cache, so memory and start-up do not grow with the
dataset. The order and the loader state are `PackedLoader`'s, so a run from shards reads the same sequences in the
same order as a run from the raw data it was prepared from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data import DataError, document_separator
from training.storage import Storage, is_s3, open_storage

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
FORMAT = "llm-platform-packed-v1"
BLOCK_BYTES = 4 << 20
"""Bytes fetched per cache block (rounded down to whole rows, at least one): one ranged GET. Larger blocks waste
transfer on random access; smaller ones cost a request per few rows."""


def shard_name(index: int) -> str:
    return f"{SHARDS_DIR}/shard-{index:05d}.bin"


def is_manifest(path: str) -> bool:
    """Does `--data` point at a prepared dataset's manifest (rather than raw text/JSONL)?"""
    return path.rstrip("/").rsplit("/", 1)[-1] == MANIFEST


def token_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the token ids the trainer sees: the tokenizer's own definition (vocabulary, merges,
    normalizer, pre-tokenizer, added tokens), its chat template and the document separator packing uses. Runtime
    settings (padding, truncation) are left out: the trainer sets a pad token after loading."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("padding", None)
    definition.pop("truncation", None)
    identity = {
        "tokenizer": definition,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "separator": document_separator(tokenizer),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass
class ShardInfo:
    path: str
    first: int
    """Global index of the shard's first sequence."""
    sequences: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    seq_len: int
    planes: int
    """1: tokens only (plain text); 2: tokens and label mask (chat data, assistant-only loss)."""
    dtype: str
    tokenizer: dict[str, Any]
    """name (the --tokenizer given to prepare), sha256 (`tokenizer_fingerprint`), vocab_size, separator."""
    sequences: int
    tokens: int
    """Tokens in the packed stream (documents and separators), before cutting into windows."""
    documents: int
    source: str
    files: int
    validation: dict[str, Any]
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT

    @property
    def row_elems(self) -> int:
        return self.planes * (self.seq_len + 1)

    @property
    def row_bytes(self) -> int:
        return self.row_elems * np.dtype(self.dtype).itemsize

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise DataError(f"{where}: format {d.get('format')!r}, expected {FORMAT!r}")
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            return cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"{where} is not a prepared-data manifest: {e}") from None


def read_manifest(uri: str) -> tuple[Manifest, Storage]:
    """The manifest at `uri` (a local path or s3:// URI ending in manifest.json) and the storage of its dataset."""
    root = uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."
    store = open_storage(root)
    try:
        text = store.read_text(MANIFEST)
    except Exception as e:  # missing file or bucket, no credentials: all mean "no dataset there"
        raise DataError(f"cannot read the prepared-data manifest {uri}: {e}") from None
    return Manifest.from_json(text, uri), store


def check_tokenizer(manifest: Manifest, tokenizer: Any, model_path: str, data: str) -> None:
    """The trainer's tokenizer must be the one the shards were made with: other ids would train garbage, silently."""
    mine = tokenizer_fingerprint(tokenizer)
    if mine != manifest.tokenizer["sha256"]:
        raise DataError(
            f"tokenizer mismatch: {data} was prepared with tokenizer {manifest.tokenizer['name']!r} "
            f"(sha256 {manifest.tokenizer['sha256'][:12]}), but model {model_path!r} has tokenizer sha256 "
            f"{mine[:12]}: prepare the data again with --tokenizer {model_path}, or train the model it was made for"
        )


class _BlockCache:
    """Blocks of rows on local disk, least recently used evicted past `limit_bytes`. Thread-safe fetches: a micro-
    batch's missing blocks download in parallel."""

    def __init__(self, store: Storage, directory: Path, limit_bytes: int) -> None:
        self.store = store
        self.dir = directory
        self.limit = limit_bytes
        self.lru: OrderedDict[str, int] = OrderedDict()
        self.lock = threading.Lock()
        self.fetched_bytes = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in sorted(self.dir.iterdir()):  # blocks from an earlier start on this node are still good
            if p.name.startswith("."):
                p.unlink(missing_ok=True)
            else:
                self.lru[p.name] = p.stat().st_size

    def path(self, name: str) -> Path:
        return self.dir / name

    def ensure(self, wanted: dict[str, tuple[str, int, int]], pool: ThreadPoolExecutor) -> None:
        """Make every block in `wanted` (name -> (shard, offset, length)) local, then evict past the limit, never a
        wanted one."""
        with self.lock:
            missing = [name for name in wanted if name not in self.lru]
            for name in wanted:
                if name in self.lru:
                    self.lru.move_to_end(name)
        for name, size in zip(missing, pool.map(lambda n: self._download(n, *wanted[n]), missing), strict=True):
            with self.lock:
                self.lru[name] = size
                self.fetched_bytes += size
        with self.lock:
            total = sum(self.lru.values())
            for name in list(self.lru):
                if total <= self.limit:
                    break
                if name in wanted:
                    continue
                total -= self.lru.pop(name)
                self.path(name).unlink(missing_ok=True)

    def _download(self, name: str, shard: str, offset: int, length: int) -> int:
        data = self.store.read_range(shard, offset, length)
        if len(data) != length:
            raise DataError(f"{self.store.uri}/{shard}: short read at {offset} ({len(data)} of {length} bytes)")
        tmp = self.dir / f".{name}.{threading.get_ident()}"
        tmp.write_bytes(data)
        tmp.replace(self.path(name))  # a reader (or a crash) never sees half a block
        return length


class ShardedSequences:
    """The packed sequences of a prepared dataset, indexed like the in-memory tensor `PackedLoader` takes:
    `len()` and `seqs[index_tensor]` -> a long tensor [k, seq_len + 1] (or [k, 2, seq_len + 1] for chat data).

    A local dataset is read in place (a positioned read per row, so resident memory stays a micro-batch). An S3
    dataset is read in blocks of rows (`BLOCK_BYTES`) through a bounded cache under `cache_dir`: only the blocks
    holding this rank's rows are fetched, when first needed.
    """

    def __init__(self, manifest: Manifest, store: Storage, cache_dir: Path, cache_bytes: int) -> None:
        self.m = manifest
        self.store = store
        self.firsts = np.array([s.first for s in manifest.shards], dtype=np.int64)
        self.rows_per_block = max(1, BLOCK_BYTES // manifest.row_bytes)
        self.remote = is_s3(store.uri)
        if self.remote:
            limit = max(cache_bytes, 2 * self.rows_per_block * manifest.row_bytes)
            self.cache: _BlockCache | None = _BlockCache(store, cache_dir, limit)
            self.pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=8, thread_name_prefix="shards")
        else:
            self.cache, self.pool = None, None

    def __len__(self) -> int:
        return self.m.sequences

    def _locate(self, i: int) -> tuple[ShardInfo, int]:
        if not 0 <= i < self.m.sequences:
            raise IndexError(i)
        s = int(np.searchsorted(self.firsts, i, side="right")) - 1
        return self.m.shards[s], i - self.m.shards[s].first

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        rows = [self._locate(int(i)) for i in index.reshape(-1)]
        rb = self.m.row_bytes
        out = np.empty((len(rows), self.m.row_elems), dtype=self.m.dtype)
        if self.cache is None:
            for k, (shard, row) in enumerate(rows):
                out[k] = np.frombuffer(self.store.read_range(shard.path, row * rb, rb), dtype=self.m.dtype)
        else:
            assert self.pool is not None
            wanted: dict[str, tuple[str, int, int]] = {}
            where: list[tuple[str, int]] = []
            for shard, row in rows:
                block = row // self.rows_per_block
                start = block * self.rows_per_block
                n = min(self.rows_per_block, shard.sequences - start)
                name = f"{Path(shard.path).stem}.{block:06d}"
                wanted[name] = (shard.path, start * rb, n * rb)
                where.append((name, (row - start) * rb))
            self.cache.ensure(wanted, self.pool)
            for k, (name, offset) in enumerate(where):
                with open(self.cache.path(name), "rb") as f:
                    out[k] = np.frombuffer(os.pread(f.fileno(), rb, offset), dtype=self.m.dtype)
        shape = (len(rows), self.m.seq_len + 1) if self.m.planes == 1 else (len(rows), 2, self.m.seq_len + 1)
        return torch.from_numpy(out.astype(np.int64)).reshape(shape)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)


def open_prepared(uri: str, scratch: Path, rank: int, cache_mb: int) -> tuple[Manifest, ShardedSequences]:
    """The prepared dataset at `uri` for this rank: its manifest and its sequences, cached under `scratch`."""
    manifest, store = read_manifest(uri)
    digest = hashlib.sha256(manifest.to_json().encode()).hexdigest()[:16]
    # One cache per rank: ranks read different rows, and no two processes write one block file.
    cache_dir = scratch / "data-cache" / digest / f"rank-{rank}"
    return manifest, ShardedSequences(manifest, store, cache_dir, cache_mb << 20)


def load_tokenizer(path: str, cache_dir: Path) -> Any:
    """The tokenizer of model `path` (a local or s3:// Hugging Face directory, or "debug") without its weights:
    preparing data for an 8B model downloads a few MB, not 16 GB."""
    from training.config import DEBUG_MODEL

    if path == DEBUG_MODEL:
        from training.debug_model import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    local = Path(path)
    if is_s3(path):
        store = open_storage(path)
        local = cache_dir / "tokenizer" / hashlib.sha256(path.encode()).hexdigest()[:16]
        shutil.rmtree(local, ignore_errors=True)
        weights = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
        for rel in store.list_files():
            if "/" not in rel and not rel.endswith(weights):
                dest = local / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(store.read_bytes(rel))
    if not (local / "tokenizer_config.json").is_file() and not (local / "tokenizer.json").is_file():
        raise DataError(f"--tokenizer {path}: no tokenizer.json or tokenizer_config.json there")
    return AutoTokenizer.from_pretrained(local)


class PreparedData:
    """`--data .../manifest.json` in the trainer: the manifest checked against the config before the model loads,
    and the sequences, once the tokenizer is known to be the one they were made with."""

    def __init__(self, uri: str, seq_len: int, scratch: Path, rank: int, cache_mb: int) -> None:
        self.uri = uri
        self.manifest, self.sequences = open_prepared(uri, scratch, rank, cache_mb)
        if self.manifest.seq_len != seq_len:
            raise DataError(
                f"{uri} was prepared with seq_len {self.manifest.seq_len}, the run has data.seq_len={seq_len}: "
                f"pass --set data.seq_len={self.manifest.seq_len} (or prepare again with --seq-len {seq_len})"
            )

    def describe(self) -> str:
        m = self.manifest
        return f"{m.sequences} prepared sequences ({m.tokens} tokens, {len(m.shards)} shards) from {self.uri}"

    def for_tokenizer(self, tokenizer: Any, model_path: str) -> ShardedSequences:
        check_tokenizer(self.manifest, tokenizer, model_path, self.uri)
        return self.sequences
