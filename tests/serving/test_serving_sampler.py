"""The batched sampler (serving/decode.py `sample`): the right distribution, nucleus cut, greedy rows untouched,
seeded rows independent of their batch companions."""

from __future__ import annotations

import torch

from serving.decode import SamplingParams, sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def frequencies(params: SamplingParams, n: int = 4000, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    picks = sample(logits.expand(n, -1).clone(), [params] * n, gens)  # n rows in one call, one generator each
    return torch.bincount(torch.tensor(picks), minlength=logits.numel()).double() / n


def test_temperature_sampling_follows_the_softmax() -> None:
    for temperature in (1.0, 0.5, 2.0):
        expected = torch.softmax(LOGITS.double() / temperature, dim=-1)
        got = frequencies(SamplingParams(1, temperature=temperature))
        assert torch.allclose(got, expected, atol=0.03), (temperature, got, expected)


def test_top_p_renormalises_the_nucleus_and_never_picks_outside_it() -> None:
    probs = torch.softmax(LOGITS.double(), dim=-1)  # 0.57, 0.21, 0.13, 0.08, ...
    got = frequencies(SamplingParams(1, temperature=1.0, top_p=0.8))
    nucleus = probs[:3] / probs[:3].sum()  # 0.57 + 0.21 < 0.8, so the third token completes the mass
    assert got[3:].sum() == 0
    assert torch.allclose(got[:3], nucleus, atol=0.03)


def test_greedy_rows_are_argmax_in_a_mixed_batch() -> None:
    logits = torch.randn(5, 50)
    params = [SamplingParams(1, temperature=0.0), SamplingParams(1, temperature=1.0, top_p=0.5)] * 2 + [
        SamplingParams(1, temperature=0.0)
    ]
    gens = [None, torch.Generator().manual_seed(1), None, None, None]
    tokens = sample(logits, params, gens)
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]
    assert all(isinstance(t, int) for t in tokens)


def test_a_seeded_row_does_not_depend_on_its_companions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    mine = SamplingParams(1, temperature=0.8, top_p=0.9, seed=5)

    def my_tokens(companions: list[SamplingParams]) -> list[int]:
        gen = torch.Generator().manual_seed(5)
        out = []
        for _ in range(20):
            batch = [*companions, mine]
            rows = torch.cat([logits[: len(companions)], logits[3:]])
            gens = [torch.Generator().manual_seed(99 + k) for k in range(len(companions))] + [gen]
            out.append(sample(rows, batch, gens)[-1])
        return out

    alone = my_tokens([])
    assert my_tokens([SamplingParams(1, temperature=1.0)]) == alone
    assert my_tokens([SamplingParams(1, temperature=0.0), SamplingParams(1, temperature=2.0, top_p=0.3)]) == alone


def _seeded_tokens(neighbours: list[SamplingParams], mine: SamplingParams, logits: torch.Tensor) -> list[int]:
    """My row's tokens over 20 draws with its own seeded generator, next to `neighbours` (the failure dict given,
    as the engine gives it)."""
    gen = torch.Generator().manual_seed(mine.seed or 0)
    out = []
    for _ in range(20):
        rows = torch.cat([logits[: len(neighbours)], logits[-1:]])
        gens = [torch.Generator().manual_seed(7 + k) for k in range(len(neighbours))] + [gen]
        out.append(sample(rows, [*neighbours, mine], gens, {})[-1])
    return out


def test_a_neighbours_top_p_does_not_change_a_seeded_rows_path() -> None:
    """Issue 20: any neighbour with top_p < 1 switched every sampled row to the sorted-CDF path (12/12 diverged)."""
    torch.manual_seed(1)
    logits = torch.randn(4, 1000) * 3
    mine = SamplingParams(1, temperature=1.0, top_p=1.0, seed=11)
    alone = _seeded_tokens([], mine, logits)
    assert _seeded_tokens([SamplingParams(1, temperature=1.0, top_p=0.5)], mine, logits) == alone
    assert _seeded_tokens([SamplingParams(1, temperature=0.7, top_p=0.9)] * 3, mine, logits) == alone


def test_a_vanishing_top_p_is_greedy_and_breaks_no_neighbour() -> None:
    """Issue 20: top_p = 1e-46 (0 in float32) raised `gather index -1`, and the fallback redrew every row."""
    torch.manual_seed(2)
    logits = torch.randn(3, 500)
    tiny = SamplingParams(1, temperature=1.0, top_p=1e-46)
    failed: dict[int, Exception] = {}
    picks = sample(logits, [tiny] * 3, [torch.Generator().manual_seed(i) for i in range(3)], failed)
    assert not failed and picks == logits.argmax(-1).tolist()
    mine = SamplingParams(1, temperature=1.0, top_p=0.8, seed=3)
    assert _seeded_tokens([tiny], mine, logits) == _seeded_tokens([], mine, logits)


def test_the_row_by_row_fallback_reuses_each_rows_draw() -> None:
    """A poisoned neighbour (non-finite logits) sends the batch to the row-by-row fallback; a seeded row still gets
    the token it gets alone (the draw it already made, not a second one)."""
    torch.manual_seed(3)
    logits = torch.randn(2, 300)
    poisoned = logits.clone()
    poisoned[0] = float("nan")
    for mine in (SamplingParams(1, temperature=1.0, seed=4), SamplingParams(1, temperature=0.9, top_p=0.7, seed=4)):
        expected = _seeded_tokens([], mine, logits)
        gen = torch.Generator().manual_seed(4)
        got = []
        for _ in range(20):
            failed: dict[int, Exception] = {}
            got.append(sample(poisoned, [SamplingParams(1, temperature=1.0), mine], [None, gen], failed)[1])
            assert list(failed) == [0]
        assert got == expected


def test_top_k_keeps_the_k_most_probable_tokens_renormalised() -> None:
    probs = torch.softmax(LOGITS.double(), dim=-1)
    got = frequencies(SamplingParams(1, temperature=1.0, top_k=2))
    assert got[2:].sum() == 0
    assert torch.allclose(got[:2], probs[:2] / probs[:2].sum(), atol=0.03)


def test_min_p_drops_tokens_below_its_share_of_the_top_token() -> None:
    probs = torch.softmax(LOGITS.double(), dim=-1)  # 0.57, 0.21, 0.13, ...: 0.3 x 0.57 = 0.17 keeps two
    got = frequencies(SamplingParams(1, temperature=1.0, min_p=0.3))
    assert got[2:].sum() == 0
    assert torch.allclose(got[:2], probs[:2] / probs[:2].sum(), atol=0.03)


def test_penalties_change_the_greedy_choice_as_openai_and_vllm_define_them() -> None:
    def greedy(history: tuple[list[int], list[int]], **penalty: float) -> int:
        return sample(LOGITS[None].clone(), [SamplingParams(1, temperature=0.0, **penalty)], [None], None, [history])[0]

    assert greedy(([], [])) == 0
    assert greedy(([], [0, 0]), frequency_penalty=0.6) == 1  # 2.0 - 2 x 0.6 = 0.8 < 1.0
    assert greedy(([], [0, 0]), frequency_penalty=0.4) == 0  # 2.0 - 0.8 = 1.2
    assert greedy(([], [0, 0]), presence_penalty=1.5) == 1  # once, whatever the count: 0.5
    assert greedy(([0], []), presence_penalty=2.0) == 0  # presence and frequency look at the output only
    assert greedy(([0], []), repetition_penalty=3.0) == 1  # prompt tokens too: 2.0 / 3
    # a negative logit is multiplied (made less likely), never divided towards zero
    logits = torch.tensor([[-1.0, -1.5]])
    params = [SamplingParams(1, temperature=0.0, repetition_penalty=2.0)]
    assert sample(logits, params, [None], None, [([0], [])]) == [1]


def test_new_samplers_keep_rows_independent_of_their_neighbours() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    mine = SamplingParams(1, temperature=0.9, top_k=40, min_p=0.01, repetition_penalty=1.2, seed=5)
    history = ([1, 2, 3], [4, 4])
    alone = [
        sample(logits[:1].clone(), [mine], [torch.Generator().manual_seed(s)], None, [history])[0] for s in range(30)
    ]
    others = [
        SamplingParams(1, temperature=0.0, frequency_penalty=2.0),
        SamplingParams(1, temperature=1.3, top_p=0.5, top_k=3),
        SamplingParams(1, temperature=1.0),
    ]
    batched = []
    for s in range(30):
        gens = [torch.Generator().manual_seed(s), None, torch.Generator().manual_seed(99), torch.Generator()]
        hist = [history, ([], [7, 7, 7]), ([], []), ([], [])]
        batched.append(sample(logits.clone(), [mine, *others], gens, None, hist)[0])
    assert alone == batched
    assert len(set(alone)) > 1  # it did sample
