"""The decode cache's room to grow (`serving.decode._append_kv`): appends past KV_ROOM_FROM write into spare time
steps instead of concatenating, and that changes no result."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import serving.decode as decode
from serving.decode import Decoder
from tests.serving.test_serving_decode_llama3 import PROMPTS, ROPES, assert_reference_logits_then_step, tiny_llama


def _layer(time: int) -> DynamicLayer:
    layer = DynamicLayer()
    k = torch.randn(2, 3, time, 4)
    layer.lazy_initialization(k, k)
    layer.keys, layer.values = k, -k
    return layer


def test_appends_equal_concatenation_and_reuse_the_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "KV_ROOM_FROM", 0)
    layer = _layer(5)
    expected_k, expected_v = layer.keys, layer.values
    first = None
    for step in range(decode.KV_ROOM_MIN + 3):
        new = torch.randn(2, 3, 1, 4)
        keys, values = decode._append_kv(layer, new, -new)
        expected_k, expected_v = torch.cat([expected_k, new], dim=-2), torch.cat([expected_v, -new], dim=-2)
        assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
        assert keys is layer.keys and values is layer.values
        if step == 0:
            first = keys.untyped_storage().data_ptr()
        elif step < decode.KV_ROOM_MIN:  # 5 + 1 steps fit in a room of 64 more: no copy until it is used up
            assert keys.untyped_storage().data_ptr() == first
    assert layer.keys.untyped_storage().data_ptr() != first, "past its room the cache moves to a larger buffer"


def test_an_earlier_view_never_changes_and_a_replaced_cache_gets_new_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "KV_ROOM_FROM", 0)
    layer = _layer(4)
    decode._append_kv(layer, torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4))
    held = layer.keys  # e.g. the prefix cache's or a forked batch's reference
    snapshot = held.clone()
    decode._append_kv(layer, torch.full((2, 3, 1, 4), 7.0), torch.full((2, 3, 1, 4), 7.0))
    assert torch.equal(held, snapshot)
    # `keep` replaces the tensors (rows selected): the stale room must not be written through
    layer.keys, layer.values = layer.keys[[1]], layer.values[[1]]
    before = layer.keys.clone()
    keys, _ = decode._append_kv(layer, torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))
    assert torch.equal(keys[..., :-1, :], before) and keys.shape == (1, 3, 7, 4)
    assert torch.equal(held, snapshot)


def test_short_caches_are_concatenated() -> None:
    layer = _layer(3)
    decode._append_kv(layer, torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4))
    assert "_kv_room" not in layer.__dict__ and layer.keys.is_contiguous()


@pytest.mark.parametrize("room_from", [0, 10**9])
def test_decoding_through_the_room_gives_the_reference_logits(room_from: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill, steps, a row leaving (`keep`) and one joining (`merge`), with the room on from the first append
    and off: every row's logits equal the model's own forward at every step."""
    monkeypatch.setattr(decode, "KV_ROOM_FROM", room_from)
    model = tiny_llama(ROPES["default"])
    decoder = Decoder(model, pad_token_id=0)
    batch = decoder.prefill([list(p) for p in PROMPTS])
    sequences = [list(p) for p in PROMPTS]
    for step in range(decode.KV_ROOM_MIN + 6):
        if step == 3:
            batch.keep([0, 2])
            sequences = [sequences[0], sequences[2]]
        if step == 5:
            joiner = [9, 8, 7, 6]
            batch.merge(decoder.prefill([joiner]))
            sequences.append(list(joiner))
        check = step % 7 == 0 or step > decode.KV_ROOM_MIN
        assert_reference_logits_then_step(model, decoder, batch, sequences, check)
    if room_from == 0:
        assert "_kv_room" in batch.cache.layers[0].__dict__


def test_merging_several_batches_at_once_equals_merging_them_one_by_one() -> None:
    """`merge(a, b)` (what the engine does with every joiner of an iteration: one copy of the cache) gives the same
    cache, mask, positions and logits, bit for bit, as `merge(a)` then `merge(b)`; and the logits stay the model's."""
    model = tiny_llama(ROPES["default"])
    decoder = Decoder(model, pad_token_id=0)
    joiners = [[9, 8, 7, 6, 5, 4, 3], [11, 12]]
    at_once, one_by_one = (decoder.prefill([list(p) for p in PROMPTS]) for _ in range(2))
    at_once.merge(*(decoder.prefill([j]) for j in joiners))
    for joiner in joiners:
        one_by_one.merge(decoder.prefill([joiner]))
    assert torch.equal(at_once.attention_mask, one_by_one.attention_mask)
    assert torch.equal(at_once.positions, one_by_one.positions) and torch.equal(at_once.logits, one_by_one.logits)
    for a, b in zip(at_once.cache.layers, one_by_one.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    sequences = [*(list(p) for p in PROMPTS), *joiners]
    for _ in range(3):
        assert_reference_logits_then_step(model, decoder, at_once, sequences, True)
