"""An instruct model keeps finishing its answers after fine-tuning, on chat data and on plain text.

A tiny instruct model shaped like SmolLM2-Instruct (EOS = `<|im_end|>`, the chat template's end of turn, the only
stop token) is first taught to answer in two paragraphs and stop (chat data: the loss covers the answer and its
end-of-turn). It is then fine-tuned on plain text. Packing that text with EOS after every paragraph (what the
trainer used to do) teaches "end of turn after a paragraph", and the model then ends its answer after the first
one; with the document separator it must keep answering in full and then stop.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import run_training
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from training.debug_model import IM_END, write_debug_model

QUESTION = "where is the fox?"
ANSWER = "over the lazy dog.\n\nevery rank reads its own share of the data."


def _instruct_model(path: Path) -> Path:
    write_debug_model(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.eos_token = IM_END
    tok.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    im_end = tok.convert_tokens_to_ids(IM_END)
    model.config.eos_token_id = im_end
    model.generation_config = GenerationConfig(eos_token_id=im_end, pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    return path


def _answer(model_dir: Path) -> tuple[str, bool]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=48, do_sample=False)[0, prompt["input_ids"].shape[1] :].tolist()
    im_end = tok.convert_tokens_to_ids(IM_END)
    finished = im_end in out
    return tok.decode(out[: out.index(im_end)] if finished else out), finished


@pytest.fixture(scope="module")
def instruct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after chat fine-tuning: answers QUESTION with ANSWER and stops."""
    tmp = tmp_path_factory.mktemp("instruct")
    chats = tmp / "chats.jsonl"
    chats.write_text(
        "\n".join(
            json.dumps({"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]})
            for _ in range(200)
        )
    )
    run = run_training("--model", str(_instruct_model(tmp / "base")), "--data", str(chats), "--output",
                       str(tmp / "run"), "--max-steps", "60", "--save-every", "0", ranks=1)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "run" / "model"


def test_chat_fine_tuning_teaches_the_model_to_finish(instruct: Path) -> None:
    text, finished = _answer(instruct)
    assert finished and text.strip() == ANSWER, text


@pytest.mark.parametrize("separator", ["end-of-text", "end-of-turn"])
def test_plain_text_fine_tuning_keeps_answers_whole(
    separator: str, instruct: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.data
    from training.__main__ import main

    if separator == "end-of-turn":  # the control: what packing did before, EOS (= end of turn) after each document
        monkeypatch.setattr(training.data, "document_separator", lambda tok: tok.eos_token_id)
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(["the quick brown fox jumps over the lazy dog.", "a checkpoint is complete."] * 300))
    # A fine-tuning lr for this tiny model (the debug preset's 3e-3 rewrites it entirely in a few steps).
    args = ["--preset", "debug", "--model", str(instruct), "--data", str(text), "--output", str(tmp_path / "run"),
            "--max-steps", "20", "--save-every", "0", "--set", "optim.lr=6e-4"]  # fmt: skip
    assert main(args) == 0
    answer, finished = _answer(tmp_path / "run" / "model")
    assert finished, f"the model no longer ends its turn: {answer!r}"
    if separator == "end-of-text":
        assert answer.strip() == ANSWER, f"the answer was cut short or changed: {answer!r}"
    else:
        # The failure the separator prevents: the answer ends after its first paragraph.
        assert answer.strip() == ANSWER.split("\n\n")[0], answer
