"""Unit tests of the pieces: config tree and overrides, packing, rank sharding, loader state, LR schedule."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from training.config import PRESETS, ConfigError, TrainConfig, apply_overrides, preset
from training.data import DataError, PackedLoader, build_sequences, pack, read_documents
from training.debug_model import build_tokenizer
from training.train import lr_at


def test_every_preset_builds_and_round_trips_through_json() -> None:
    for name in PRESETS:
        cfg = preset(name)
        assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert preset("llama-8b").model.activation_checkpointing
    assert preset("debug").model.path == "debug"


def test_overrides_are_typed_and_revalidated() -> None:
    cfg = apply_overrides(preset("debug"), ["optim.lr=1e-2", "parallel.strategy=ddp", "model.bf16=false", "name=x"])
    assert cfg.optim.lr == 0.01 and cfg.parallel.strategy == "ddp" and cfg.model.bf16 is False and cfg.name == "x"
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps must be >= 0"):
        apply_overrides(cfg, ["optim.warmup_steps=-1"])
    with pytest.raises(ConfigError, match="unknown config keys"):
        TrainConfig.from_dict({"optim": {"lr": 1.0, "momentum": 0.9}})


def test_pack_windows_share_one_boundary_token() -> None:
    seqs = pack([[1, 2, 3], [4, 5]], eos_id=0, seq_len=3)
    # stream: 1 2 3 0 4 5 0 -> windows of 4 tokens stepping by 3
    assert seqs.tolist() == [[1, 2, 3, 0], [0, 4, 5, 0]]
    assert len(pack([[1]], eos_id=0, seq_len=8)) == 0


def test_jsonl_field_and_text_paragraphs(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "b.txt").write_text("three\n\nfour\n")
    assert read_documents(sorted(tmp_path.iterdir()), "text") == ["one", "two", "three", "four\n"]
    with pytest.raises(DataError, match="string field 'body'"):
        read_documents([tmp_path / "a.jsonl"], "body")


def test_ranks_read_disjoint_shards_and_resume_exactly(corpus: Path) -> None:
    seqs = build_sequences(corpus, build_tokenizer(), seq_len=32, text_field="text")
    loaders = [PackedLoader(seqs, micro_batch_size=4, rank=r, world_size=2, seed=7) for r in range(2)]
    first = [[tuple(row.tolist()) for row in loader.next_batch()[0]] for loader in loaders]
    assert not set(first[0]) & set(first[1]), "ranks must not read the same sequences in one step"

    ref = PackedLoader(seqs, micro_batch_size=4, rank=0, world_size=2, seed=7)
    batches = [ref.next_batch()[0] for _ in range(200)]  # crosses several epoch boundaries
    assert ref.state.epoch >= 1
    resumed = PackedLoader(seqs, micro_batch_size=4, rank=0, world_size=2, seed=7)
    replay = PackedLoader(seqs, micro_batch_size=4, rank=0, world_size=2, seed=7)
    for _ in range(123):
        replay.next_batch()
    resumed.load_state_dict(json.loads(json.dumps(replay.state_dict())))
    for i in range(123, 200):
        assert torch.equal(resumed.next_batch()[0], batches[i])


def test_cosine_schedule_with_warmup() -> None:
    o = preset("debug").optim
    assert lr_at(0, 100, o) == pytest.approx(o.lr / o.warmup_steps)
    assert lr_at(o.warmup_steps, 100, o) == pytest.approx(o.lr)
    assert lr_at(100, 100, o) == pytest.approx(o.lr * o.min_lr_ratio)
    lrs = [lr_at(s, 100, o) for s in range(o.warmup_steps, 101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_activation_checkpointing_trains_the_same_model() -> None:
    """Recomputing activations in backward changes memory, not the gradients."""
    from training.config import ModelConfig, ParallelConfig
    from training.model import load_model_and_tokenizer
    from training.parallelize import Dist, parallelize

    grads = []
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for ac in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(activation_checkpointing=ac)
        model, _ = load_model_and_tokenizer(cfg, cache_dir=Path("/nonexistent"))
        model = parallelize(model, ParallelConfig(strategy="fsdp"), cfg, d)
        model.train()
        ids = torch.arange(64).reshape(2, 32) % 500
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.embed_tokens.weight.grad.clone())
        assert model.is_activation_checkpointing == ac
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


class _OldTransformersLlama(LlamaForCausalLM):
    """A model as transformers < 5.23 builds it: `gradient_checkpointing_enable` is the only name (its body then is
    what 5.23 moved to `_activation_checkpointing_enable`); `activation_checkpointing_enable` does not exist."""

    def __getattribute__(self, name: str) -> Any:
        if name == "activation_checkpointing_enable":
            raise AttributeError(f"'LlamaForCausalLM' object has no attribute {name!r}")
        return super().__getattribute__(name)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self._activation_checkpointing_enable(gradient_checkpointing_kwargs)


def test_activation_checkpointing_works_without_the_5_23_api() -> None:
    """A GPU image on an older transformers pin (a vendor image with 5.17) has no `activation_checkpointing_enable`:
    parallelize must still checkpoint every decoder layer, non-reentrant, and train the same model."""
    from transformers import LlamaConfig

    from training.parallelize import apply_activation_checkpointing

    shape = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    torch.manual_seed(0)
    old = _OldTransformersLlama(LlamaConfig(**shape))
    plain = LlamaForCausalLM(LlamaConfig(**shape))
    plain.load_state_dict(old.state_dict())
    assert not hasattr(old, "activation_checkpointing_enable")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no deprecation noise on the current release either
        apply_activation_checkpointing(old)
        apply_activation_checkpointing(plain)
    for model in (old, plain):
        assert all(layer.gradient_checkpointing for layer in model.model.layers)
        assert model.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    ids = torch.arange(32).reshape(2, 16)
    reference = LlamaForCausalLM(LlamaConfig(**shape))
    reference.load_state_dict(old.state_dict())
    grads = []
    for model in (old, reference):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_grad_accumulation_matches_the_larger_batch(corpus: Path, tmp_path: Path) -> None:
    """On one rank, 2 x 4 accumulated micro-batches read the same 8 sequences as one batch of 8: same updates."""
    from train_helpers import run_training

    common = ("--data", str(corpus), "--max-steps", "3", "--save-every", "0", "--set", "data.seq_len=32")
    big = run_training(*common, "--output", str(tmp_path / "a"), "--set", "parallel.micro_batch_size=8", ranks=1)
    accum = run_training(*common, "--output", str(tmp_path / "b"), "--set", "parallel.micro_batch_size=4",
                         "--set", "parallel.grad_accum_steps=2", ranks=1)  # fmt: skip
    assert big.returncode == 0 and accum.returncode == 0, accum.stderr[-2000:]
    assert big.losses.keys() == accum.losses.keys() == {1, 2, 3}
    for step, loss in big.losses.items():
        assert accum.losses[step] == pytest.approx(loss, rel=1e-4)


def test_bf16_checkpoint_trains_in_fp32_and_exports_bf16(tmp_path: Path) -> None:
    """Master weights are fp32 whatever the checkpoint's dtype; the export ships the dtype the model came in."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from training.config import ModelConfig
    from training.export import export_model
    from training.model import load_model_and_tokenizer
    from training.parallelize import Dist

    tok = build_tokenizer()
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **shape)).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")

    model, tokenizer = load_model_and_tokenizer(ModelConfig(path=str(tmp_path / "base")), cache_dir=tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    export_model(model, tokenizer, str(tmp_path / "out"), Dist(0, 1, 0, torch.device("cpu")))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert exported.dtype == torch.bfloat16
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()  # still tied
