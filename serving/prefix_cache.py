"""Prefix caching for the built-in engine: KV blocks of prompt prefixes are kept and reused by later requests that
start with the same tokens (a shared system prompt, the chat template's preamble, few-shot examples), so only the
rest of the prompt is prefilled.

The design follows vLLM's automatic prefix caching (https://docs.vllm.ai/en/latest/design/prefix_caching.html):
- a prompt is cut into blocks of `block_size` tokens; a block is identified by its tokens *and* everything before it
  (a hash chain: key = hash(parent key, block tokens)), so a block is reused only after the identical prefix;
- only full blocks are cached, and the prompt's last token is always computed (its logits start the completion);
- memory is bounded (`max_bytes`); least-recently-used blocks are evicted first, and a lookup or insert touches a
  chain from its last block back to its first, so a chain's first blocks are always younger than its later ones and
  eviction removes chains from the end (a block is never kept while its parent is gone).

Exactness: the cached keys/values are the ones the same prefill computes (a token's K/V depend only on the tokens
before it; only the last bit can differ, where a matmul of another shape rounds differently), and each entry stores
its parent key and its own tokens, compared on lookup, so a hash collision can only miss, never return another
prompt's KV. tests/serving/test_serving_prefix_cache.py checks that greedy output with the cache is identical to
without it, token for token (debug model and SmolLM2, through the batching scheduler).

Privacy: blocks are salted by who may share them (`salt`: the API key id by default, so one key never hits
another key's blocks and neither time to first token nor the hit counters tell a key whether anyone else sent a
prompt; keys named in one `--prefix-cache-groups` group share a salt, the group's name). The salt starts each hash
chain and is stored in each block and compared on lookup, so two salts whose hashes collide still never share a block
(vLLM's per-request `cache_salt` does the same by mixing a salt into the first block's hash; its design doc
docs/design/prefix_caching.md, "cache isolation").

A store, not an engine: it matches, inserts and turns blocks into tensors, and never calls the model; the `Decoder`
(serving/decode.py) orchestrates prefill around it. Only the engine thread uses a `PrefixCache` (not thread-safe, no
locks needed).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger("serving.prefix_cache")

# vLLM's default block size (--block-size 16): small enough that a shared system prompt loses at most 15 tokens to
# block rounding, large enough that bookkeeping stays a few Python operations per 16 tokens.
DEFAULT_BLOCK_SIZE = 16


class PrefixCacheObserver(Protocol):
    """Metrics hook for the prefix cache (kept abstract so this module does not depend on Prometheus)."""

    def prefix_cache(self, queried: int, hit: int, bytes_used: int) -> None: ...


@dataclass
class _Block:
    salt: str
    parent: int | None
    tokens: tuple[int, ...]
    kv: torch.Tensor  # [layers, 2 (keys, values), kv_heads, block_size, head_dim]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PrefixCache:
    """KV blocks of prompt prefixes, keyed by a hash chain, evicted least recently used within `max_bytes`."""

    def __init__(
        self, max_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE, observer: PrefixCacheObserver | None = None
    ) -> None:
        if max_bytes <= 0 or block_size <= 0:
            raise ValueError("max_bytes and block_size must be > 0")
        self.max_bytes = max_bytes
        self.block_size = block_size
        self.observer = observer
        self._blocks: collections.OrderedDict[int, _Block] = collections.OrderedDict()  # LRU order, oldest first
        self.bytes_used = 0
        self.queried_tokens = 0
        self.hit_tokens = 0
        self._published = (0, 0)

    def __len__(self) -> int:
        return len(self._blocks)

    # -- lookup and insert ---------------------------------------------------------------------------------------

    def _chain(self, prompt: list[int], blocks: int, salt: str) -> list[tuple[int, int | None, tuple[int, ...]]]:
        """(key, parent key, tokens) of the prompt's first `blocks` full blocks; the salt starts the chain."""
        out: list[tuple[int, int | None, tuple[int, ...]]] = []
        parent: int | None = None
        for i in range(blocks):
            tokens = tuple(prompt[i * self.block_size : (i + 1) * self.block_size])
            key = hash((salt, parent, tokens)) if salt else hash((parent, tokens))
            out.append((key, parent, tokens))
            parent = key
        return out

    def match(self, prompt: list[int], salt: str = "") -> list[_Block]:
        """The cached blocks of this salt that begin `prompt`, leaving at least its last token to compute."""
        found: list[_Block] = []
        keys: list[int] = []
        for key, parent, tokens in self._chain(prompt, (len(prompt) - 1) // self.block_size, salt):
            block = self._blocks.get(key)
            if block is None or block.salt != salt or block.parent != parent or block.tokens != tokens:
                break
            found.append(block)
            keys.append(key)
        self._touch(keys)
        self.queried_tokens += len(prompt)
        self.hit_tokens += len(found) * self.block_size
        return found

    def _touch(self, keys: list[int]) -> None:
        for key in reversed(keys):  # last block first: the chain's head ends up most recently used
            self._blocks.move_to_end(key)

    def insert(self, prompt: list[int], kv: torch.Tensor, salt: str = "") -> None:
        """Cache the full blocks of `prompt` given its KV for every prompt token, `[layers, 2, heads, len, dim]`."""
        chain = self._chain(prompt, len(prompt) // self.block_size, salt)
        keys: list[int] = []
        for i, (key, parent, tokens) in enumerate(chain):
            block = self._blocks.get(key)
            if block is not None:
                if block.salt != salt or block.parent != parent or block.tokens != tokens:
                    break  # a hash collision with another prefix: keep the one we have, cache nothing after it
                keys.append(key)
                continue
            part = kv[:, :, :, i * self.block_size : (i + 1) * self.block_size].clone()
            block = _Block(salt, parent, tokens, part)
            if block.nbytes > self.max_bytes:
                break
            self._blocks[key] = block
            self.bytes_used += block.nbytes
            keys.append(key)
        self._touch(keys)
        self._evict()

    def _evict(self) -> None:
        """Least recently used first. The chain just inserted or matched is the most recent, its head last of all,
        so other prompts' blocks go first, and a chain longer than the whole budget loses its tail, not its head."""
        while self.bytes_used > self.max_bytes:
            _, block = self._blocks.popitem(last=False)
            self.bytes_used -= block.nbytes

    # -- blocks to tensors ---------------------------------------------------------------------------------------

    def gather(self, hits: list[list[_Block]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Matched blocks of several rows as one tensor: `kv` [layers, 2, rows, heads, P, dim] with each row's prefix
        right-aligned to column P (the longest prefix), and `mask` [rows, P] marking each row's real cached tokens."""
        rows = len(hits)
        cached = [len(h) * self.block_size for h in hits]
        longest = max(cached)
        sample = next(h[0].kv for h in hits if h)
        layers, _, heads, _, dim = sample.shape
        kv = sample.new_zeros((layers, 2, rows, heads, longest, dim))
        mask = torch.zeros((rows, longest), dtype=torch.long)
        for row, blocks in enumerate(hits):
            if blocks:
                kv[:, :, row, :, longest - cached[row] :] = torch.cat([b.kv for b in blocks], dim=3)
                mask[row, longest - cached[row] :] = 1
        return kv, mask

    def publish(self) -> None:
        """Report the counters to the observer (once per prefill, not per lookup)."""
        if self.observer is not None:
            self.observer.prefix_cache(
                self.queried_tokens - self._published[0], self.hit_tokens - self._published[1], self.bytes_used
            )
        self._published = (self.queried_tokens, self.hit_tokens)
