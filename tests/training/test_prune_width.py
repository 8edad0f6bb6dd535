"""Width pruning (training/prune.py --intermediate-size / --mlp-keep-ratio): MLP neurons ranked by mean |activation|
(Minitron), the lowest removed from gate/up/down in every layer; the written model loads with transformers with the
new shape, keeping every neuron changes nothing, and the neurons removed are the least active ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from training.debug_model import DEBUG_MODEL_SHAPE, build_model, build_tokenizer
from training.export import EXPORT_INFO
from training.prune import main, mlp_importance, prune_mlp_neurons

WIDTH = int(DEBUG_MODEL_SHAPE["intermediate_size"])
DEAD = [5, 17, 100, 343]
"""Neurons made inactive in every layer of the constructed model (their gate rows are zero: act(0) * up = 0)."""


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _save(model: torch.nn.Module, tokenizer, out: Path) -> Path:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _with_dead_neurons(out: Path) -> Path:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[DEAD] = 0.0
    return _save(model, tokenizer, out)


def test_keeping_every_neuron_writes_a_bit_identical_model(corpus: Path, tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    src = _save(build_model(tokenizer), tokenizer, tmp_path / "src")
    out = tmp_path / "same"
    argv = ["--model", str(src), "--out", str(out), "--calib", str(corpus), "--seq-len", "32", "--calib-windows", "2"]
    assert main([*argv, "--mlp-keep-ratio", "1"]) == 0
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(src, ids), _logits(out, ids))


def test_width_pruning_removes_the_least_active_neurons_and_loads_with_the_new_shape(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _with_dead_neurons(tmp_path / "src")
    out = tmp_path / "narrow"
    keep = WIDTH - len(DEAD)
    rc = main(["--model", str(src), "--out", str(out), "--intermediate-size", str(keep), "--calib", str(corpus),
               "--seq-len", "32", "--calib-windows", "4"])  # fmt: skip
    assert rc == 0
    assert f"intermediate_size {WIDTH} -> {keep} per layer" in capsys.readouterr().out

    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert pruned.config.intermediate_size == keep
    hidden = int(DEBUG_MODEL_SHAPE["hidden_size"])
    for layer in pruned.model.layers:
        assert layer.mlp.gate_proj.weight.shape == layer.mlp.up_proj.weight.shape == (keep, hidden)
        assert layer.mlp.down_proj.weight.shape == (hidden, keep)
    record = json.loads((out / EXPORT_INFO).read_text())["pruning"]
    assert record["width"]["intermediate_size_after"] == keep and record["params_after"] < record["params_before"]

    # The removed neurons were exactly the dead ones: the kept rows are the source's other rows, in order...
    source = AutoModelForCausalLM.from_pretrained(src)
    alive = [j for j in range(WIDTH) if j not in DEAD]
    for a, b in zip(source.model.layers, pruned.model.layers, strict=True):
        assert torch.equal(a.mlp.gate_proj.weight[alive], b.mlp.gate_proj.weight)
        assert torch.equal(a.mlp.down_proj.weight[:, alive], b.mlp.down_proj.weight)
    # ...so the model computes what it computed (up to summation order in down_proj).
    ids = torch.randint(0, source.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(src, ids), _logits(out, ids), rtol=1e-5, atol=1e-5)


def test_importance_is_the_mean_absolute_activation_and_the_top_neurons_are_kept() -> None:
    torch.manual_seed(0)
    model = build_model(build_tokenizer()).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 16))
    importance = mlp_importance(model, ids, batch_size=2)
    # Layer 0's activation from its own input (hidden_states[0] after the layer's post-attention path).
    captured: list[torch.Tensor] = []
    mlp = model.model.layers[0].mlp
    handle = mlp.register_forward_hook(lambda m, args, output: captured.append(args[0]))
    with torch.inference_mode():
        model(input_ids=ids)
    handle.remove()
    with torch.inference_mode():
        x = captured[0]
        act = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs().reshape(-1, WIDTH).mean(dim=0)
    torch.testing.assert_close(importance[0].float(), act, rtol=1e-4, atol=1e-7)

    kept = prune_mlp_neurons(model, importance, 10)
    for scores, idx in zip(importance, kept, strict=True):
        assert idx == sorted(torch.topk(scores, 10).indices.tolist())
    assert model.config.intermediate_size == 10 and model.model.layers[1].mlp.down_proj.in_features == 10
