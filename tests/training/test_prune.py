"""Depth pruning (training/prune.py): Block Influence finds a redundant layer, the written model is a normal HF
directory whose kept layers compute exactly what they computed before, and bad input is exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.debug_model import build_model, build_tokenizer, write_debug_model
from training.export import EXPORT_INFO
from training.prune import block_influence, main, remove_layers
from training.storage import S3Storage

IDENTITY_LAYER = 2


def _with_identity_layer(out: Path) -> Path:
    """The debug model with layer 2 made the identity (its attention and MLP write zeros into the residual
    stream): Block Influence 0, and removing it must change nothing at all."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    with torch.no_grad():
        layer = model.model.layers[IDENTITY_LAYER]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _hidden_states(model_dir: Path, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
    return (*out.hidden_states, out.logits)


def test_prune_removes_the_least_influential_layer_and_keeps_the_rest_bit_identical(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _with_identity_layer(tmp_path / "src")
    out = tmp_path / "pruned"
    rc = main(["--model", str(src), "--out", str(out), "--drop-layers", "1", "--calib", str(corpus),
               "--seq-len", "32", "--calib-windows", "4"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"layer   {IDENTITY_LAYER}  BI 0.000000  REMOVED" in printed
    assert "parameters: 961,664 -> " in printed and "layers: 4 -> 3" in printed

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    record = json.loads((out / EXPORT_INFO).read_text())
    assert record["pruning"]["removed_layers"] == [IDENTITY_LAYER] and record["pruning"]["kept_layers"] == [0, 1, 3]
    assert record["served_model_name"] == "src-3l"

    ids = AutoTokenizer.from_pretrained(out)("the quick brown fox jumps", return_tensors="pt")["input_ids"]
    before, after = _hidden_states(src, ids), _hidden_states(out, ids)
    # Up to the first removed layer the kept layers' outputs are bit-identical...
    for k in range(IDENTITY_LAYER + 1):
        assert torch.equal(before[k], after[k]), k
    # ...and since the removed layer was the identity, so is everything after it, logits included.
    assert torch.equal(before[-1], after[-1])

    # Re-indexed layers (and their KV-cache slots): cached generation gives the source model's tokens.
    a = AutoModelForCausalLM.from_pretrained(src).generate(ids, max_new_tokens=8, do_sample=False)
    b = AutoModelForCausalLM.from_pretrained(out).generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_remove_layers_renumbers_kv_cache_slots() -> None:
    model = build_model(build_tokenizer())
    keep = remove_layers(model, [0, 2])
    assert keep == [1, 3]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert model.config.num_hidden_layers == 2


def test_block_influence_is_one_minus_the_mean_cosine() -> None:
    torch.manual_seed(0)
    model = build_model(build_tokenizer()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    ranking = block_influence(model, ids, batch_size=1)
    with torch.inference_mode():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden_states[i] is layer i's input; the last entry is normed, so compare the layers it does not cover.
    for i in range(len(hs) - 2):
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean()
        assert ranking.scores[i] == pytest.approx(1 - cos.item(), abs=1e-5)
    assert ranking.tokens == 32


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--drop-layers", "4"], "--drop-layers 4: the model has 4 decoder layers"),
        (["--keep-layers", "0"], "--keep-layers 0: must be >= 1"),
        (["--keep-layers", "4"], "--keep-layers 4: the model has 4 decoder layers"),
        (["--drop-layers", "1", "--calib", "/nonexistent/calib.txt"], "--calib /nonexistent/calib.txt"),
    ],
)
def test_bad_input_is_exit_2_and_writes_nothing(
    args: list[str], message: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(write_debug_model(tmp_path / "src")), "--out", str(tmp_path / "out"), "--seq-len", "32"]
    if "--calib" not in args:
        argv += ["--calib", str(corpus)]
    assert main(argv + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prune_reads_and_writes_s3(aws_env: str, corpus: Path, tmp_path: Path) -> None:
    s3 = boto3.client("s3")
    for bucket in ("p-models", "p-data"):
        s3.create_bucket(Bucket=bucket)
    S3Storage("s3://p-models/base").upload_dir(write_debug_model(tmp_path / "base"), "")
    s3.put_object(Bucket="p-data", Key="calib/corpus.txt", Body=corpus.read_bytes())
    rc = main(["--model", "s3://p-models/base", "--out", "s3://p-models/pruned", "--keep-layers", "3",
               "--calib", "s3://p-data/calib/corpus.txt", "--seq-len", "32", "--calib-windows", "2"])  # fmt: skip
    assert rc == 0
    local = tmp_path / "back"
    S3Storage("s3://p-models/pruned").download_dir("", local)
    model = AutoModelForCausalLM.from_pretrained(local)
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
