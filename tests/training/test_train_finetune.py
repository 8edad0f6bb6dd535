"""Safe defaults for real models: the `finetune` preset derived from the model, warmup capped to the run,
contradictions rejected before any weight is read, the effective config printed and recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import run_training

from training.__main__ import main
from training.config import ModelInfo, fit_to_model, preset
from training.train import lr_at

# The shapes of SmolLM2-135M (its config.json) and of Llama-3.1-8B, as published with the models.
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 8192, "model_type": "llama"}  # fmt: skip
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
            "max_position_embeddings": 131072, "model_type": "llama"}  # fmt: skip


def _model_dir(tmp_path: Path, config: dict) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))  # config only: nothing here may load weights
    return d


def test_parameter_estimate_matches_the_published_sizes() -> None:
    assert ModelInfo.from_hf_config("s", SMOLLM2).params == pytest.approx(134.5e6, rel=0.01)
    assert ModelInfo.from_hf_config("l", LLAMA_8B).params == pytest.approx(8.03e9, rel=0.01)


def test_model_without_preset_gets_finetune_sized_to_model_and_machine(tmp_path: Path, capsys) -> None:
    model = _model_dir(tmp_path, SMOLLM2)
    assert main(["--model", str(model), "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["name"] == "finetune"
    # A fine-tuning lr, not the debug preset's 3e-3; CPU-sized sequences and batch; two checkpoints of 1.6 GB.
    assert cfg["optim"]["lr"] == 5e-5 and cfg["optim"]["weight_decay"] == 0.0
    assert cfg["data"]["seq_len"] == 256 and cfg["parallel"]["micro_batch_size"] == 2
    assert cfg["checkpoint"]["keep_last"] == 2 and not cfg["model"]["activation_checkpointing"]
    # The launchers pass the model as an override: the same preset is derived.
    assert main(["--set", f"model.path={model}", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "finetune"
    # --set still has the last word.
    assert main(["--model", str(model), "--set", "data.seq_len=512", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["seq_len"] == 512


def test_big_model_on_gpu_gets_checkpointing_lower_lr_and_one_checkpoint() -> None:
    cfg = fit_to_model(preset("finetune"), ModelInfo.from_hf_config("llama-8b", LLAMA_8B), cuda=True)
    assert cfg.data.seq_len == 4096 and cfg.model.activation_checkpointing
    assert cfg.optim.lr == 1e-5 and cfg.checkpoint.keep_last == 1
    assert cfg.parallel.micro_batch_size * cfg.data.seq_len <= 4096


def test_warmup_is_capped_to_a_fraction_of_a_short_run() -> None:
    cfg = preset("llama-1b")  # 200 warmup steps, written for 10k-step runs
    cfg.max_steps = 40
    assert cfg.warmup == 4
    # The peak lr is reached at the cap, not never (the old schedule stayed at 2e-5 x lr for 40 steps).
    assert lr_at(3, 40, cfg.optim) == pytest.approx(cfg.optim.lr)
    assert lr_at(39, 40, cfg.optim) < cfg.optim.lr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "data.seq_len=16384"], "longer than the model's context (8192 tokens"),
        (["--data", "{tmp}/no-such-data.jsonl"], "data path does not exist"),
    ],
)
def test_contradictions_and_typos_fail_before_the_model_loads(
    args: list[str], message: str, tmp_path: Path, capsys
) -> None:
    # The directory has a config but no weights: reaching the weight loading would be a different error.
    model = _model_dir(tmp_path, SMOLLM2)
    data = tmp_path / "ok.txt"
    data.write_text("hello world.\n\n" * 100)
    argv = ["--model", str(model), "--data", str(data), "--output", str(tmp_path / "out")]
    argv += [a.format(tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_not_a_model_directory_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["--model", str(tmp_path), "--data", "x.txt", "--output", str(tmp_path / "o")]) == 2
    assert "not a Hugging Face model directory (no readable config.json" in capsys.readouterr().err


def test_effective_config_is_printed_at_start_and_recorded(corpus: Path, tmp_path: Path) -> None:
    run = run_training("--data", str(corpus), "--output", str(tmp_path), "--max-steps", "3", ranks=1)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "config: preset=debug" in run.stderr and "lr=0.003" in run.stderr and "warmup=0" in run.stderr
    # The cap is announced, not silent: debug's 5 warmup steps against a 3-step run.
    assert "optim.warmup_steps=5 capped to 0" in run.stderr
    start = run.events("start")[0]
    assert start["preset"] == "debug" and start["lr"] == 0.003 and start["warmup"] == 0
    assert start["tokens_per_step"] == 8 * 64
    state = json.loads((tmp_path / "checkpoints" / "step_00000003" / "train_state.json").read_text())
    assert state["config"]["optim"]["lr"] == 0.003
    # The export records the name it is served under.
    assert json.loads((tmp_path / "model" / "llm-platform.json").read_text()) == {
        "served_model_name": f"debug-{tmp_path.name}"
    }
