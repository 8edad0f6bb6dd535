"""Prompt scoring for the built-in engine: the log-probability of every prompt token given the ones before it.

What `echo` + `logprobs` on completions returns for the prompt (eval harnesses' loglikelihood requests: lm-eval's
`local-completions` sends `echo=True, max_tokens=0, logprobs=1` and reads `token_logprobs`), as vLLM's
`prompt_logprobs` (vllm/entrypoints/openai/serving_completion.py: the first prompt token has none).

The prompt runs through the model's own `forward` in chunks of `chunk` positions over one KV cache, so the logits
held at once are `chunk x vocabulary` whatever the prompt's length (a whole 8k-token prompt of a 49k vocabulary would
be 1.6 GB of float32). Raw log-softmax of the model's logits, as the generated tokens' logprobs
(serving/sampling.py `logprobs`).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

DEFAULT_CHUNK = 256

TokenScore = tuple[float | None, tuple[tuple[int, float], ...]]


@torch.inference_mode()
def prompt_logprobs(model: PreTrainedModel, ids: list[int], top: int, chunk: int = DEFAULT_CHUNK) -> list[TokenScore]:
    """For each prompt token: its log-probability given the tokens before it (None for the first) and the `top` most
    likely tokens at its position (empty for the first)."""
    device = next(model.parameters()).device
    out: list[TokenScore] = [(None, ())]
    cache = DynamicCache(config=model.config)
    for start in range(0, len(ids) - 1, chunk):
        end = min(start + chunk, len(ids) - 1)
        piece = torch.tensor([ids[start:end]], dtype=torch.long, device=device)
        positions = torch.arange(start, end, device=device)[None]
        logits = model(input_ids=piece, position_ids=positions, past_key_values=cache, use_cache=True).logits[0]
        lp = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(ids[start + 1 : end + 1], dtype=torch.long, device=device)
        chosen = lp.gather(1, targets[:, None]).squeeze(1).tolist()
        if top:
            values, indices = lp.topk(top, dim=-1)
            tops = [tuple(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
        else:
            tops = [()] * len(chosen)
        out += list(zip(chosen, tops, strict=True))
    return out
