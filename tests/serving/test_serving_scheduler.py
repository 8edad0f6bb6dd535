"""The engine's scheduler on its own (no model): what `schedule()` decides each iteration and what
`update_from_output()` records. Chunked prefill under the token budget, round-robin admission across API keys, the
per-key prefill cap, and per-key queue metrics labelled by key id only."""

from __future__ import annotations

from serving.metrics import Metrics
from serving.sampling import SamplingParams
from serving.scheduler import (
    WHOLE_PROMPT_BUDGETS,
    Event,
    GenerationRequest,
    ModelOutput,
    RowState,
    Scheduler,
    SchedulerOutput,
    TokenEvent,
)


def request(key: str, prompt_len: int, max_tokens: int = 100) -> GenerationRequest:
    events: list[Event] = []
    return GenerationRequest(list(range(1, prompt_len + 1)), SamplingParams(max_tokens), events.append, key_id=key)


def run(sched: Scheduler, out: SchedulerOutput) -> ModelOutput:
    """What the engine would report: each chunk's tokens cached, a token for every row that has logits."""
    result = ModelOutput()
    for row in out.decode:
        result.tokens[row] = 7
    for chunk in out.prefill:
        computed = chunk.row.computed + chunk.tokens
        result.computed[chunk.row] = computed
        if computed >= chunk.row.prompt_len:
            result.tokens[chunk.row] = 7
    sched.update_from_output(out, result)
    return result


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_decode_every_iteration() -> None:
    sched = Scheduler(max_rows=8, max_queue=16, token_budget=64)
    short = [request("bob", 10) for _ in range(3)]
    for r in short:
        sched.add(r)
    first = sched.schedule()
    assert [c.whole for c in first.prefill] == [True] * 3 and not first.decode
    run(sched, first)
    assert len(sched.running) == 3
    sched.add(request("mallory", 1000))
    iterations = 0
    while not any(r.request.key_id == "mallory" for r in sched.running):
        out = sched.schedule()
        iterations += 1
        # every running row decodes in every iteration: none waits for the whole long prompt
        assert len(out.decode) == 3
        # decode tokens + prompt tokens never exceed the budget
        assert len(out.decode) + sum(c.tokens for c in out.prefill) <= 64
        run(sched, out)
    assert iterations == -(-1000 // (64 - 3))  # the long prompt took every token the decode rows left
    assert all(r.generated == iterations + 1 for r in short)


def test_unlimited_budget_prefills_whole_prompts_between_two_steps() -> None:
    sched = Scheduler(max_rows=8, max_queue=16, token_budget=0)
    sched.add(request("mallory", 5000))
    sched.add(request("bob", 10))
    out = sched.schedule()
    assert [(c.row.prompt_len, c.whole) for c in out.prefill] == [(5000, True), (10, True)]


def test_admission_is_round_robin_across_keys_not_first_come() -> None:
    sched = Scheduler(max_rows=4, max_queue=64, token_budget=0)
    for _ in range(10):
        sched.add(request("mallory", 20))
    sched.add(request("bob", 5))
    sched.add(request("carol", 5))
    out = sched.schedule()
    # mallory queued ten first, but bob and carol get a row in the first turn
    assert [c.row.request.key_id for c in out.prefill] == ["mallory", "bob", "carol", "mallory"]


def test_a_new_short_request_is_admitted_while_a_long_prompt_is_still_prefilling() -> None:
    sched = Scheduler(max_rows=8, max_queue=16, token_budget=64)
    sched.add(request("mallory", 4000))
    run(sched, sched.schedule())  # the long prompt's first chunk
    sched.add(request("bob", 20))
    out = sched.schedule()
    bob = [c for c in out.prefill if c.row.request.key_id == "bob"]
    assert bob and bob[0].whole  # bob's whole prompt runs this iteration
    mallory = [c for c in out.prefill if c.row.request.key_id == "mallory"]
    assert mallory and mallory[0].tokens >= 64 // 4  # and the long prompt still moves on
    run(sched, out)
    assert [r.request.key_id for r in sched.running] == ["bob"]


def test_the_per_key_prefill_cap_holds_a_keys_second_long_prompt_not_the_others() -> None:
    sched = Scheduler(max_rows=8, max_queue=16, token_budget=128, key_prefill_tokens=4096)
    sched.add(request("mallory", 3000))
    sched.add(request("mallory", 3000))
    sched.add(request("bob", 10))
    out = sched.schedule()
    admitted = [c.row.request.key_id for c in out.prefill]
    assert admitted.count("mallory") == 1 and "bob" in admitted  # the second long prompt waits (3000 + 3000 > 4096)
    assert sched.queued == 1
    # one request of a key is always admitted, however long (the cap never blocks a key for good)
    alone = Scheduler(max_rows=8, max_queue=16, token_budget=128, key_prefill_tokens=100)
    alone.add(request("mallory", 3000))
    assert len(alone.schedule().prefill) == 1


def test_rows_finish_on_eos_length_and_cancel_and_leave_running() -> None:
    sched = Scheduler(max_rows=8, max_queue=16, token_budget=0, eos_token_ids={2})
    a, b, c = request("a", 3, max_tokens=1), request("b", 3), request("c", 3)
    for r in (a, b, c):
        sched.add(r)
    out = sched.schedule()
    rows = {ch.row.request.key_id: ch.row for ch in out.prefill}
    c.cancel()
    result = ModelOutput(
        tokens={rows["a"]: 5, rows["b"]: 2, rows["c"]: 5}, computed={r: r.prompt_len for r in rows.values()}
    )
    sched.update_from_output(out, result)
    assert sched.running == [] and a.finished and b.finished and c.finished


def test_per_key_queue_metrics_are_labelled_by_key_id_only() -> None:
    metrics = Metrics()
    sched = Scheduler(max_rows=1, max_queue=16, token_budget=0, observer=metrics)
    secret = "sk-this-is-the-secret-key-material"
    for _ in range(3):
        sched.add(request("alice", 5))
    value = metrics.registry.get_sample_value
    assert value("llm_serving_key_queue_depth", {"key": "alice"}) == 3
    run(sched, sched.schedule())
    assert value("llm_serving_key_queue_depth", {"key": "alice"}) == 2
    assert value("llm_serving_key_queue_wait_seconds_count", {"key": "alice"}) == 1
    from prometheus_client import generate_latest

    assert secret not in generate_latest(metrics.registry).decode()


def test_update_from_output_emits_tokens_to_each_rows_own_consumer() -> None:
    events: list[Event] = []
    req = GenerationRequest([1, 2, 3], SamplingParams(2), events.append, key_id="k")
    sched = Scheduler(max_rows=2, max_queue=4, token_budget=0)
    sched.add(req)
    out = sched.schedule()
    row: RowState = out.prefill[0].row
    sched.update_from_output(out, ModelOutput(tokens={row: 9}, computed={row: 3}))
    assert events == [TokenEvent(9)] and sched.running == [row] and row.next_token == 9


def test_a_short_prompt_prefilled_in_chunks_does_not_wait_behind_a_long_ones_chunks() -> None:
    sched = Scheduler(max_rows=8, max_queue=16, token_budget=64)
    sched.add(request("mallory", 4000))
    run(sched, sched.schedule())  # the long prompt is being prefilled in chunks
    for key in ("bob", "carol"):
        sched.add(request(key, 40))  # the second does not fit what the first leaves of the budget
    out = sched.schedule()
    assert [(c.row.request.key_id, c.whole) for c in out.prefill if c.row.request.key_id != "mallory"] == [
        ("bob", True),
        ("carol", False),
    ]
    run(sched, out)
    run(sched, sched.schedule())  # carol's rest comes before mallory's next chunk
    assert {r.request.key_id for r in sched.running} == {"bob", "carol"}


def test_a_burst_of_short_prompts_is_admitted_whole_in_one_iteration() -> None:
    """While nothing is prefilled in chunks, whole prompts take an allowance of WHOLE_PROMPT_BUDGETS budgets: 16
    clients whose answers ended together are all prefilled in one iteration, as without chunking, not a budget's
    worth at a time; prompts past the allowance are chunked."""
    sched = Scheduler(max_rows=16, max_queue=32, token_budget=64)
    for i in range(16):
        sched.add(request(f"key{i}", 30))
    out = sched.schedule()
    assert len(out.prefill) == 16 and all(c.whole for c in out.prefill)
    sched = Scheduler(max_rows=16, max_queue=32, token_budget=64)
    for i in range(16):
        sched.add(request(f"key{i}", 100))
    out = sched.schedule()
    whole = [c for c in out.prefill if c.whole]
    assert len(whole) == WHOLE_PROMPT_BUDGETS * 64 // 100
    assert sum(c.tokens for c in out.prefill if not c.whole) <= 64
    # while a prompt is being prefilled in chunks, whole prompts fit what is left of the budget, not the allowance
    sched = Scheduler(max_rows=16, max_queue=32, token_budget=64)
    sched.add(request("mallory", 4000))
    run(sched, sched.schedule())
    for i in range(16):
        sched.add(request(f"key{i}", 30))
    out = sched.schedule()
    assert [c.row.request.key_id for c in out.prefill if c.whole] == ["key0"]
    assert sum(c.tokens for c in out.prefill) <= 64
