"""The debug model is the fixture every other area builds on: it must load, chat and generate offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import REPO_ROOT
from training.debug_model import IM_END, write_debug_model


def test_debug_model_loads_chats_and_generates(tmp_path: Path) -> None:
    out = write_debug_model(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 2_000_000
    assert model.config.vocab_size == len(tok)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_tokens_to_ids(IM_END) in model.generation_config.eos_token_id

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert tok.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
    text = "The capital of France is Paris."
    assert tok.decode(tok(text).input_ids) == text


def test_cli_is_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        subprocess.run(
            [sys.executable, "-m", "training.debug_model", "--out", str(tmp_path / name)],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
