"""`python -m training.prepare`: the same shards for any number of workers (on one machine or as a cluster job over
S3), exactly the trainer's packing, skip-on-rerun after a crash, the bad-data report, and the loader over shards
resuming exactly on another world size."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import boto3
import pytest
import torch

from training import prepare as prep
from training.data import PackedLoader, build_sequences
from training.debug_model import build_tokenizer
from training.shards import MANIFEST, open_prepared
from training.storage import S3Storage

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a checkpoint is complete when the marker is written.",
    "every rank reads its own share of the data.",
]
CHAT = {
    "messages": [
        {"role": "user", "content": "Where is the fox?"},
        {"role": "assistant", "content": "over the lazy dog."},
    ]
}


def _corpus(root: Path, files: int = 5, chats: bool = False) -> Path:
    """Several files of mixed formats (text and JSONL, chats too if asked): file order and the packing across file
    boundaries matter."""
    rng = random.Random(1)
    root.mkdir(parents=True)
    for f in range(files):
        if f % 2:
            lines = [json.dumps({"text": rng.choice(SENTENCES)}) for _ in range(120)]
            if chats:
                lines += [json.dumps(CHAT)] * 20
            (root / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
        else:
            (root / f"part-{f}.txt").write_text("\n\n".join(rng.choice(SENTENCES) for _ in range(200)))
    return root


def _job(data: str, out: str, **kw) -> prep.Job:
    # 1 KiB shards: several shards even for a small corpus, so shard boundaries are exercised.
    return prep.Job(data=data, tokenizer="debug", out=out, seq_len=16, shard_mb=1, **kw)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    # --shard-mb is in MiB; the tests' corpora are a few KiB, so measure shards in KiB here.
    real = prep.make_plan

    def kib_plan(job, tokenizer, parts):
        plan = real(job, tokenizer, parts)
        plan.rows_per_shard = max(1, 1024 // (plan.planes * (job.seq_len + 1) * 2))
        return plan

    monkeypatch.setattr(prep, "make_plan", kib_plan)


@pytest.mark.parametrize("chats", [False, True], ids=["text", "chat"])
def test_one_and_three_workers_write_the_same_shards_as_the_trainer_packs(
    aws_env: str, tmp_path: Path, chats: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _corpus(tmp_path / "src", chats=chats)
    one = prep.prepare(_job(str(src), str(tmp_path / "one")))
    assert one is not None and len(one.shards) > 3
    # Two worker processes on this machine (`--workers 2`).
    prep.prepare(_job(str(src), str(tmp_path / "two"), workers=2))
    assert _files(tmp_path / "two") == _files(tmp_path / "one")

    # Three workers of a cluster job (what an Indexed Job's pods run), on S3, meeting only through the output.
    s3 = boto3.client("s3")
    bucket = f"t-prep-{'chat' if chats else 'text'}"
    s3.create_bucket(Bucket=bucket)
    S3Storage(f"s3://{bucket}/raw").upload_dir(src, "")
    results: dict[int, object] = {}
    # Threads stand in for the pods here. Pods are processes; threads share boto3's default session, which is not
    # safe to create clients from concurrently (boto3 docs, "Multithreading"): serialize client creation only.
    lock, make_client = threading.Lock(), boto3.client

    def locked_client(*a, **kw):
        with lock:
            return make_client(*a, **kw)

    monkeypatch.setattr(boto3, "client", locked_client)

    def worker(i: int) -> None:
        try:
            results[i] = prep.prepare(_job(f"s3://{bucket}/raw", f"s3://{bucket}/prepared", workers=3, worker_index=i))
        except BaseException as e:  # surfaced below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[1] is None and results[2] is None, results
    three = results[0]
    S3Storage(f"s3://{bucket}/prepared").download_dir("", tmp_path / "three")
    shards_one = {k: v for k, v in _files(tmp_path / "one").items() if k.startswith("shards/")}
    shards_three = {k: v for k, v in _files(tmp_path / "three").items() if k.startswith("shards/")}
    assert shards_one == shards_three, "byte-identical shards for 1 and 3 workers"
    assert not any(k.startswith("parts/") for k in _files(tmp_path / "three")), "intermediate parts are removed"
    assert [s.sha256 for s in three.shards] == [s.sha256 for s in one.shards]
    assert three.sequences == one.sequences and three.tokens == one.tokens

    # Exactly the sequences the trainer builds from the raw files (same separator, chat template and mask).
    raw = build_sequences(src, build_tokenizer(), 16, "text")
    _, seqs = open_prepared(f"s3://{bucket}/prepared/{MANIFEST}", tmp_path / "cache", 0, cache_mb=1)
    assert torch.equal(seqs[torch.arange(len(seqs))], raw)
    assert one.planes == (2 if chats else 1)


def test_rerun_after_a_crash_skips_what_is_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _corpus(tmp_path / "src")
    out = tmp_path / "out"
    calls = {"tokenize": 0, "shard": []}
    real_tokenize, real_shard = prep.tokenize_file, prep.write_shard

    def tokenize(*a, **kw):
        calls["tokenize"] += 1
        return real_tokenize(*a, **kw)

    def shard(plan, k, *a, **kw):
        calls["shard"].append(k)
        if k == 2 and len(calls["shard"]) == 3:
            raise OSError("node lost")  # the crash: shard 2 was in flight
        return real_shard(plan, k, *a, **kw)

    monkeypatch.setattr(prep, "tokenize_file", tokenize)
    monkeypatch.setattr(prep, "write_shard", shard)
    with pytest.raises(OSError, match="node lost"):
        prep.prepare(_job(str(src), str(out)))
    assert calls["tokenize"] == 5 and calls["shard"] == [0, 1, 2]
    assert not (out / MANIFEST).exists(), "no manifest until every shard is complete"
    assert not (out / "shards" / "shard-00002.bin").exists(), "no half-written shard"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}

    manifest = prep.prepare(_job(str(src), str(out)))
    assert manifest is not None
    assert calls["tokenize"] == 5, "every file was tokenized already: the rerun tokenizes none"
    assert calls["shard"][3] == 2 and 0 not in calls["shard"][3:] and 1 not in calls["shard"][3:]
    for name, mtime in before.items():
        assert (out / "shards" / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"

    # A complete dataset: a rerun does nothing; one with other settings into the same place is refused.
    assert prep.prepare(_job(str(src), str(out))) == manifest
    assert len(calls["shard"]) == len(manifest.shards) + 3 - 2
    with pytest.raises(prep.DataError, match=r"other settings.*seq_len"):
        prep.prepare(prep.Job(data=str(src), tokenizer="debug", out=str(out), seq_len=32))


def test_bad_data_is_reported_with_file_and_line_and_fails_past_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    good = [json.dumps({"text": s}) for s in SENTENCES * 30]
    bad_role = {"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [*good[:10], "{not json", json.dumps(bad_role), json.dumps({"text": "  "}), *good[10:], json.dumps(CHAT)]
    (src / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--data", str(src), "--tokenizer", "debug", "--seq-len", "16"]

    assert prep.main([*args, "--out", str(tmp_path / "strict")]) == prep.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "3 of 94 records are bad (2 invalid, 1 empty)" in err
    assert "mixed.jsonl:11: not valid JSON" in err
    assert "mixed.jsonl:12: messages[0] has role 'usr'" in err
    assert "mixed.jsonl:13: empty document" in err
    assert "Traceback" not in err
    assert not (tmp_path / "strict" / "shards").exists(), "nothing is packed from data that failed validation"

    assert prep.main([*args, "--out", str(tmp_path / "lenient"), "--max-bad-fraction", "0.05"]) == 0
    report = json.loads((tmp_path / "lenient" / MANIFEST).read_text())["validation"]
    assert (report["records"], report["bad"], report["empty"]) == (94, 2, 1)
    assert len(report["problems"]) == 3
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == 91


def test_loader_over_shards_resumes_exactly_on_another_world_size(tmp_path: Path) -> None:
    """The loader's state is global: after 3 micro-batches on 2 ranks, 1 rank reads exactly the sequences the
    2 ranks would have read next, in the same order, across the epoch boundary too."""
    src = _corpus(tmp_path / "src")
    prep.prepare(_job(str(src), str(tmp_path / "out")))
    _, seqs = open_prepared(str(tmp_path / "out" / MANIFEST), tmp_path / "cache", 0, cache_mb=1)
    per_epoch = len(seqs) // 8  # micro-batches of 8 sequences (2 ranks x 4, or 1 rank x 8) per epoch

    two = [PackedLoader(seqs, 4, r, 2, seed=5) for r in range(2)]
    for _ in range(3):
        for loader in two:
            loader.next_batch()
    state = two[0].state_dict()
    assert state == two[1].state_dict(), "every rank holds the same, global, state"
    one = PackedLoader(seqs, 8, 0, 1, seed=5)
    one.load_state_dict(json.loads(json.dumps(state)))  # as train_state.json carries it
    for _ in range(per_epoch + 2):  # past the end of epoch 0
        inputs, _ = one.next_batch()
        expected = torch.cat([loader.next_batch()[0] for loader in two])
        assert torch.equal(inputs, expected)
    assert one.state_dict()["epoch"] == 1

    other_seed = PackedLoader(seqs, 8, 0, 1, seed=6)
    with pytest.raises(prep.DataError, match=r"seed=5.*seed=6"):
        other_seed.load_state_dict(state)


def test_documented_commands_parse() -> None:
    """Every `training.prepare` / prepared-data command in docs/training.md parses with the tool it names."""
    import shlex

    from ops.launch_training import build_parser as launch_parser
    from tests.helpers import DOCS_DIR
    from training.__main__ import build_parser as train_parser

    text = (DOCS_DIR / "training.md").read_text().replace("\\\n", " ")
    section = text[text.index("## Prepared data") : text.index("## On EKS")]
    commands = [line.strip() for line in section.splitlines() if "python -m " in line and not line.startswith("`")]
    seen = set()
    for command in commands:
        argv = shlex.split(command.split("python -m ", 1)[1].split(" #")[0])
        module, args = argv[0], argv[1:]
        if module == "training.prepare":
            parsed = prep.build_parser().parse_args(args)
            assert parsed.seq_len >= 8
        elif module == "training":
            parsed = train_parser().parse_args(args)
            assert parsed.data.endswith("manifest.json")
        elif module == "ops.launch_training":
            launch_parser().parse_args(args)
        else:
            continue
        seen.add(module)
    assert seen == {"training.prepare", "training", "ops.launch_training"}
