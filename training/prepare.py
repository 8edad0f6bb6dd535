"""`python -m training.prepare`: tokenize and pack a corpus once, on many workers, into token shards.

    python -m training.prepare --data s3://datasets/corpora/c4 --tokenizer s3://models/base/llama-3.2-1b \\
        --out s3://datasets/prepared/c4-llama32-4096 --seq-len 4096 --workers 8
    python -m training --model s3://models/base/llama-3.2-1b --set data.seq_len=4096 \\
        --data s3://datasets/prepared/c4-llama32-4096/manifest.json --output s3://checkpoints/run1

The rules are the trainer's own (training/data.py: document separator, chat templates, assistant-only loss mask),
called, not copied, so a run from the shards reads exactly the sequences a run from the raw data would.

Two phases, both split across workers, so that any number of workers writes the same bytes (which worker does a
file or shard changes nothing in it):
1. tokenize: input file i (in sorted order) is tokenized by one worker into `parts/part-<i>.bin` (the file's token
   stream, documents and separators) and, last, `parts/part-<i>.json` (its token count and data report);
2. pack: with every part done, the global stream (parts in file order) is cut into windows exactly as `pack` cuts
   the whole dataset's stream; shard k holds windows [k*S, (k+1)*S) (S from --shard-mb). Then worker 0 writes
   manifest.json and removes the parts.
Every file is written whole (rename, or one S3 PUT/multipart upload) and its .json after it, so a rerun skips what
is complete and a crash costs only the file in flight.
- One machine: `--workers W` starts W processes; the parent hands the files out largest first (by bytes), each to
  whichever worker is free, then the shards likewise.
- A cluster: each pod runs `--workers W --worker-index I` (JOB_COMPLETION_INDEX on a Kubernetes Indexed Job) and
  waits for the others through the output location. Pods share only storage, so each computes the same split from
  the listing's sizes: longest processing time first (files by decreasing size, each to the worker with the fewest
  bytes so far, ties to the lowest index; `balanced_assignment`); shard k goes to worker k % W (shards are equal).
- SageMaker Processing with ShardedByS3Key: `--local-input DIR` names the files SageMaker copied to this instance:
  the worker tokenizes those (and only those).

Data validation: bad JSON lines, records of the wrong shape, chat messages with unknown roles ("usr") and empty
documents are skipped, counted and reported as file:line. More than --max-bad-fraction of the records (default 0)
fails the job before any shard is written.

Exit status: 0 done (or already complete), 2 bad input: unreadable data, a bad flag, too much bad data, or an
output location holding a preparation with other settings.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data import (
    JSONL_SUFFIXES,
    TEXT_SUFFIXES,
    DataError,
    Document,
    cut_windows,
    document_separator,
    document_stream,
    file_documents,
    is_empty,
    tokenize_documents,
)
from training.shards import (
    MANIFEST,
    Manifest,
    ShardInfo,
    load_tokenizer,
    shard_name,
    token_dtype,
    tokenizer_fingerprint,
)
from training.storage import Storage, is_s3, open_storage

EXIT_BAD_INPUT = 2
PARTS_DIR = "parts"
SETTINGS = "prepare.json"
CHUNK_DOCS = 1024
"""Documents tokenized per call: bounds a worker's memory whatever the file size."""
REPORTED_PROBLEMS = 100
"""Problems listed in the manifest and on stderr (all are counted)."""
POLL_S = 2.0
SAGEMAKER_RESOURCE_CONFIG = Path("/opt/ml/config/resourceconfig.json")
"""Where SageMaker Processing names this instance (current_host) and all of them (hosts)."""


@dataclass
class Job:
    data: str
    tokenizer: str
    out: str
    seq_len: int
    shard_mb: int = 64
    text_field: str = "text"
    max_bad_fraction: float = 0.0
    workers: int = 1
    worker_index: int | None = None
    """Set (with `workers`) when this process is one worker of a cluster job; None: run all `workers` here."""
    local_input: str = ""
    wait_timeout_s: float = 24 * 3600

    def settings(self, fingerprint: str) -> dict[str, Any]:
        """What decides the output's bytes (not the worker count): a rerun into the same --out must agree."""
        return {
            "data": self.data,
            "tokenizer_sha256": fingerprint,
            "seq_len": self.seq_len,
            "shard_mb": self.shard_mb,
            "text_field": self.text_field,
        }


@dataclass
class PartStats:
    """What phase 1 learned about one input file (parts/part-<i>.json)."""

    source: str
    tokens: int = 0
    documents: int = 0
    records: int = 0
    bad: int = 0
    empty: int = 0
    chat: bool = False
    mask: bool = False
    problems: list[str] = field(default_factory=list)


def part_name(i: int, ext: str) -> str:
    return f"{PARTS_DIR}/part-{i:05d}.{ext}"


# -- inputs ------------------------------------------------------------------------------------------------------


def list_inputs(data: str) -> list[tuple[str, int]]:
    """(relative path, size in bytes) of the input files under `data` (a file, directory or s3:// prefix), sorted by
    path: the global order of the corpus, the same in every worker. The sizes come from the same listing (a stat, or
    the Size S3's ListObjectsV2 returns with each key) and decide only which worker tokenizes which file."""
    suffixes = TEXT_SUFFIXES | JSONL_SUFFIXES
    if is_s3(data):
        files = {rel: n for rel, n in open_storage(data).file_sizes().items() if Path(rel).suffix in suffixes}
        if not files:  # an object, not a prefix
            parent, name = data.rstrip("/").rsplit("/", 1)
            if open_storage(parent).exists(name):
                return [(name, 0)]  # one file is the whole job: its size decides nothing
    else:
        path = Path(data)
        if path.is_file():
            return [(path.name, path.stat().st_size)]
        if not path.is_dir():
            raise DataError(f"--data {data} does not exist")
        files = {rel: n for rel, n in open_storage(data).file_sizes().items() if Path(rel).suffix in suffixes}
    if not files:
        raise DataError(f"no .txt or .jsonl files under {data}")
    return sorted(files.items())


def largest_first(sizes: Sequence[int]) -> list[int]:
    """File indices by size, largest first (ties in file order): the order work is handed out in."""
    return sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))


def balanced_assignment(sizes: Sequence[int], workers: int) -> list[list[int]]:
    """Each worker's files (indices, largest first) for a cluster job, whose workers share only storage: longest
    processing time first, i.e. files by (-size, index), each to the worker with the fewest bytes so far (ties to the
    lowest worker index). A pure function of the listing, so every worker computes the same split; tokenizing time
    grows with a file's bytes, so no worker gets, say, all the JSONL files as `i % W` could give it."""
    loads = [(0, w) for w in range(workers)]  # a heap of (bytes so far, worker): the least loaded, lowest index first
    shares: list[list[int]] = [[] for _ in range(workers)]
    for i in largest_first(sizes):
        load, w = heapq.heappop(loads)
        shares[w].append(i)
        heapq.heappush(loads, (load + sizes[i], w))
    return shares


def _source_root(data: str) -> Storage:
    if is_s3(data):
        prefix = open_storage(data)
        if prefix.list_files():
            return prefix
        return open_storage(data.rstrip("/").rsplit("/", 1)[0])
    path = Path(data)
    return open_storage(str(path.parent if path.is_file() else path))


# -- phase 1: tokenize one file -------------------------------------------------------------------------------------


def tokenize_file(job: Job, tokenizer: Any, i: int, rel: str, source: Storage, out: Storage, tmp: Path) -> None:
    """Input file `rel` -> parts/part-<i>.bin (uint32 tokens, then uint8 label mask if it has chats) and .json."""
    if job.local_input:
        local = Path(job.local_input) / rel
    elif is_s3(source.uri):
        local = tmp / f"src-{i}{Path(rel).suffix}"
        local.write_bytes(source.read_bytes(rel))
    else:
        local = Path(source.uri) / rel
    separator = document_separator(tokenizer)
    stats = PartStats(source=rel)
    tokens_path, mask_path = tmp / f"part-{i}.tok", tmp / f"part-{i}.mask"
    with open(tokens_path, "wb") as tok_f, open(mask_path, "wb") as mask_f:
        chunk: list[Document] = []

        def flush() -> None:
            ids, masks = tokenize_documents(tokenizer, chunk)
            stream, trained = document_stream(ids, separator, masks)
            np.asarray(stream, dtype="<u4").tofile(tok_f)
            np.asarray(trained, dtype=np.uint8).tofile(mask_f)
            stats.tokens += len(stream)
            chunk.clear()

        for lineno, doc in file_documents(local, job.text_field):
            stats.records += 1
            if isinstance(doc, DataError):
                stats.bad += 1
                _note(stats, f"{rel}:{lineno}: {str(doc).split(': ', 1)[-1]}")
                continue
            if is_empty(doc):
                if local.suffix in JSONL_SUFFIXES:  # blank paragraphs of a .txt are formatting, not records
                    stats.empty += 1
                    _note(stats, f"{rel}:{lineno}: empty document")
                else:
                    stats.records -= 1
                continue
            stats.documents += 1
            stats.chat = stats.chat or isinstance(doc, list)
            chunk.append(doc)
            if len(chunk) >= CHUNK_DOCS:
                flush()
        if chunk:
            flush()
    # A file of plain text trains on every token: its mask is implied, not stored.
    stats.mask = stats.chat
    if stats.mask:
        with open(tokens_path, "ab") as f, open(mask_path, "rb") as m:
            f.write(m.read())
    out.upload_file(tokens_path, part_name(i, "bin"))
    out.write_text(part_name(i, "json"), json.dumps(stats.__dict__, sort_keys=True))
    tokens_path.unlink()
    mask_path.unlink()


def _note(stats: PartStats, problem: str) -> None:
    if len(stats.problems) < REPORTED_PROBLEMS:
        stats.problems.append(problem)


# -- phase 2: pack the global stream into shards -------------------------------------------------------------------


@dataclass
class Plan:
    """The packing, computed identically by every worker from the parts' stats."""

    parts: list[PartStats]
    seq_len: int
    rows_per_shard: int
    dtype: str

    @property
    def chat(self) -> bool:
        return any(p.chat for p in self.parts)

    @property
    def planes(self) -> int:
        return 2 if self.chat else 1

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.parts)

    @property
    def windows(self) -> int:
        return max(0, (self.tokens - 1) // self.seq_len)

    @property
    def shards(self) -> int:
        return -(-self.windows // self.rows_per_shard)

    def stream_slice(self, out: Storage, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [start, stop) of the global stream and their label mask, read from the parts."""
        tokens, masks = [], []
        offset = 0
        for i, p in enumerate(self.parts):
            lo, hi = max(start, offset), min(stop, offset + p.tokens)
            if lo < hi:
                raw = out.read_range(part_name(i, "bin"), (lo - offset) * 4, (hi - lo) * 4)
                tokens.append(np.frombuffer(raw, dtype="<u4"))
                if p.mask:
                    m = out.read_range(part_name(i, "bin"), p.tokens * 4 + (lo - offset), hi - lo)
                    masks.append(np.frombuffer(m, dtype=np.uint8))
                else:
                    masks.append(np.ones(hi - lo, dtype=np.uint8))
            offset += p.tokens
        return (
            torch.from_numpy(np.concatenate(tokens).astype(np.int64)),
            torch.from_numpy(np.concatenate(masks).astype(np.int64)),
        )


def write_shard(plan: Plan, k: int, out: Storage, tmp: Path) -> None:
    """Shard k: windows [k*S, (k+1)*S) of the global stream (cut as training.data.pack cuts the whole stream)."""
    first_window = k * plan.rows_per_shard
    n = min(plan.rows_per_shard, plan.windows - first_window)
    # Window j is tokens [j*L, j*L + L + 1): a slice starting at a window boundary cuts into the same windows.
    tokens, trained = plan.stream_slice(out, first_window * plan.seq_len, (first_window + n) * plan.seq_len + 1)
    rows = cut_windows(tokens, trained if plan.chat else None, plan.seq_len)
    array = rows.numpy().astype(plan.dtype)
    local = tmp / f"shard-{k}.bin"
    array.tofile(local)
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    out.upload_file(local, shard_name(k))
    info = {"sequences": int(array.shape[0]), "bytes": local.stat().st_size, "sha256": digest}
    out.write_text(shard_name(k).replace(".bin", ".json"), json.dumps(info, sort_keys=True))
    local.unlink()


# -- the job ---------------------------------------------------------------------------------------------------------


def run_worker(job: Job, index: int, tokenizer: Any = None) -> Plan:
    """One worker of a cluster job (or the only worker): its files, then (once all parts are done) its shards; the
    plan every worker computed from the parts."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker, one core: parallelism is the workers'
    out = open_storage(job.out)
    inputs = list_inputs(job.data)
    sources = [rel for rel, _ in inputs]
    tokenizer = tokenizer or load_tokenizer(job.tokenizer, Path(tempfile.gettempdir()) / "llm-prepare")
    source = _source_root(job.data)
    if job.local_input:
        # SageMaker's ShardedByS3Key chose this instance's files (by S3 key); they keep their place in the order.
        mine = [i for i, rel in enumerate(sources) if (Path(job.local_input) / rel).is_file()]
    else:
        mine = balanced_assignment([n for _, n in inputs], job.workers)[index]
    with tempfile.TemporaryDirectory(prefix="prepare-") as tmp:
        for i in mine:
            if not out.exists(part_name(i, "json")):
                tokenize_file(job, tokenizer, i, sources[i], source, out, Path(tmp))
        parts = wait_for(out, [part_name(i, "json") for i in range(len(sources))], job.wait_timeout_s)
        plan = make_plan(job, tokenizer, [PartStats(**json.loads(t)) for t in parts])
        check_quality(job, plan)
        for k in range(index, plan.shards, job.workers):
            if not out.exists(shard_name(k).replace(".bin", ".json")):
                write_shard(plan, k, out, Path(tmp))
    return plan


# -- W processes on this machine: files and shards handed out to whichever worker is free -------------------------

_inherited_tokenizer: Any = None
"""The parent's tokenizer, which forked workers inherit instead of loading their own."""
_pool_state: dict[str, Any] = {}
"""A pool worker's job, tokenizer, storages and plan (set once per process by `_pool_init`)."""


def _pool_init(job: Job, source_uri: str, plan: Plan | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker, one core: parallelism is the workers'
    tokenizer = _inherited_tokenizer or load_tokenizer(job.tokenizer, Path(tempfile.gettempdir()) / "llm-prepare")
    _pool_state.update(
        job=job, tokenizer=tokenizer, source=open_storage(source_uri), out=open_storage(job.out), plan=plan
    )


def _tokenize_task(task: tuple[int, str]) -> int:
    i, rel = task
    st = _pool_state
    with tempfile.TemporaryDirectory(prefix="prepare-") as tmp:
        tokenize_file(st["job"], st["tokenizer"], i, rel, st["source"], st["out"], Path(tmp))
    return i


def _shard_task(k: int) -> int:
    with tempfile.TemporaryDirectory(prefix="prepare-") as tmp:
        write_shard(_pool_state["plan"], k, _pool_state["out"], Path(tmp))
    return k


def run_pool(job: Job, tokenizer: Any, out: Storage) -> Plan:
    """`--workers W` here: W processes take the files, largest first, one at a time as each becomes free (a big file
    or a slow JSONL one holds up only its own worker), then the shards the same way. Forked where the platform can
    (Linux): the workers inherit the imports and the tokenizer instead of paying both again (~10-30 s each on a busy
    machine). A failing worker stops the job with its message (the pool raises its exception here). Returns the
    plan the shards were cut by."""
    global _inherited_tokenizer
    inputs = list_inputs(job.data)
    source = _source_root(job.data)
    files = [(i, inputs[i][0]) for i in largest_first([n for _, n in inputs]) if not out.exists(part_name(i, "json"))]
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    _inherited_tokenizer = tokenizer
    try:
        if files:
            with ctx.Pool(min(job.workers, len(files)), _pool_init, (job, source.uri, None)) as pool:
                for _ in pool.imap_unordered(_tokenize_task, files, chunksize=1):
                    pass
        parts = [PartStats(**json.loads(out.read_text(part_name(i, "json")))) for i in range(len(inputs))]
        plan = make_plan(job, tokenizer, parts)
        check_quality(job, plan)
        # Shards are all the same size but for the last: handed out in order, each to the first free worker.
        shards = [k for k in range(plan.shards) if not out.exists(shard_name(k).replace(".bin", ".json"))]
        if shards:
            with ctx.Pool(min(job.workers, len(shards)), _pool_init, (job, source.uri, plan)) as pool:
                for _ in pool.imap_unordered(_shard_task, shards, chunksize=1):
                    pass
        return plan
    finally:
        _inherited_tokenizer = None


def make_plan(job: Job, tokenizer: Any, parts: list[PartStats]) -> Plan:
    dtype = token_dtype(len(tokenizer))
    planes = 2 if any(p.chat for p in parts) else 1
    row_bytes = planes * (job.seq_len + 1) * np.dtype(dtype).itemsize
    return Plan(parts, job.seq_len, max(1, (job.shard_mb << 20) // row_bytes), dtype)


def validation(plan: Plan) -> dict[str, Any]:
    records = sum(p.records for p in plan.parts)
    bad = sum(p.bad for p in plan.parts)
    empty = sum(p.empty for p in plan.parts)
    problems = [x for p in plan.parts for x in p.problems][:REPORTED_PROBLEMS]
    return {
        "records": records,
        "bad": bad,
        "empty": empty,
        "bad_fraction": round((bad + empty) / records, 6) if records else 0.0,
        "problems": problems,
    }


def check_quality(job: Job, plan: Plan) -> None:
    v = validation(plan)
    if v["bad_fraction"] > job.max_bad_fraction:
        shown = "\n  ".join(v["problems"][:20])
        raise DataError(
            f"{v['bad'] + v['empty']} of {v['records']} records are bad ({v['bad']} invalid, {v['empty']} empty): "
            f"fraction {v['bad_fraction']:g} > --max-bad-fraction {job.max_bad_fraction:g}; first problems:\n  {shown}"
        )
    if plan.windows == 0:
        raise DataError(f"{job.data} has {plan.tokens} tokens: fewer than one trainable sequence of {job.seq_len + 1}")


def wait_for(out: Storage, names: list[str], timeout_s: float) -> list[str]:
    """The text of every file in `names`, once all exist: the barrier between workers that share only storage."""
    deadline = time.monotonic() + timeout_s
    texts: dict[str, str] = {}
    while True:
        for name in names:
            if name not in texts and out.exists(name):
                texts[name] = out.read_text(name)
        if len(texts) == len(names):
            return [texts[n] for n in names]
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g} s for {len(names) - len(texts)} files under {out.uri}")
        time.sleep(POLL_S)


def finish(job: Job, plan: Plan, tokenizer: Any, out: Storage) -> Manifest:
    """Worker 0, once every shard is written: the manifest (last), then the parts go."""
    infos = wait_for(out, [shard_name(k).replace(".bin", ".json") for k in range(plan.shards)], job.wait_timeout_s)
    shards, first = [], 0
    for k, text in enumerate(infos):
        info = json.loads(text)
        shards.append(ShardInfo(path=shard_name(k), first=first, **info))
        first += info["sequences"]
    manifest = Manifest(
        seq_len=job.seq_len,
        planes=plan.planes,
        dtype=plan.dtype,
        tokenizer={
            "name": job.tokenizer,
            "sha256": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "separator": document_separator(tokenizer),
        },
        sequences=first,
        tokens=plan.tokens,
        documents=sum(p.documents for p in plan.parts),
        source=job.data,
        files=len(plan.parts),
        validation=validation(plan),
        shards=shards,
    )
    out.write_text(MANIFEST, manifest.to_json())
    out.delete_dir(PARTS_DIR)
    return manifest


def prepare(job: Job) -> Manifest | None:
    """Run the job (all workers here, or this one worker of a cluster job); the manifest, or None for a worker
    other than 0 (its share done)."""
    out = open_storage(job.out)
    if out.exists(MANIFEST):
        manifest = Manifest.from_json(out.read_text(MANIFEST), f"{job.out}/{MANIFEST}")
        _check_settings(job, out, load_tokenizer(job.tokenizer, Path(tempfile.gettempdir()) / "llm-prepare"))
        return manifest
    # Before the tokenizer first encodes: a Rust thread pool started in this process would deadlock forked workers
    # (tokenizers' own warning), and one worker is meant to use one core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_tokenizer(job.tokenizer, Path(tempfile.gettempdir()) / "llm-prepare")
    if job.seq_len < 8:
        raise DataError(f"--seq-len must be >= 8, got {job.seq_len}")
    _check_settings(job, out, tokenizer)
    if job.worker_index is None and job.workers == 1:
        plan = run_worker(job, 0, tokenizer)
    elif job.worker_index is None:
        plan = run_pool(job, tokenizer, out)
    else:
        plan = run_worker(job, job.worker_index, tokenizer)
        if job.worker_index != 0:
            return None
    return finish(job, plan, tokenizer, out)


def _check_settings(job: Job, out: Storage, tokenizer: Any) -> str:
    """Record this job's settings at --out (the first worker to get there), or check a rerun's against them."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    mine = job.settings(fingerprint)
    if out.exists(SETTINGS):
        theirs = json.loads(out.read_text(SETTINGS))
        if theirs != mine:
            diff = sorted(k for k in mine if theirs.get(k) != mine[k])
            raise DataError(
                f"--out {job.out} holds a preparation with other settings ({', '.join(diff)}): use a new --out"
            )
    else:
        out.write_text(SETTINGS, json.dumps(mine, indent=2, sort_keys=True))
    return fingerprint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="text/JSONL: a file, directory or s3:// prefix")
    p.add_argument(
        "--tokenizer", required=True, help="the model whose tokenizer to use: HF directory (local or s3://) or 'debug'"
    )
    p.add_argument("--out", required=True, help="output location (local directory or s3:// prefix)")
    p.add_argument(
        "--seq-len", type=int, required=True, help="tokens per training sequence (the trainer's data.seq_len)"
    )
    p.add_argument("--shard-mb", type=int, default=64, help="target shard size in MiB (default 64)")
    p.add_argument("--workers", type=int, default=1, help="worker processes here, or workers of the cluster job")
    p.add_argument("--worker-index", type=int, help="this process is worker I of --workers (a cluster job)")
    p.add_argument("--local-input", default="", help="files this worker has locally (SageMaker ShardedByS3Key)")
    p.add_argument("--text-field", default="text", help="JSONL field holding plain text (default: text)")
    p.add_argument("--max-bad-fraction", type=float, default=0.0, help="fail when more records than this are bad")
    return p


def worker_index(args: argparse.Namespace) -> int | None:
    """--worker-index, else a Kubernetes Indexed Job's JOB_COMPLETION_INDEX, else SageMaker's host position."""
    if args.worker_index is not None:
        return args.worker_index
    if "JOB_COMPLETION_INDEX" in os.environ:
        return int(os.environ["JOB_COMPLETION_INDEX"])
    config = SAGEMAKER_RESOURCE_CONFIG
    if args.local_input and config.is_file():
        # SageMaker Processing: hosts are algo-1..algo-N; the sorted position is the worker index.
        rc = json.loads(config.read_text())
        return sorted(rc["hosts"]).index(rc["current_host"])
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        index = worker_index(args)
        if args.workers < 1 or args.shard_mb < 1 or not 0 <= args.max_bad_fraction <= 1:
            raise DataError("--workers and --shard-mb must be >= 1 and --max-bad-fraction in [0, 1]")
        if index is not None and not 0 <= index < args.workers:
            raise DataError(f"worker index {index} is outside --workers {args.workers}")
        job = Job(
            data=args.data,
            tokenizer=args.tokenizer,
            out=args.out,
            seq_len=args.seq_len,
            shard_mb=args.shard_mb,
            text_field=args.text_field,
            max_bad_fraction=args.max_bad_fraction,
            workers=args.workers,
            worker_index=index,
            local_input=args.local_input,
        )
        started = time.monotonic()
        manifest = prepare(job)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if manifest is None:
        print(f"worker {index}: done", file=sys.stderr)
        return 0
    v = manifest.validation
    for problem in v["problems"][:20]:
        print(f"warning: {problem}", file=sys.stderr)
    print(
        json.dumps(
            {
                "manifest": f"{job.out.rstrip('/')}/{MANIFEST}",
                "sequences": manifest.sequences,
                "tokens": manifest.tokens,
                "shards": len(manifest.shards),
                "documents": manifest.documents,
                "bad": v["bad"],
                "empty": v["empty"],
                "seconds": round(time.monotonic() - started, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
