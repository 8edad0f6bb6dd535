"""S3 end to end against a real moto server: S3 data in, sharded checkpoints and the exported model out."""

from __future__ import annotations

from pathlib import Path

import boto3
from train_helpers import run_training
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.debug_model import write_debug_model
from training.storage import S3Storage


def test_s3_data_checkpoints_resume_and_export(aws_env: str, corpus: Path, tmp_path: Path) -> None:
    s3 = boto3.client("s3")
    for bucket in ("t-datasets", "t-checkpoints", "t-models"):
        s3.create_bucket(Bucket=bucket)
    # A directory of mixed formats: plain text and JSON lines.
    text = corpus.read_text()
    s3.put_object(Bucket="t-datasets", Key="corpora/rep/part-0.txt", Body=text.encode())
    s3.put_object(Bucket="t-datasets", Key="corpora/rep/part-1.jsonl", Body=b'{"text": "hello s3 world."}\n' * 50)
    # The base model is a Hugging Face directory in the models bucket, as a real 1B-8B model would be.
    S3Storage("s3://t-models/base/debug-llama").upload_dir(write_debug_model(tmp_path / "base"), "")
    common = ("--data", "s3://t-datasets/corpora/rep", "--output", "s3://t-checkpoints/run1",
              "--export", "s3://t-models/run1", "--model", "s3://t-models/base/debug-llama",
              "--set", "data.seq_len=32")  # fmt: skip

    # One process first: checkpoints at steps 3 and 6.
    first = run_training(*common, "--max-steps", "6", "--save-every", "3", ranks=1)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = S3Storage("s3://t-checkpoints/run1/checkpoints")
    assert ckpts.list_dirs() == ["step_00000003", "step_00000006"]
    assert ckpts.exists("step_00000006/COMPLETE") and ckpts.exists("step_00000006/.metadata")

    # A newer checkpoint that never got its marker (a node killed mid-upload) must be ignored.
    s3.put_object(Bucket="t-checkpoints", Key="run1/checkpoints/step_00000099/__0_0.distcp", Body=b"partial")
    s3.put_object(Bucket="t-checkpoints", Key="run1/checkpoints/step_00000099/.metadata", Body=b"partial")

    # Two ranks now: resumes from the 1-rank checkpoint at step 6 (DCP reshards), runs to 9, exports.
    second = run_training(*common, "--max-steps", "9", "--save-every", "3", ranks=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.events("resumed")[0]["step"] == 6
    assert sorted(second.losses) == [7, 8, 9]
    assert ckpts.exists("step_00000009/COMPLETE")
    assert not ckpts.exists("step_00000099/COMPLETE")
    assert "step_00000003" not in ckpts.list_dirs(), "keep_last=2 rotates old checkpoints out of S3"

    # The export is a plain Hugging Face directory in the models bucket: download, load, generate.
    local = tmp_path / "model"
    S3Storage("s3://t-models/run1").download_dir("", local)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in local.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(local)
    tok = AutoTokenizer.from_pretrained(local)
    prompt = tok("the quick brown", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tok.decode(generated[0]), str)
