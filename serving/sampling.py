"""Sampling for the built-in engine: one token per row, decided by that row alone.

Every decision is per row, so a seeded request's tokens never depend on what else shares its batch (issue 20: a
neighbour with top_p < 1 used to switch every sampled row to the sorted-CDF path, and one with top_p = 1e-46 made
the batch raise and every row redraw):
- which path a row takes (greedy, full CDF, nucleus) follows from its own temperature and top_p;
- each sampled row draws exactly one uniform number from its own generator (its request's `seed`), before anything
  can fail, and inverts its own CDF with it; the row-by-row fallback reuses that draw instead of drawing again;
- every tensor operation is row-wise (softmax, sort, cumsum, search), so a row's arithmetic is the same whatever
  rows sit next to it.

Beyond temperature and top_p, each row has its own samplers, in vLLM's order (vllm/v1/sample/sampler.py at v0.11:
penalties on the logits, then temperature, then min_p, then top_k and top_p):
- `repetition_penalty` (prompt and output tokens; a positive logit is divided by it, a negative one multiplied, as
  vllm/model_executor/layers/utils.py `apply_penalties` and Hugging Face's RepetitionPenaltyLogitsProcessor),
  `frequency_penalty` (minus penalty x count in the output) and `presence_penalty` (minus penalty once per output
  token seen), as OpenAI documents them; they change greedy rows too;
- `min_p` drops tokens whose probability is below min_p x the top token's, `top_k` keeps the k most probable; the
  rest is renormalised before the nucleus and the draw. A row without them takes exactly the arithmetic it took
  before they existed, so seeded outputs are unchanged.

Batched on the logits' device with one transfer back: per-row softmax, sort and `.cpu()` cost ~23 ms for 16 rows of
a 128k vocabulary on an H100 (issue 15) against 0.04 ms for greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: temperature 0 is greedy; `seed` makes sampling reproducible."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0  # 0 (or -1, or beyond the vocabulary): every token
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # return the sampled token's log-probability and this many most likely ones

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.min_p > 0.0


History = tuple[list[int], list[int]]  # one row's prompt ids and the ids it generated so far


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    failed: dict[int, Exception] | None = None,
    history: list[History] | None = None,
) -> list[int]:
    """One token per row: greedy when temperature is 0, else temperature + nucleus (top_p) sampling.

    `history` (each row's prompt and generated ids) is what the penalties look at; without it they are not applied.

    With `failed`, a batch the batched path cannot sample (e.g. one row's logits are not finite) is sampled again row
    by row with the same uniform draws, and a row that still cannot be sampled is recorded there with token -1
    instead of failing every row.
    """
    sampled = [i for i, p in enumerate(params) if p.temperature != 0.0]
    # the draw happens first and once: whatever path or fallback a row takes, it consumes exactly one number
    uniforms = {i: float(torch.rand((), generator=generators[i], dtype=torch.float64)) for i in sampled}
    if history is not None and any(p.penalised for p in params):
        logits = _penalise(logits, params, history)
    try:
        return _sample_batch(logits, params, uniforms)
    except Exception:
        if failed is None:
            raise
    greedy = logits.argmax(dim=-1).tolist()
    tokens: list[int] = []
    for row, p in enumerate(params):
        if p.temperature == 0.0:
            tokens.append(greedy[row])
            continue
        try:
            tokens.append(_sample_row(logits[row], p, uniforms[row]))
        except Exception as exc:
            failed[row] = exc
            tokens.append(-1)
    return tokens


def _probs(logits: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    # subtract each row's max first: a tiny temperature then gives exp(-inf) = 0 instead of inf / inf = nan
    logits = logits.float()
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temps[:, None], dim=-1)
    if not bool(torch.isfinite(probs).all()):  # one host sync: a poisoned row must not sample garbage
        raise ValueError("non-finite probabilities in a sampled row")
    return probs


def logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]) -> dict[int, tuple[float, tuple]]:
    """For each row that asks: the sampled token's log-probability and the `logprobs` most likely tokens.

    From the model's own logits, before penalties, temperature and filters: vLLM's default `logprobs_mode`
    ("raw_logprobs", vllm/config/model.py), so the numbers say what the model thinks, whatever the sampling."""
    out: dict[int, tuple[float, tuple]] = {}
    for row, p in enumerate(params):
        if p.logprobs is None or tokens[row] < 0:
            continue
        lp = torch.log_softmax(logits[row].float(), dim=-1)
        top = lp.topk(p.logprobs) if p.logprobs else None
        pairs = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
        out[row] = (float(lp[tokens[row]]), pairs)
    return out


def _penalise(logits: torch.Tensor, params: list[SamplingParams], history: list[History]) -> torch.Tensor:
    """The logits with each penalised row's penalties applied (a copy; other rows untouched), row by row."""
    logits = logits.float().clone()
    for row, p in enumerate(params):
        if not p.penalised:
            continue
        prompt_ids, output_ids = history[row]
        line = logits[row]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({*prompt_ids, *output_ids}), dtype=torch.long, device=line.device)
            if seen.numel():
                values = line[seen]
                line[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if output_ids and (p.presence_penalty or p.frequency_penalty):
            out = torch.tensor(output_ids, dtype=torch.long, device=line.device)
            counts = torch.zeros_like(line).index_add_(0, out, torch.ones_like(out, dtype=line.dtype))
            line -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(line.dtype)
    return logits


def _filter(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """min_p then top_k on the rows that ask for them, renormalised; other rows are returned as they were."""
    rows = [i for i, p in enumerate(params) if p.filtered]
    if not rows:
        return probs
    index = torch.tensor(rows, device=probs.device)
    part = probs.index_select(0, index)
    vocab = part.shape[-1]
    min_p = torch.tensor([params[i].min_p for i in rows], device=probs.device, dtype=part.dtype)
    keep = part >= min_p[:, None] * part.amax(dim=-1, keepdim=True)
    k = torch.tensor([params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in rows], device=probs.device)
    kth = part.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    keep &= part >= kth  # ties with the k-th token stay (as vLLM's top-k mask)
    part = part * keep
    part = part / part.sum(dim=-1, keepdim=True)  # the top token always stays, so the sum is positive
    return probs.index_copy(0, index, part)


def _pick_full(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over the whole vocabulary, in float64: u * total < total strictly for u < 1, so the search lands
    on a token of non-zero mass."""
    cdf = probs.double().cumsum(dim=-1)
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(1)
    return picked.clamp_(max=probs.shape[-1] - 1)


def _pick_nucleus(probs: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over the smallest prefix (by probability) whose mass reaches top_p; the top token always stays."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.double().cumsum(dim=-1)
    kept = cumulative - sorted_probs.double() < top_p[:, None]
    # explicitly: a top_p that rounds to 0 (1e-46 is 0 in float32) would otherwise keep nothing (then index -1)
    kept[:, 0] = True
    # the CDF of the kept prefix is the running sum itself: search it in sorted order, map back
    total = (cumulative * kept).amax(dim=-1)
    position = torch.searchsorted(cumulative, (uniform * total)[:, None], right=True).squeeze(1)
    position = torch.minimum(position, kept.sum(dim=-1) - 1)  # rounding never escapes the nucleus
    return order.gather(1, position[:, None]).squeeze(1)


def _sample_batch(logits: torch.Tensor, params: list[SamplingParams], uniforms: dict[int, float]) -> list[int]:
    out = logits.argmax(dim=-1)
    device = logits.device
    full = [i for i in uniforms if params[i].top_p >= 1.0]
    nucleus = [i for i in uniforms if params[i].top_p < 1.0]
    for rows, nucleus_path in ((full, False), (nucleus, True)):
        if not rows:
            continue
        index = torch.tensor(rows, device=device)
        temps = torch.tensor([params[i].temperature for i in rows], device=device, dtype=torch.float32)
        probs = _filter(_probs(logits.index_select(0, index), temps), [params[i] for i in rows])
        uniform = torch.tensor([uniforms[i] for i in rows], device=device, dtype=torch.float64)
        if nucleus_path:
            top_p = torch.tensor([params[i].top_p for i in rows], device=device, dtype=torch.float64)
            out[index] = _pick_nucleus(probs, top_p, uniform)
        else:
            out[index] = _pick_full(probs, uniform)
    return out.tolist()


def _sample_row(logits: torch.Tensor, p: SamplingParams, uniform: float) -> int:
    """The batched arithmetic on one row (the fallback when a neighbour poisoned the batch): same path, same draw."""
    rows = logits[None]
    temps = torch.tensor([p.temperature], device=logits.device, dtype=torch.float32)
    probs = _filter(_probs(rows, temps), [p])
    u = torch.tensor([uniform], device=logits.device, dtype=torch.float64)
    if p.top_p < 1.0:
        top_p = torch.tensor([p.top_p], device=logits.device, dtype=torch.float64)
        return int(_pick_nucleus(probs, top_p, u)[0])
    return int(_pick_full(probs, u)[0])
