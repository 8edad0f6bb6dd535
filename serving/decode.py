"""The decode step of the built-in engine: prefill, one-token steps and sampling over a left-padded batch.

A `DecodeBatch` holds the rows being generated: the KV cache (`[rows, heads, time, dim]` per layer), a 2-D attention
mask over cache time (0 on left padding) and each row's next position. Rows leave (`keep`) when they finish and new
rows join (`merge`) between steps: that is all continuous batching needs on a dynamic cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class DecodeBatch:
    cache: DynamicCache
    attention_mask: torch.Tensor  # [rows, time], 1 where the cache holds a real token
    positions: torch.Tensor  # [rows], position id of each row's next token
    logits: torch.Tensor  # [rows, vocab], logits for each row's next token

    @property
    def rows(self) -> int:
        return int(self.attention_mask.shape[0])

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, then drop cache columns that are padding for every remaining row."""
        idx = torch.tensor(indices, dtype=torch.long, device=self.attention_mask.device)
        self.cache.batch_select_indices(idx)
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

    def merge(self, other: DecodeBatch) -> None:
        """Append `other`'s rows; the shorter cache is left-padded (masked) to the longer one's time length."""
        t_self, t_other = self.attention_mask.shape[1], other.attention_mask.shape[1]
        t = max(t_self, t_other)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, t, dim=2), _left_pad(theirs.keys, t, dim=2)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, t, dim=2), _left_pad(theirs.values, t, dim=2)], dim=0)
        self.attention_mask = torch.cat(
            [_left_pad(self.attention_mask, t, dim=1), _left_pad(other.attention_mask, t, dim=1)], dim=0
        )
        self.positions = torch.cat([self.positions, other.positions])
        self.logits = torch.cat([self.logits, other.logits])


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class Decoder:
    """Runs the model over a `DecodeBatch`. Not thread-safe: one engine thread owns it."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device

    @property
    def supports_merge(self) -> bool:
        """Joining rows mid-flight needs plain dynamic layers (no sliding windows or recurrent state)."""
        cache = DynamicCache(config=self.model.config)
        return all(type(layer) is DynamicLayer for layer in cache.layers)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> DecodeBatch:
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, length - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
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

    @torch.inference_mode()
    def step(self, batch: DecodeBatch, tokens: torch.Tensor) -> None:
        """Feed each row's sampled token; updates the cache, mask, positions and logits in place."""
        batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones((batch.rows, 1))], dim=1)
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


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row: greedy when temperature is 0, else temperature + nucleus (top_p) sampling.

    Rows sample independently so a request's `seed` reproduces its tokens whatever else shares the batch.
    """
    greedy = logits.argmax(dim=-1).tolist()
    tokens: list[int] = []
    for row, p in enumerate(params):
        if p.temperature == 0.0:
            tokens.append(greedy[row])
            continue
        probs = torch.softmax(logits[row] / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        gen = generators[row]
        tokens.append(int(torch.multinomial(probs.cpu(), 1, generator=gen)))
    return tokens
