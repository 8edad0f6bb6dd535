"""`training.prepare` balances its workers by input size: a cluster job's size-balanced split (longest processing
time first, the same in every pod), the sizes from a local or S3 listing, and W local processes taking the files
largest first, each as it becomes free."""

from __future__ import annotations

import json
import multiprocessing.pool
import os
import random
from pathlib import Path

import boto3
import pytest

from training import prepare as prep
from training.storage import LocalStorage, S3Storage


def _loads(sizes: list[int], shares: list[list[int]]) -> list[int]:
    return [sum(sizes[i] for i in share) for share in shares]


def test_balanced_assignment_is_longest_processing_time_first_and_deterministic() -> None:
    # Files by (-size, index), each to the least-loaded worker, ties to the lowest worker index.
    sizes = [5, 3, 3, 2, 2, 1]
    assert prep.balanced_assignment(sizes, 2) == [[0, 3, 5], [1, 2, 4]]
    assert prep.balanced_assignment([1, 1, 1, 1], 3) == [[0, 3], [1], [2]]
    assert prep.balanced_assignment([7, 9], 4) == [[1], [0], [], []]
    assert prep.balanced_assignment([], 2) == [[], []]
    assert prep.balanced_assignment(sizes, 1) == [[0, 1, 2, 3, 4, 5]]

    # The benchmark corpus's shape (bench/data_scale.py: 16 files, every fourth JSONL and slower per byte, here
    # simply bigger): i % 2 put all four big files on worker 1; the size-balanced split gives each worker two.
    bench = [400 if i % 4 == 1 else 100 for i in range(16)]
    round_robin = [list(range(w, 16, 2)) for w in range(2)]
    assert _loads(bench, round_robin) == [800, 2000]
    shares = prep.balanced_assignment(bench, 2)
    assert _loads(bench, shares) == [1400, 1400]
    assert sorted(i for share in shares for i in share) == list(range(16)), "every file exactly once"

    # Any sizes: every file once, and no worker more than one file's size above another (the LPT bound).
    rng = random.Random(3)
    for workers in (2, 3, 8):
        sizes = [rng.randint(0, 10_000) for _ in range(50)]
        shares = prep.balanced_assignment(sizes, workers)
        assert shares == prep.balanced_assignment(list(sizes), workers), "a pure function of the listing"
        assert sorted(i for share in shares for i in share) == list(range(50))
        loads = _loads(sizes, shares)
        assert max(loads) - min(loads) <= max(sizes)


def test_file_sizes_local_and_s3(aws_env: str, tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("x" * 10)
    (root / "sub" / "b.jsonl").write_text(json.dumps({"text": "y" * 20}) + "\n")
    (root / "notes.csv").write_text("ignored")
    expected = {"a.txt": 10, "notes.csv": 7, "sub/b.jsonl": 33}
    assert LocalStorage(root).file_sizes() == expected
    assert LocalStorage(root).file_sizes("sub") == {"b.jsonl": 33}
    assert LocalStorage(tmp_path / "missing").file_sizes() == {}
    assert prep.list_inputs(str(root)) == [("a.txt", 10), ("sub/b.jsonl", 33)]
    assert prep.list_inputs(str(root / "a.txt")) == [("a.txt", 10)]

    boto3.client("s3").create_bucket(Bucket="t-prep-sizes")
    S3Storage("s3://t-prep-sizes/raw").upload_dir(root, "")
    s3 = S3Storage("s3://t-prep-sizes/raw")
    assert s3.file_sizes() == expected, "ListObjectsV2's Size, as the local stat"
    assert s3.file_sizes("sub") == {"b.jsonl": 33}
    assert s3.list_files() == sorted(expected), "list_files is unchanged"
    assert prep.list_inputs("s3://t-prep-sizes/raw") == [("a.txt", 10), ("sub/b.jsonl", 33)]
    assert prep.list_inputs("s3://t-prep-sizes/raw/a.txt") == [("a.txt", 0)]  # one object: the whole job


def _varied_corpus(root: Path) -> tuple[Path, list[int]]:
    """Files of different sizes, not in size order, so that largest-first differs from file order."""
    root.mkdir(parents=True)
    counts = [20, 200, 60, 120, 10, 90]
    for f, n in enumerate(counts):
        if f % 2:
            text = "\n".join(json.dumps({"text": f"record {j} of file {f}, some words."}) for j in range(n)) + "\n"
            (root / f"part-{f}.jsonl").write_text(text)
        else:
            (root / f"part-{f}.txt").write_text("\n\n".join(f"paragraph {j} of file {f}." for j in range(n)))
    return root, [p.stat().st_size for p in sorted(root.iterdir())]


def _job(data: str, out: str, **kw) -> prep.Job:
    return prep.Job(data=data, tokenizer="debug", out=out, seq_len=16, shard_mb=1, **kw)


def test_local_workers_take_files_largest_first_as_each_is_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, sizes = _varied_corpus(tmp_path / "src")
    handed: list[tuple[str, list, int]] = []
    real = multiprocessing.pool.Pool.imap_unordered

    def spy(self, func, iterable, chunksize=1):
        tasks = list(iterable)
        handed.append((func.__name__, tasks, chunksize))
        return real(self, func, tasks, chunksize)

    monkeypatch.setattr(multiprocessing.pool.Pool, "imap_unordered", spy)
    real_plan = prep.make_plan

    def small_shards(job, tokenizer, parts):
        plan = real_plan(job, tokenizer, parts)
        plan.rows_per_shard = 8  # several shards from a small corpus
        return plan

    monkeypatch.setattr(prep, "make_plan", small_shards)
    loads = tmp_path / "tokenizer-loads"
    real_load = prep.load_tokenizer

    def counted_load(*a, **kw):
        with open(loads, "a") as f:  # forked workers inherit this patch: a load in one would be written here too
            f.write(f"{os.getpid()}\n")
        return real_load(*a, **kw)

    monkeypatch.setattr(prep, "load_tokenizer", counted_load)
    two = prep.prepare(_job(str(src), str(tmp_path / "two"), workers=2))
    assert loads.read_text().split() == [str(os.getpid())], "forked workers reuse the parent's tokenizer"
    assert two is not None and len(two.shards) > 2

    # Per-file tasks, largest first, one at a time (chunksize 1): the next file goes to whichever worker is free.
    (name, files, chunk), (shard_name, shards, shard_chunk) = handed
    assert name == "_tokenize_task" and chunk == 1
    assert [i for i, _ in files] == sorted(range(len(sizes)), key=lambda i: -sizes[i]) == [1, 3, 5, 2, 0, 4]
    assert [rel for _, rel in files] == [prep.list_inputs(str(src))[i][0] for i, _ in files]
    assert shard_name == "_shard_task" and shard_chunk == 1 and shards == list(range(len(two.shards)))

    one = prep.prepare(_job(str(src), str(tmp_path / "one")))
    assert one is not None and [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]
    assert one.tokens == two.tokens and one.documents == two.documents


def test_a_failing_local_worker_stops_the_job_with_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = _varied_corpus(tmp_path / "src")
    real = prep.tokenize_file

    def failing(job, tokenizer, i, rel, *a, **kw):
        if rel == "part-2.txt":
            raise prep.DataError(f"{rel}: unreadable")
        return real(job, tokenizer, i, rel, *a, **kw)

    monkeypatch.setattr(prep, "tokenize_file", failing)  # forked workers inherit the patch
    args = ["--data", str(src), "--tokenizer", "debug", "--seq-len", "16", "--workers", "2"]
    assert prep.main([*args, "--out", str(tmp_path / "out")]) == prep.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "error: part-2.txt: unreadable" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()
