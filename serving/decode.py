"""The decode step of the built-in engine: prefill, one-token steps and sampling over a left-padded batch.

A `DecodeBatch` holds the rows being generated: the KV cache (`[rows, heads, time, dim]` per layer), a 2-D attention
mask over cache time (0 on left padding) and each row's next position. Rows leave (`keep`) when they finish and new
rows join (`merge`) between steps: that is all continuous batching needs on a dynamic cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from serving.prefix_cache import PrefixCache
from serving.quantize import fused_fn, linear_fn
from serving.sampling import SamplingParams, sample

__all__ = ["DecodeBatch", "Decoder", "SamplingParams", "sample"]


@dataclass
class DecodeBatch:
    """The rows being decoded together: their KV cache, masks, positions and next-token logits."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [rows, time], 1 where the cache holds a real token
    positions: torch.Tensor  # [rows], position id of each row's next token
    logits: torch.Tensor  # [rows, vocab], logits for each row's next token

    @property
    def rows(self) -> int:
        """The number of rows (requests) in the batch."""
        return int(self.attention_mask.shape[0])

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, then drop cache columns that are padding for every remaining row."""
        idx = torch.tensor(indices, dtype=torch.long, device=self.attention_mask.device)
        self.cache.batch_select_indices(idx)
        _drop_room(self.cache)
        self.attention_mask = self.attention_mask[idx]
        self.positions = self.positions[idx]
        self.logits = self.logits[idx]
        used = self.attention_mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        if first:
            self.attention_mask = self.attention_mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def merge(self, *others: DecodeBatch) -> None:
        """Append the rows of `others`, in order; every cache is left-padded (masked) to the longest time length.
        One concatenation per layer whatever the number of batches: each merge copies the whole cache, so joiners
        arriving together are merged at once (a 16-row SmolLM2 cache at 100 steps is ~70 MB)."""
        batches = [self, *others]
        t = max(b.attention_mask.shape[1] for b in batches)
        for b in batches:
            _drop_room(b.cache)
        for i, mine in enumerate(self.cache.layers):
            layers = [b.cache.layers[i] for b in batches]
            mine.keys = torch.cat([_left_pad(layer.keys, t, dim=2) for layer in layers], dim=0)
            mine.values = torch.cat([_left_pad(layer.values, t, dim=2) for layer in layers], dim=0)
        self.attention_mask = torch.cat([_left_pad(b.attention_mask, t, dim=1) for b in batches], dim=0)
        self.positions = torch.cat([b.positions for b in batches])
        self.logits = torch.cat([b.logits for b in batches])


def _drop_room(cache: DynamicCache) -> None:
    """Forget the growth buffers of `_append_kv` (their memory goes with the views that still use it)."""
    for layer in cache.layers:
        layer.__dict__.pop("_kv_room", None)


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class Decoder:
    """Runs the model over a `DecodeBatch`. Not thread-safe: one engine thread owns it."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int, prefix_cache: PrefixCache | None = None) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self._fast = _LlamaStep(model) if _LlamaStep.supports(model) else None
        # reusing cached KV needs the same plain per-layer cache that merging rows needs
        self.prefix_cache = prefix_cache if prefix_cache is not None and self.supports_merge else None

    @property
    def supports_merge(self) -> bool:
        """Joining rows mid-flight needs plain dynamic layers (no sliding windows or recurrent state)."""
        cache = DynamicCache(config=self.model.config)
        return all(type(layer) is DynamicLayer for layer in cache.layers)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], salts: list[str] | None = None) -> DecodeBatch:
        """Prefill whole prompts (through the prefix cache when one is set, each row's blocks under its salt): a batch
        ready for its first sample."""
        if self.prefix_cache is None:
            return self.prefill_full(prompts)
        salts = salts or [""] * len(prompts)
        hits = [self.prefix_cache.match(p, s) for p, s in zip(prompts, salts, strict=True)]
        if any(hits):
            kv, prefix_mask = self.prefix_cache.gather(hits)
            cached = [len(h) * self.prefix_cache.block_size for h in hits]
            batch = self.prefill_after(kv, prefix_mask, [p[n:] for p, n in zip(prompts, cached, strict=True)])
        else:
            batch = self.prefill_full(prompts)
        self._store(prompts, salts, batch, [len(h) for h in hits])
        self.prefix_cache.publish()
        return batch

    @torch.inference_mode()
    def prefill_begin(self, prompt: list[int], tokens: int, salt: str = "") -> DecodeBatch:
        """The first chunk of a prompt prefilled in chunks: what the prefix cache holds, then up to `tokens` more (at
        least one); `positions` tells how much of the prompt the batch's cache holds."""
        cached = 0
        if self.prefix_cache is not None:
            hit = self.prefix_cache.match(prompt, salt)
            cached = len(hit) * self.prefix_cache.block_size
            self.prefix_cache.publish()
        end = min(len(prompt), cached + max(1, tokens))
        if cached:
            kv, prefix_mask = self.prefix_cache.gather([hit])  # type: ignore[union-attr]
            batch = self.prefill_after(kv, prefix_mask, [prompt[cached:end]])
        else:
            batch = self.prefill_full([prompt[:end]])
        if end == len(prompt):
            self._store([prompt], [salt], batch, [cached // self.prefix_cache.block_size] if cached else [0])
        return batch

    @torch.inference_mode()
    def prefill_more(self, batch: DecodeBatch, prompt: list[int], tokens: int, salt: str = "") -> None:
        """The next chunk (up to `tokens`) of a one-row batch `prefill_begin` started; caches the prompt's blocks when
        the chunk is its last."""
        done = int(batch.positions[0])
        end = min(len(prompt), done + max(1, tokens))
        mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones((1, end - done))], dim=1)
        ids = torch.tensor([prompt[done:end]], dtype=torch.long, device=self.device)
        positions = torch.arange(done, end, device=self.device)[None]
        batch.cache, batch.logits = self._extend(batch.cache, ids, mask, positions)
        batch.attention_mask, batch.positions = mask, batch.positions + (end - done)
        if end == len(prompt):
            self._store([prompt], [salt], batch, [0])

    def _store(self, prompts: list[list[int]], salts: list[str], batch: DecodeBatch, matched: list[int]) -> None:
        """Cache the full blocks of each prompt the cache did not already hold, from the batch's KV."""
        if self.prefix_cache is None:
            return
        size = self.prefix_cache.block_size
        real = batch.attention_mask.bool()
        for row, prompt in enumerate(prompts):
            if len(prompt) // size <= matched[row]:
                continue  # every full block came from the cache (or there is none)
            cols = real[row].nonzero().squeeze(-1)[: len(prompt) // size * size]
            kv = torch.stack(
                [torch.stack([layer.keys[row][:, cols], layer.values[row][:, cols]]) for layer in batch.cache.layers]
            )
            self.prefix_cache.insert(prompt, kv, salts[row])

    def prefill_full(self, prompts: list[list[int]]) -> DecodeBatch:
        """Prefill the prompts from their first token, left-padded to the longest."""
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, length - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        if self._fast is not None:
            cache, logits = self._fast.prefill(ids, mask, position_ids)
            return DecodeBatch(cache=cache, attention_mask=mask, positions=mask.sum(-1), logits=logits)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True
        )
        return DecodeBatch(
            cache=out.past_key_values,
            attention_mask=mask,
            positions=mask.sum(-1),
            logits=out.logits[:, -1, :].float(),
        )

    def prefill_after(self, kv: torch.Tensor, prefix_mask: torch.Tensor, rests: list[list[int]]) -> DecodeBatch:
        """Prefill `rests` after cached keys/values `kv` ([layers, 2, rows, heads, P, dim], `prefix_mask` [rows, P]
        marking each row's real cached tokens; `PrefixCache.gather` builds both)."""
        cache = DynamicCache(config=self.model.config)
        for i in range(kv.shape[0]):
            cache.update(kv[i, 0].to(self.device), kv[i, 1].to(self.device), i)
        length = max(len(r) for r in rests)
        ids = torch.full((len(rests), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rests), length), dtype=torch.long)
        for row, rest in enumerate(rests):
            ids[row, length - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            mask[row, length - len(rest) :] = 1
        mask = torch.cat([prefix_mask, mask], dim=1).to(self.device)
        ids = ids.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -length:]
        cache, logits = self._extend(cache, ids, mask, position_ids)
        return DecodeBatch(cache=cache, attention_mask=mask, positions=mask.sum(-1), logits=logits)

    def _extend(
        self, cache: DynamicCache, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[DynamicCache, torch.Tensor]:
        """Run `ids` after what `cache` holds (`mask` covers both): the cache and each row's last-position logits."""
        if self._fast is not None:
            return cache, self._fast.extend(cache, ids, mask, position_ids)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True
        )
        return out.past_key_values, out.logits[:, -1, :].float()

    @torch.inference_mode()
    def step(self, batch: DecodeBatch, tokens: torch.Tensor) -> None:
        """Feed each row's sampled token; updates the cache, mask, positions and logits in place."""
        batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones((batch.rows, 1))], dim=1)
        if self._fast is not None:
            batch.logits = self._fast.step(batch, tokens.to(self.device))
            batch.positions = batch.positions + 1
            return
        out = self.model(
            input_ids=tokens.view(-1, 1).to(self.device),
            attention_mask=batch.attention_mask,
            position_ids=batch.positions.view(-1, 1),
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.cache = out.past_key_values
        batch.positions = batch.positions + 1
        batch.logits = out.logits[:, -1, :].float()


class _LlamaStep:
    """Prefill and decode steps of a plain `LlamaForCausalLM` (the debug model's architecture) written as straight
    tensor calls on the model's own weights, in the same order as its `forward` (logits equal to the last bit in a
    batch-16 comparison with left padding and rows leaving mid-flight; tests/serving checks greedy output against
    `generate`).

    Why: for small models the step is dominated by Python, not kernels (module calls, mask construction, cache
    bookkeeping: a batch-16 step of the debug model took 2.9 ms through `forward`, 1.9 ms here), and that Python holds
    the GIL the HTTP event loop needs. Any other architecture uses the model's `forward`.
    """

    # RoPE variants that only change the frequencies, once, at load (transformers modeling_rope_utils.py @ v5.23.0:
    # `_compute_linear_scaling_rope_parameters` divides inv_freq by the factor, `_compute_llama3_parameters` smooths
    # it by wavelength; both return attention_factor 1.0). The model's `rotary_emb.inv_freq` buffer already holds the
    # result, which this step uses as is. Not here: "dynamic" (recomputes inv_freq from the sequence length at every
    # forward), yarn and longrope (scale cos/sin too, attention_scaling != 1).
    STATIC_ROPE = frozenset({"default", "linear", "llama3"})

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        cfg = model.config
        rope = getattr(cfg, "rope_parameters", None) or {}
        return (
            type(model).__name__ == "LlamaForCausalLM"
            and getattr(cfg, "hidden_act", "") == "silu"
            and rope.get("rope_type", "default") in _LlamaStep.STATIC_ROPE
            and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False)
            and getattr(cfg, "pretraining_tp", 1) == 1
            and float(getattr(model.model.rotary_emb, "attention_scaling", 1.0)) == 1.0
        )

    def __init__(self, model: PreTrainedModel) -> None:
        inner = model.model
        attn = inner.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.heads = int(model.config.num_attention_heads)
        self.kv_heads = int(model.config.num_key_value_heads)
        self.scaling = float(attn.scaling)
        self.config = model.config
        self.embed = inner.embed_tokens.weight
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.norm = (inner.norm.weight, float(inner.norm.variance_epsilon))
        # projections as callables: plain or quantized Linear layers (serving/quantize.py) keep this fast path
        self.lm_head = linear_fn(model.lm_head)
        self.layers = [
            (
                (layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon)),
                # q/k/v and gate/up each read one input: int8 layers run as one fused matmul (serving/quantize.py)
                fused_fn([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                linear_fn(layer.self_attn.o_proj),
                (layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon)),
                fused_fn([layer.mlp.gate_proj, layer.mlp.up_proj]),
                linear_fn(layer.mlp.down_proj),
            )
            for layer in inner.layers
        ]

    def step(self, batch: DecodeBatch, tokens: torch.Tensor) -> torch.Tensor:
        """Logits for one new token per row (the mask already includes it); appends its keys/values to the cache."""
        rows = tokens.shape[0]
        mask = batch.attention_mask.bool()[:, None, None, :]  # [rows, 1, 1, time]: padding only (one query)
        return self._forward(batch.cache, tokens.view(rows, 1), batch.positions.view(rows, 1), mask, append=True)

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> tuple[DynamicCache, torch.Tensor]:
        """A fresh cache and each row's last-position logits for left-padded prompts."""
        length = ids.shape[1]
        causal = torch.ones((length, length), dtype=torch.bool, device=ids.device).tril()
        attend = causal & mask.bool()[:, None, :]  # [rows, query, key]
        # a padding query sees no real key: let it see itself so softmax stays finite (its output is never used)
        attend |= torch.eye(length, dtype=torch.bool, device=ids.device)
        cache = DynamicCache(config=self.config)
        return cache, self._forward(cache, ids, positions, attend[:, None], append=False)

    def extend(
        self, cache: DynamicCache, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Like `prefill`, after the keys/values already in `cache`: `mask` [rows, cached + length] covers both."""
        length, total = ids.shape[1], mask.shape[1]
        # query i sits at column total - length + i and sees every real key up to it
        causal = torch.ones((length, total), dtype=torch.bool, device=ids.device).tril(diagonal=total - length)
        attend = causal & mask.bool()[:, None, :]
        attend[:, :, total - length :] |= torch.eye(length, dtype=torch.bool, device=ids.device)
        return self._forward(cache, ids, positions, attend[:, None], append=True)

    def _forward(
        self, cache: DynamicCache, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, append: bool
    ) -> torch.Tensor:
        rows, length, hd = ids.shape[0], ids.shape[1], self.head_dim
        x = F.embedding(ids, self.embed)  # [rows, length, hidden]
        freqs = positions[..., None].float() * self.inv_freq  # [rows, length, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [rows, 1, length, hd]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        gqa = self.heads != self.kv_heads
        for i, (norm1, wqkv, wo, norm2, wgu, wd) in enumerate(self.layers):
            h = _rms_norm(x, *norm1)
            q, k, v = wqkv(h)
            q = _rotate(q.view(rows, length, self.heads, hd).transpose(1, 2), cos, sin)
            k = _rotate(k.view(rows, length, self.kv_heads, hd).transpose(1, 2), cos, sin)
            v = v.view(rows, length, self.kv_heads, hd).transpose(1, 2)
            if append:
                k, v = _append_kv(cache.layers[i], k, v)
            else:
                # own memory, not a view of the fused q/k/v output (the cache would keep all of it alive)
                k, v = cache.update(k, v.contiguous(), i)
            if length == 1 and gqa:  # as transformers does: the query heads of a kv head become its queries
                a = F.scaled_dot_product_attention(
                    q.reshape(rows, self.kv_heads, -1, hd), k, v, attn_mask=mask, scale=self.scaling
                ).reshape(rows, self.heads, 1, hd)
            elif gqa:
                # A masked prefill repeats the key/value heads, as transformers' sdpa_attention_forward does when a
                # mask is present (integrations/sdpa_attention.py @ v5.23.0, `use_gqa_in_sdpa`): with a mask,
                # enable_gqa sends CUDA to the math backend, whose memory grows with length^2.
                a = F.scaled_dot_product_attention(
                    q, _repeat_kv(k, self.heads // self.kv_heads), _repeat_kv(v, self.heads // self.kv_heads),
                    attn_mask=mask, scale=self.scaling,
                )  # fmt: skip
            else:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
            x = x + wo(a.transpose(1, 2).reshape(rows, length, -1))
            h = _rms_norm(x, *norm2)
            g, u = wgu(h)
            x = x + wd(F.silu(g) * u)
        return self.lm_head(_rms_norm(x[:, -1, :], *self.norm)).float()


KV_ROOM_MIN = 64
"""Time steps of room a layer's cache grows by at least (and by an eighth of its length when that is more)."""
KV_ROOM_FROM = 320
"""Cache length from which appends write into room (`_append_kv`); shorter caches are concatenated."""


def _append_kv(layer: DynamicLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append `k`/`v` ([rows, kv_heads, n, dim]) to a layer's cache; the layer's keys and values after it.

    Past KV_ROOM_FROM steps the cache lives in buffers with room to grow along time: `layer.keys` is a view of its
    first `time` steps, and an append writes into the room instead of copying the whole cache, as `torch.cat` does
    (per layer per step: 28% of a 16-row int8 SmolLM2 step at 800 tokens of context, torch profiler). The room is
    max(KV_ROOM_MIN, time / 8) steps, so copies happen O(log time) times per sequence and at most an eighth of the
    cache is unused. Measured (bench/kv_room.py: SmolLM2, 1 thread, 16 rows, configurations alternating): at 800
    tokens room is 1.35x faster per step for int8 and 1.21x for fp32; at 100 tokens concatenating is 1.04x faster for
    int8 and even for fp32 (attention then reads keys `cat` has just written, still in cache), hence the threshold.
    Writes go only past every existing view's end, so a view taken earlier (the prefix cache's copy, a forked batch)
    never changes. Anything that replaced `layer.keys` (`keep`, `merge`, a new cache) owns no room: the next append
    copies once into a fresh buffer."""
    keys, values = layer.keys, layer.values
    t, n = keys.shape[-2], k.shape[-2]
    room = layer.__dict__.get("_kv_room")
    if room is not None and room[2] is keys and room[3] is values and t + n <= room[0].shape[-2]:
        kbuf, vbuf = room[0], room[1]
    elif t + n < KV_ROOM_FROM:
        layer.keys, layer.values = torch.cat([keys, k], dim=-2), torch.cat([values, v], dim=-2)
        layer.__dict__.pop("_kv_room", None)
        return layer.keys, layer.values
    else:
        capacity = t + n + max(KV_ROOM_MIN, (t + n) // 8)
        kbuf = keys.new_empty((*keys.shape[:-2], capacity, keys.shape[-1]))
        vbuf = values.new_empty((*values.shape[:-2], capacity, values.shape[-1]))
        kbuf[..., :t, :] = keys
        vbuf[..., :t, :] = values
    kbuf[..., t : t + n, :] = k
    vbuf[..., t : t + n, :] = v
    layer.keys, layer.values = kbuf[..., : t + n, :], vbuf[..., : t + n, :]
    layer.__dict__["_kv_room"] = (kbuf, vbuf, layer.keys, layer.values)
    return layer.keys, layer.values


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[rows, kv_heads, time, dim] -> [rows, kv_heads * n_rep, time, dim], each kv head repeated for its query heads
    (transformers' `repeat_kv`)."""
    rows, kv_heads, time, dim = x.shape
    return x[:, :, None].expand(rows, kv_heads, n_rep, time, dim).reshape(rows, kv_heads * n_rep, time, dim)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
