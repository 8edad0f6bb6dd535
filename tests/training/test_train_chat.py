"""Chat data (JSONL `messages`): the tokenizer's chat template, loss on assistant tokens only; plain text packed
with a separator that is never an instruct model's end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.data import (
    IGNORE_INDEX,
    DataError,
    PackedLoader,
    build_sequences,
    document_separator,
    read_documents,
    render_chat,
)
from training.debug_model import IM_END, build_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is the fox?"},
    {"role": "assistant", "content": "over the lazy dog."},
    {"role": "user", "content": "And the marker?"},
    {"role": "assistant", "content": "written last."},
]


@pytest.fixture(scope="module")
def base_tok():
    """The debug tokenizer with no chat template: a base model, whose EOS separates documents."""
    tok = build_tokenizer()
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module")
def instruct_tok():
    """Shaped like SmolLM2-Instruct / Qwen-Instruct: EOS is the end-of-turn token of the chat template."""
    tok = build_tokenizer()
    tok.eos_token = IM_END
    return tok


def test_chat_renders_with_the_template_and_trains_only_assistant_turns(instruct_tok) -> None:
    ids, mask = render_chat(instruct_tok, CHAT)
    # Token for token what the serving side's apply_chat_template produces for the same conversation.
    assert ids == instruct_tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    trained = instruct_tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    # The end-of-turn token is trained: it is what teaches the model to stop.
    assert trained == f"over the lazy dog.{IM_END}\nwritten last.{IM_END}\n"
    context = instruct_tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert "Where is the fox?" in context and "Be brief." in context and "lazy" not in context


def test_chat_labels_are_ignored_outside_assistant_turns(instruct_tok, tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(40)))
    seqs = build_sequences(data, instruct_tok, 32, "text")
    assert seqs.dim() == 3 and seqs.shape[1] == 2
    inputs, labels = PackedLoader(seqs, 4, 0, 1, 0).next_batch()
    assert inputs.shape == labels.shape == (4, 32)
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()
    # Every window trains on something (windows of only system/user tokens are dropped: they would be NaN).
    assert bool(seqs[:, 1, 1:].any(dim=1).all())
    trained = set(labels[labels != IGNORE_INDEX].tolist())
    user_only = set(instruct_tok("Where is the fox? And the marker? Be brief.")["input_ids"]) - set(
        instruct_tok("over the lazy dog. written last.")["input_ids"]
    )
    assert not trained & user_only


def test_plain_text_separator_is_never_the_end_of_turn_token(base_tok, instruct_tok, tmp_path: Path) -> None:
    data = tmp_path / "docs.txt"
    data.write_text("the quick brown fox jumps over the lazy dog.\n\n" * 60)
    end_of_turn = instruct_tok.convert_tokens_to_ids(IM_END)
    end_of_text = instruct_tok.convert_tokens_to_ids("<|endoftext|>")
    # An instruct model: end-of-text between documents, and no end-of-turn anywhere in the packed text.
    assert document_separator(instruct_tok) == end_of_text
    packed = build_sequences(data, instruct_tok, 32, "text")
    assert end_of_turn not in packed.unique().tolist() and end_of_text in packed.unique().tolist()
    # A base model (no chat template): its EOS is the document separator, as before.
    assert document_separator(base_tok) == base_tok.eos_token_id


def test_mixed_text_and_chats_and_bad_chat_records(instruct_tok, tmp_path: Path) -> None:
    data = tmp_path / "mixed.jsonl"
    rows = [{"messages": CHAT}, {"text": "a plain paragraph about checkpoints."}] * 30
    data.write_text("\n".join(json.dumps(r) for r in rows))
    seqs = build_sequences(data, instruct_tok, 32, "text")
    assert seqs.dim() == 3  # chat present: (tokens, mask) windows; plain text in them is fully trained
    bad = tmp_path / "bad.jsonl"
    for record, message in [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "string 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "at least one 'assistant' message"),
    ]:
        bad.write_text(json.dumps(record) + "\n")
        with pytest.raises(DataError, match=message):
            read_documents([bad], "text")


def test_chat_data_needs_a_chat_template(base_tok, tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        build_sequences(data, base_tok, 16, "text")


def test_loss_ignores_masked_labels() -> None:
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[1, IGNORE_INDEX, 2]])
    full = torch.nn.functional.cross_entropy(logits.view(-1, 5), labels.view(-1))
    kept = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([1, 2]))
    assert full == pytest.approx(kept.item())
