"""The fused, chunked LM-head + cross-entropy (training/loss.py) equals the reference loss and its gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from training.debug_model import build_model, build_tokenizer
from training.loss import (
    IGNORE_INDEX,
    ChunkedLossHead,
    install_chunked_loss,
    linear_cross_entropy,
    reference_loss,
)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 1000])
def test_loss_and_gradients_equal_the_reference(chunk_tokens: int) -> None:
    torch.manual_seed(0)
    tokens, hidden_size, vocab = 50, 16, 97
    hidden = torch.randn(tokens, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    labels[::5] = IGNORE_INDEX  # ignored rows count neither in the sum nor in the mean

    ref = reference_loss(hidden @ weight.t(), labels)
    ref_gh, ref_gw = torch.autograd.grad(ref * 3.0, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, labels, chunk_tokens)
    got_gh, got_gw = torch.autograd.grad(got * 3.0, (hidden, weight))  # the upstream gradient is applied

    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_all_rows_ignored_gives_zero_not_nan() -> None:
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((4,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_debug_model_loss_and_parameter_gradients_match_the_unfused_model() -> None:
    """Swapped into a real HF Llama: `model(input_ids).logits` is the loss, every parameter gets the reference
    gradient, and the state dict (checkpoints, export) keeps its keys."""
    torch.manual_seed(0)
    reference = build_model(build_tokenizer())
    fused = copy.deepcopy(reference)
    keys = set(fused.state_dict())
    head = install_chunked_loss(fused, chunk_tokens=37)
    assert isinstance(head, ChunkedLossHead) and fused.lm_head is head
    assert set(fused.state_dict()) == keys

    vocab = reference.config.vocab_size
    inputs = torch.randint(0, vocab, (3, 40))
    labels = torch.randint(0, vocab, (3, 40))
    ref = reference_loss(reference(input_ids=inputs).logits, labels)
    ref.backward()
    with head.computing_loss(labels):
        got = fused(input_ids=inputs).logits
    got.backward()

    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    grads = dict(fused.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # outside computing_loss the head is an ordinary Linear (generation, export)
    torch.testing.assert_close(fused(input_ids=inputs).logits, reference(input_ids=inputs).logits)


def test_heads_it_cannot_fuse_are_left_alone() -> None:
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(4, 8, bias=True)
    assert install_chunked_loss(model) is None and type(model.lm_head) is torch.nn.Linear
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(8, 4), torch.zeros(2, dtype=torch.long), 0)


def test_compiled_layers_train_like_eager() -> None:
    """model.compile=true compiles each decoder layer in place. aot_eager traces the same forward and backward
    graphs as inductor without its C++ build (a full inductor run of the debug preset on CPU matched eager's losses
    to 6 decimals but spends ~2 minutes compiling on 2 cores)."""
    from training.parallelize import compile_layers

    torch.manual_seed(0)
    eager = build_model(build_tokenizer())
    compiled = copy.deepcopy(eager)
    heads = [install_chunked_loss(m) for m in (eager, compiled)]
    compile_layers(compiled, backend="aot_eager")
    vocab = eager.config.vocab_size
    for _ in range(2):
        inputs, labels = torch.randint(0, vocab, (2, 24)), torch.randint(0, vocab, (2, 24))
        losses = []
        for model, head in zip((eager, compiled), heads, strict=True):
            with head.computing_loss(labels):
                loss = model(input_ids=inputs).logits
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in compiled.model.layers)


def test_mfu_flops_leave_out_the_input_embedding_unless_tied() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.model import flops_per_token, num_embedding_params, num_params

    shape = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    untied = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    tied = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    assert num_embedding_params(untied) == 1000 * 32  # a lookup: no FLOPs (torchtitan leaves it out too)
    assert num_embedding_params(tied) == 0  # the same matrix is the LM head's matmul: real FLOPs
    dense = num_params(untied) - num_embedding_params(untied)
    assert flops_per_token(untied.config, dense, 128) == 6 * dense + 12 * 2 * 32 * 128


def _torchtitan_flops_per_token(model: torch.nn.Module, n_layers: int, n_heads: int, head_dims: int, seq_len: int,
                                enable_weight_tying: bool) -> int:  # fmt: skip
    """torchtitan/models/utils.py `get_dense_model_nparams_and_flops` @ b5bcd76 (pytorch/torchtitan), verbatim but
    for the return value: `head_dims` is the sum of the qk and v head dimensions (2 x head_dim for Llama)."""
    nparams = sum(p.numel() for p in model.parameters())
    nparams_embedding = sum(
        sum(p.numel() for p in m.parameters()) for m in model.children() if isinstance(m, torch.nn.Embedding)
    )
    nparams_for_matmul = nparams if enable_weight_tying else nparams - nparams_embedding
    return 6 * nparams_for_matmul + 6 * n_layers * n_heads * head_dims * seq_len


def test_mfu_flops_equal_torchtitans_for_a_gqa_model_with_its_own_head_dim() -> None:
    """The attention term is layers x heads x head_dim, not hidden_size: here 8 heads of 16 (128) on a hidden size
    of 64, with 2 key/value heads, as torchtitan counts it. torchtitan's model is not an HF one (its embedding is a
    direct child), so its formula runs on the HF model's inner module for the parameter counts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.model import flops_per_token, layer_params, num_embedding_params, num_params

    shape = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
             "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
    for tied in (False, True):
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=tied))
        dense = num_params(model) - num_embedding_params(model)
        # torchtitan's module tree: embedding, layers, norm and the output projection as direct children
        flat = torch.nn.ModuleDict({"tok_embeddings": model.model.embed_tokens, "layers": model.model.layers,
                                    "norm": model.model.norm, "output": model.lm_head})  # fmt: skip
        expected = _torchtitan_flops_per_token(flat, 3, 8, 2 * 16, 2048, enable_weight_tying=tied)
        assert flops_per_token(model.config, dense, 2048) == expected
        assert 8 * 16 != 64  # the case the old hidden_size term got wrong
    # with full activation checkpointing the layers' forward runs twice: hardware FLOPs add one layer forward
    assert layer_params(model.config) == sum(p.numel() for p in model.model.layers.parameters() if p.ndim == 2)
    recompute = flops_per_token(model.config, dense, 2048, recompute=True) - flops_per_token(model.config, dense, 2048)
    assert recompute == 2 * layer_params(model.config) + 4 * 3 * 8 * 16 * 2048


def test_peak_flops_tell_h100_boards_apart() -> None:
    from training.train import peak_flops_for

    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H100 NVL") == 835e12
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("Some GPU") is None


def test_no_tensor_of_logits_size_is_kept_for_backward() -> None:
    """What saves the memory: the reference keeps [tokens, vocab] logits (and their fp32 copy) alive until backward;
    the fused loss keeps only [tokens, hidden] and [vocab, hidden] gradients."""
    tokens, hidden_size, vocab = 512, 16, 4096
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))

    def largest_saved(fn) -> int:
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return max(sizes)

    assert largest_saved(lambda: reference_loss(hidden @ weight.t(), labels)) >= tokens * vocab
    assert largest_saved(lambda: linear_cross_entropy(hidden, weight, labels, 128)) <= vocab * hidden_size
