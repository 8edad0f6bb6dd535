"""The Llama fast decode path on the shapes real Llama-3.x checkpoints have: llama3 (and linear) RoPE scaling and
grouped-query attention. Logits must equal the model's own `forward` (transformers' reference), and the masked
prefill must not hand SDPA a boolean mask together with `enable_gqa` (on CUDA that pair runs the O(length^2) math
backend)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from serving.decode import DecodeBatch, Decoder

ROPES: dict[str, dict[str, Any]] = {
    # Llama 3.1/3.2's own scaling block, with original_max_position_embeddings shrunk so that the smoothing band
    # (wavelengths between 16/4 and 16/1 positions) covers some of this tiny head's frequencies
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "default": {"rope_type": "default", "rope_theta": 10000.0},
}  # fmt: skip


def tiny_llama(rope: dict[str, Any]) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         rope_parameters=rope, attn_implementation="sdpa")  # fmt: skip
    return LlamaForCausalLM(config).eval()


def reference_next_logits(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """The last position's logits of the unpadded sequence through the model's own forward."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def assert_reference_logits_then_step(
    model: LlamaForCausalLM, decoder: Decoder, batch: DecodeBatch, sequences: list[list[int]], check: bool = True
) -> None:
    """Every row's logits equal the reference's (when `check`), then one greedy step, appended to `sequences`."""
    if check:
        for row, seq in enumerate(sequences):
            torch.testing.assert_close(batch.logits[row], reference_next_logits(model, seq), rtol=1e-5, atol=1e-5)
    tokens = batch.logits.argmax(-1)
    for row, seq in enumerate(sequences):
        seq.append(int(tokens[row]))
    decoder.step(batch, tokens)


PROMPTS = [[5, 17, 3, 88, 41, 9, 60, 2, 14, 33, 71, 25, 6, 90, 12, 48, 30, 7, 66, 19, 54, 3],
           [11, 4, 76], [40, 2, 93, 18, 27, 8, 61, 35, 50]]  # fmt: skip


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_fast_path_logits_equal_transformers_forward(rope: str) -> None:
    """Prefill of a left-padded batch, then greedy steps: every row's logits equal the reference's at every step."""
    model = tiny_llama(ROPES[rope])
    assert model.model.rotary_emb.rope_type == rope
    decoder = Decoder(model, pad_token_id=0)
    assert decoder._fast is not None, f"rope_type {rope} fell back to the generic path"
    batch = decoder.prefill([list(p) for p in PROMPTS])
    sequences = [list(p) for p in PROMPTS]
    for _ in range(6):
        assert_reference_logits_then_step(model, decoder, batch, sequences)


def test_rope_types_that_rescale_at_run_time_keep_the_generic_path() -> None:
    dynamic = tiny_llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    yarn = tiny_llama({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                       "original_max_position_embeddings": 64})  # fmt: skip
    assert Decoder(dynamic, pad_token_id=0)._fast is None and Decoder(yarn, pad_token_id=0)._fast is None


def test_masked_gqa_prefill_never_pairs_a_mask_with_enable_gqa(monkeypatch: pytest.MonkeyPatch) -> None:
    """The masked prefill (and the prefix-cache extend) repeat the key/value heads as transformers does; the
    one-token step packs the query heads instead. Either way SDPA never gets a mask and enable_gqa together."""
    calls: list[tuple[bool, bool, int, int]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        calls.append((kwargs.get("attn_mask") is not None, bool(kwargs.get("enable_gqa")), q.shape[1], k.shape[1]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_llama(ROPES["llama3"])
    decoder = Decoder(model, pad_token_id=0)
    batch = decoder.prefill([list(p) for p in PROMPTS])
    decoder.step(batch, batch.logits.argmax(-1))
    assert calls and not any(masked and gqa for masked, gqa, _, _ in calls)
    prefill_calls = calls[: model.config.num_hidden_layers]
    assert all(q_heads == k_heads == 8 for _, _, q_heads, k_heads in prefill_calls)  # kv heads repeated 2 -> 8
    # the cache keeps the 2 key/value heads (the repeat is per call, not stored)
    assert batch.cache.layers[0].keys.shape[1] == 2
