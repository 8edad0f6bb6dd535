"""The built-in engine: a Hugging Face causal LM behind the batching scheduler, with OpenAI semantics on top.

This layer owns tokenization, the chat template, context-length and stop-sequence handling, and the bridge from the
engine thread to asyncio (`call_soon_threadsafe` into a per-request queue, so the event loop never blocks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from serving.backends.base import GenerationBody, RequestContext
from serving.batching import (
    BatchObserver,
    BatchPolicy,
    BatchScheduler,
    EngineStoppedError,
    Event,
    FinishEvent,
    GenerationRequest,
    QueueFullError,
    TokenEvent,
)
from serving.config import ServingConfig
from serving.decode import Decoder, SamplingParams
from serving.errors import APIError, bad_request
from serving.grammar import Grammar, GrammarCompiler, GrammarError, check_schema_size, json_grammar, lark_grammar
from serving.prefix_cache import PrefixCache
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
)
from serving.quantize import prepare_weights
from serving.scoring import TokenScore, prompt_logprobs
from serving.threads import cpu_budget, engine_threads
from serving.tools import (
    ToolStream,
    forced_call_lark,
    parse_tool_calls,
    template_tool_calls,
    template_tools,
    tool_format,
)

log = logging.getLogger("serving.local")

# Seconds a shed client is told to wait; one batch of the debug model takes well under this.
QUEUE_RETRY_AFTER_S = 1.0
# A prompt longer than context * this many characters cannot fit (no tokenizer averages 32 characters per token
# over a whole prompt), so it is refused before tokenizing: tokenizing costs time proportional to its length.
MAX_CHARS_PER_TOKEN = 32
# Temperatures below this are treated exactly as 0 (greedy); see docs/serving.md "Limits".
MIN_TEMPERATURE = 1e-3
# A grammar (response_format, forced tool call) that does not compile within this many seconds is refused (400);
# compilation runs on its own threads, never the engine's (serving/grammar.py).
GRAMMAR_COMPILE_TIMEOUT_S = 5.0


class LocalBackend:
    """The built-in engine: the model and tokenizer in this process, decoded by a `BatchScheduler` thread."""

    def __init__(self, model_dir: Path, cfg: ServingConfig, observer: BatchObserver | None = None) -> None:
        self.model_id = cfg.model_id
        self.cfg = cfg
        if cfg.device == "cpu":  # what the container may use, not the host's cores (serving/threads.py)
            threads, why = engine_threads(cpu_budget(), cfg.quantization)
            if cfg.torch_threads:
                threads, why = cfg.torch_threads, "--torch-threads"
            torch.set_num_threads(threads)
            log.info("cpu threads: %d (%s)", threads, why)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_dir)
        self._decode = _fast_decode(self.tokenizer)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, cfg.dtype))
        self.model = model.to(cfg.device).eval()
        log.info("weights: %s", prepare_weights(self.model, cfg.quantization, cfg.device, self.tokenizer))
        max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.max_model_len = cfg.max_model_len or max_positions or 2048
        eos: set[int] = set()
        for source in (model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(source)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else min(eos) if eos else 0
        self.scheduler = BatchScheduler(
            Decoder(self.model, pad, prefix_cache=_prefix_cache(cfg, observer)),
            eos,
            max_batch_size=cfg.max_batch_size,
            max_queue=cfg.max_queue,
            batch_wait_s=cfg.batch_wait_ms / 1000,
            policy=BatchPolicy(cfg.batching),
            observer=observer,
            token_budget=cfg.token_budget,
            key_prefill_tokens=cfg.max_key_prefill_tokens,
        )
        self._relay: _EventRelay | None = None
        template = self.tokenizer.chat_template
        self.tool_format = tool_format(template if isinstance(template, str) else None)
        vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        self._grammars: GrammarCompiler | None = None
        try:
            self._grammars = GrammarCompiler(self.tokenizer, vocab, eos)
        except (ValueError, TypeError) as exc:  # llguidance takes fast (Rust) tokenizers only
            log.warning("constrained decoding unavailable for this tokenizer: %s", exc)
        # at most two grammars compile at once; a slow one holds its thread, not the engine's
        self._grammar_pool = ThreadPoolExecutor(2, thread_name_prefix="grammar")
        # tokenization and chat templates run here, off the event loop; one thread, so a flood of long prompts
        # queues here (bounded by the in-flight limit) instead of competing with the engine for cores
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        # prompt scoring (`echo` + `logprobs`): the model's own forward on one thread beside the engine's (a forward
        # without shared state is safe to run concurrently), one prompt at a time
        self._score_pool = ThreadPoolExecutor(1, thread_name_prefix="score")
        self.scheduler.start()
        log.info(
            "loaded %s (%s params, context %d, batching %s)",
            model_dir,
            f"{sum(p.numel() for p in model.parameters()):,}",
            self.max_model_len,
            self.scheduler.policy,
        )

    async def model_ids(self) -> list[str]:
        return [self.model_id]

    async def alive(self) -> bool:
        return self.scheduler.healthy

    async def ready(self) -> bool:
        return self.scheduler.healthy

    async def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._score_pool.shutdown(wait=False, cancel_futures=True)
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.scheduler.stop, self.cfg.drain_timeout_s)

    # -- request preparation -----------------------------------------------------------------------------------------

    def _check_model(self, body: GenerationBody) -> None:
        if body.model != self.model_id:
            raise APIError(404, f"The model '{body.model}' does not exist.", code="model_not_found", param="model")

    def _all_prompt_ids(self, body: GenerationBody) -> list[list[int]]:
        """Every prompt of the request as token ids (a completions prompt list has several; token-id prompts are
        checked against the vocabulary). Runs on the tokenizer thread, never on the event loop."""
        if isinstance(body, ChatCompletionRequest):
            return [self._prompt_ids(body)]
        vocab = int(self.model.get_input_embeddings().num_embeddings)
        out: list[list[int]] = []
        for prompt in body.prompts:
            if isinstance(prompt, str):
                out.append(self._prompt_ids(body, prompt))
                continue
            if max(prompt) >= vocab:
                raise bad_request(f"Prompt token ids must be below the vocabulary size {vocab}.", param="prompt")
            if len(prompt) > self.max_model_len:
                raise bad_request(
                    f"This model's maximum context length is {self.max_model_len} tokens; a prompt has "
                    f"{len(prompt)}.", param="prompt", code="context_length_exceeded",
                )  # fmt: skip
            out.append(list(prompt))
        return out

    def _prompt_ids(self, body: GenerationBody, prompt: str | None = None) -> list[int]:
        """Runs on the tokenizer thread, never on the event loop."""
        param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        text = body.prompt_text if prompt is None and isinstance(body, CompletionRequest) else prompt or ""
        chars = sum(len(m.text) for m in body.messages) if isinstance(body, ChatCompletionRequest) else len(text)
        # fewest tokens the prompt can have: its characters at the densest plausible rate, plus at least one
        # template token per chat message (an empty message still renders its role markers)
        floor = -(-chars // MAX_CHARS_PER_TOKEN) + (
            len(body.messages) if isinstance(body, ChatCompletionRequest) else 0
        )
        if floor > self.max_model_len:
            # bounded work: a prompt this long cannot fit the context, so it is refused without tokenizing it
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {chars} "
                "characters in its messages and their template, more than any prompt of that many tokens.",
                param=param,
                code="context_length_exceeded",
            )
        if isinstance(body, ChatCompletionRequest):
            if not self.tokenizer.chat_template:
                raise bad_request("This model has no chat template; use /v1/completions.", param="messages")
            ids = self._chat_ids(body)
        else:
            ids = self._encode(text, special=True, add_special_tokens=True)
        if not ids:
            raise bad_request("The prompt is empty: it must hold at least one token.", param=param)
        return ids

    def _encode(self, text: str, *, special: bool, add_special_tokens: bool = False) -> list[int]:
        # a one-item batch: the Rust tokenizer releases the GIL for batches, not for single encodes, so the event
        # loop keeps running while a long prompt is tokenized on this thread
        out = self.tokenizer([text], add_special_tokens=add_special_tokens, split_special_tokens=not special)
        return list(out["input_ids"][0])

    def _chat_ids(self, body: ChatCompletionRequest) -> list[int]:
        """The chat template's own markers as special tokens; message content always as text.

        Rendering the template with the content in place and encoding the result would turn `<|im_start|>system`
        typed by a user into the real role marker (a prompt injection across the template's trust boundary). So the
        template is rendered around per-request placeholders, and only the template's text between them is parsed
        for special tokens.
        """
        nonce = secrets.token_hex(8)
        marks = [f"\u27e6{nonce}:{i}\u27e7" for i in range(len(body.messages))]
        messages = [_template_message(m, mark) for m, mark in zip(body.messages, marks, strict=True)]
        tools = template_tools(body) if body.tool_mode != "none" else None
        self._no_special_tokens([tools, [m.get("tool_calls") for m in messages]], "tools")
        rendered = str(
            self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        )
        pieces = re.split(f"(\u27e6{nonce}:\\d+\u27e7)", rendered)
        seen = pieces[1::2]
        if sorted(seen) != sorted(marks) or len(seen) != len(set(seen)):
            # the template transforms or drops content: render it for real, and refuse content that would turn into
            # special tokens rather than encode it as markers
            for m in body.messages:
                hit = next((t for t in self.tokenizer.all_special_tokens if t and t in m.text), None)
                if hit is not None:
                    raise bad_request(f"Message content contains the special token {hit!r}.", param="messages")
            plain = [_template_message(m, m.text) for m in body.messages]
            text = self.tokenizer.apply_chat_template(plain, tools=tools, tokenize=False, add_generation_prompt=True)
            return self._encode(str(text), special=True)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if not piece:
                continue
            if i % 2:
                ids += self._encode(body.messages[marks.index(piece)].text, special=False)
            else:
                ids += self._encode(piece, special=True)
        return ids

    def _no_special_tokens(self, value: Any, param: str) -> None:
        """Tool definitions and history tool calls are rendered as template text, where special tokens are parsed:
        refuse any that spell one (the same trust boundary as message content, see `_chat_ids`)."""
        text = json.dumps(value, ensure_ascii=False)
        hit = next((t for t in self.tokenizer.all_special_tokens if t and t in text), None)
        if hit is not None:
            raise bad_request(f"A tool definition or tool call contains the special token {hit!r}.", param=param)

    def _check_tools(self, body: GenerationBody) -> None:
        """Tools need a chat template that renders them (and whose call format `serving.tools` parses)."""
        if isinstance(body, ChatCompletionRequest) and body.tool_mode != "none" and self.tool_format is None:
            raise bad_request(
                f"The model '{self.model_id}' does not support tools: its chat template does not render them "
                "in a tool-call format this server parses (Hermes/Qwen/SmolLM2 <tool_call> or Llama 3 JSON).",
                param="tools",
                code="tools_unsupported",
            )

    def _grammar_text(self, body: GenerationBody) -> tuple[str, str] | None:
        """(llguidance grammar, the parameter it comes from) of a constrained request, None otherwise; schemas are
        checked for size first (serving/grammar.py `check_schema_size`)."""
        fmt = body.response_format
        if fmt is not None and fmt.type == "json_object":
            return json_grammar({"type": "object"}), "response_format"
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
            schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {"type": "object"}
            check_schema_size(schema, "response_format.json_schema.schema")
            return json_grammar(schema), "response_format"
        if isinstance(body, ChatCompletionRequest) and body.tool_mode in ("required", "named"):
            assert self.tool_format is not None  # _check_tools ran
            check_schema_size([t.function.parameters for t in body.tools or []], "the tools' parameters")
            return lark_grammar(forced_call_lark(body, self.tool_format)), "tools"
        return None

    async def _grammar(self, body: GenerationBody) -> Grammar | None:
        """The request's grammar (a matcher per row: `.row()`), compiled (or taken from the cache) off the event loop
        and off the engine thread, within GRAMMAR_COMPILE_TIMEOUT_S; a grammar that cannot be used is a 400 naming
        its parameter."""
        param = "tools" if body.response_format is None or not body.response_format.constrained else "response_format"
        try:
            spec = self._grammar_text(body)
            if spec is None:
                return None
            text, param = spec
            if self._grammars is None:
                raise GrammarError("this model's tokenizer does not support constrained decoding")
            future = self._grammar_pool.submit(self._grammars.compile, text)
            grammar = await asyncio.wait_for(asyncio.wrap_future(future), GRAMMAR_COMPILE_TIMEOUT_S)
        except GrammarError as exc:
            raise bad_request(f"Invalid {param}: {exc}.", param=param, code="invalid_grammar") from exc
        except TimeoutError as exc:
            raise bad_request(
                f"Invalid {param}: its grammar did not compile within {GRAMMAR_COMPILE_TIMEOUT_S:g} s; simplify it.",
                param=param,
                code="invalid_grammar",
            ) from exc
        return grammar

    def _sampling(self, body: GenerationBody, prompt_len: int) -> SamplingParams:
        """The request's samplers, its max_tokens clamped to the context left after the prompt.

        As vLLM (vllm/entrypoints/utils.py `get_max_tokens`): only a prompt that alone exceeds the context is
        refused; a max_tokens beyond what is left is lowered to it (and reported: `ctx.max_tokens`)."""
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{prompt_len} tokens, leaving no room for the completion.",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        asked = body.max_tokens if body.max_tokens is not None else self.cfg.default_max_tokens
        max_tokens = min(asked, room)
        # below MIN_TEMPERATURE sampling is greedy in all but name; treating it as greedy exactly is documented
        temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=body.top_p,
            seed=body.seed,
            top_k=max(body.top_k or 0, 0),
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logprobs=body.logprobs_count,
        )

    async def _admit(self, body: GenerationBody, ctx: RequestContext) -> list[_Choice]:
        """Tokenize, reserve the key's tokens for every choice, and queue the request: one engine request per prompt,
        its other `n - 1` choices forked from it once its prompt is prefilled (`GenerationRequest.forks`)."""
        self._check_model(body)
        if body.n > self.cfg.max_batch_size:
            raise bad_request(
                f"n must be at most {self.cfg.max_batch_size} here (--max-batch-size): a prompt's choices decode "
                "together.", param="n", code="invalid_value",
            )  # fmt: skip
        self._check_tools(body)
        loop = asyncio.get_running_loop()
        prompts = await loop.run_in_executor(self._tokenize_pool, self._all_prompt_ids, body)
        params = [self._sampling(body, len(ids)) for ids in prompts]
        grammar = await self._grammar(body)  # compiled once; every choice gets its own matcher (its row's state)
        ctx.max_tokens = min(p.max_tokens for p in params)
        ctx.prompt_tokens = sum(len(ids) for ids in prompts)
        # the key's token budget, before any engine work: every prompt once, every choice's completion
        ctx.reserve(ctx.prompt_tokens + body.n * sum(p.max_tokens for p in params))
        if self._relay is None or self._relay.loop is not loop:
            self._relay = _EventRelay(loop)
        relay = self._relay
        salt = self.cfg.cache_salt(ctx.key_id)
        choices: list[_Choice] = []
        parents: list[GenerationRequest] = []
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            requests: list[GenerationRequest] = []
            for j in range(body.n):
                events: asyncio.Queue[Event] = asyncio.Queue()
                choice = _Choice(i * body.n + j, ids, events)
                if p.max_tokens:  # 0: `echo` scoring only, nothing to generate
                    choice.gen = GenerationRequest(
                        ids, _choice_params(p, j), _emitter(relay, events), key_id=ctx.key_id, cache_salt=salt
                    )
                    choice.gen.grammar = None if grammar is None else grammar.row()
                    requests.append(choice.gen)
                choices.append(choice)
            if requests:
                requests[0].forks = requests[1:]
                parents.append(requests[0])
        for choice in choices:
            choice.bind(ctx, choices)
        try:
            if parents:
                self.scheduler.submit_all(parents)
        except QueueFullError as exc:
            raise APIError(
                503, f"Server is overloaded: {exc}. Retry later.", code="queue_full", retry_after=QUEUE_RETRY_AFTER_S
            ) from exc
        except EngineStoppedError as exc:
            raise APIError(
                503, "Server is shutting down or unhealthy.", code="unavailable", retry_after=QUEUE_RETRY_AFTER_S
            ) from exc
        return choices

    # -- generation ---------------------------------------------------------------------------------------------------

    async def _text_deltas(
        self,
        gen: GenerationRequest,
        events: asyncio.Queue[Event],
        stops: list[str],
        ctx: RequestContext | _Choice,
        collected: list[TokenEvent] | None = None,
    ) -> AsyncIterator[str]:
        """Text as it becomes final: held back while it might be a partial UTF-8 character or a stop sequence.

        Detokenization is incremental (a window from `prefix` to the end, as in vLLM), so each token costs the same
        however long the completion grows.
        """
        decode = self._decode
        ids: list[int] = []
        prefix = read = 0  # ids[prefix:read] is context already turned into text; ids[read:] is not yet text
        text, sent = "", 0
        try:
            while True:
                # take every event already delivered: when the loop falls behind the engine, several tokens go out
                # as one chunk instead of one chunk each (fewer writes for the server and parses for the client)
                burst = [await events.get()]
                while not events.empty():
                    burst.append(events.get_nowait())
                finish: FinishEvent | None = None
                for event in burst:
                    if isinstance(event, FinishEvent):
                        finish = event
                        break
                    ctx.first_token()
                    ids.append(event.token_id)
                    if collected is not None:
                        collected.append(event)
                    ctx.completion_tokens = len(ids)
                    before = decode(ids[prefix:read], skip_special_tokens=True)
                    after = decode(ids[prefix:], skip_special_tokens=True)
                    if len(after) <= len(before) or after.endswith("\ufffd"):
                        continue  # a partial UTF-8 sequence (or a special token): wait for more
                    text += after[len(before) :]
                    prefix, read = read, len(ids)
                if finish is not None:
                    if finish.reason == "error":
                        raise APIError(500, f"Generation failed: {finish.error}.", code="engine_error")
                    ctx.finish_reason = "length" if finish.reason == "length" else "stop"
                    if finish.reason == "stop":
                        # the engine's "stop" is the EOS token, which has no text but was generated: counted in
                        # usage, as vLLM does (completion_tokens = len(output.token_ids), EOS included; vllm/v1/core/
                        # sched/utils.py check_stop), so limits and bills agree whichever engine served the request
                        ctx.completion_tokens = len(ids) + 1
                    if read < len(ids):  # flush what was held back as a partial character
                        text += decode(ids[prefix:], skip_special_tokens=True)[
                            len(decode(ids[prefix:read], skip_special_tokens=True)) :
                        ]
                hit = _find_stop(text, stops, sent)
                if hit is not None:
                    gen.cancel()
                    ctx.finish_reason = "stop"
                    if hit > sent:
                        yield text[sent:hit]
                    return
                if finish is not None:
                    if len(text) > sent:
                        yield text[sent:]
                    return
                end = len(text) - partial_stop_len(text, stops)
                if end > sent:
                    yield text[sent:end]
                    sent = end
        finally:
            gen.cancel()  # no-op when finished; stops decoding when the client went away

    async def complete(self, body: GenerationBody, ctx: RequestContext) -> dict[str, Any]:
        """Generate the whole answer, every choice of every prompt (see `Backend.complete`)."""
        choices = await self._admit(body, ctx)
        chat = isinstance(body, ChatCompletionRequest)
        want = body.logprobs_count

        async def run(choice: _Choice) -> tuple[str, list[TokenEvent]]:
            collected: list[TokenEvent] = []
            if choice.gen is None:  # max_tokens 0 with echo: nothing generated
                choice.finish_reason = "length"
                return "", collected
            deltas = self._text_deltas(choice.gen, choice.events, body.stop_list, choice, collected)
            return "".join([d async for d in deltas]), collected

        results = await _all([run(c) for c in choices])
        echo = isinstance(body, CompletionRequest) and body.echo
        scores = await self._prompt_scores(choices, want) if echo and want is not None else {}
        usage = Usage(
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
            total_tokens=ctx.prompt_tokens + ctx.completion_tokens,
        )
        bodies = []
        for choice, (text, collected) in zip(choices, results, strict=True):
            head = self._echo_text(body, choice) if echo else ""
            logprobs = None
            if want is not None:
                logprobs = self._logprobs(collected, chat, len(head))
                if echo:
                    logprobs = _joined(
                        self._prompt_logprobs(choice.prompt_ids, scores[id(choice.prompt_ids)]), logprobs
                    )
            if chat:
                one = chat_body(ctx.request_id, self.model_id, text, choice.finish_reason, usage, logprobs)
                if self._parses_tools(body):
                    assert self.tool_format is not None
                    content, calls = parse_tool_calls(text, self.tool_format)
                    if calls:
                        one["choices"][0]["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                        one["choices"][0]["finish_reason"] = choice.finish_reason = _tool_finish(choice.finish_reason)
            else:
                one = completion_body(ctx.request_id, self.model_id, head + text, choice.finish_reason, usage, logprobs)
            bodies.append(_indexed(one, choice.index))
        result = bodies[0]
        result["choices"] = [b["choices"][0] for b in bodies]
        return result

    def _echo_text(self, body: GenerationBody, choice: _Choice) -> str:
        """The prompt as `echo` returns it: the string sent, or the token-id prompt decoded."""
        prompt = body.prompts[choice.index // body.n] if isinstance(body, CompletionRequest) else ""
        return prompt if isinstance(prompt, str) else self._decode(choice.prompt_ids)

    async def _prompt_scores(self, choices: list[_Choice], top: int) -> dict[int, list[TokenScore]]:
        """Each distinct prompt's token logprobs (serving/scoring.py), keyed by the id of its id list."""
        loop = asyncio.get_running_loop()
        out: dict[int, list[TokenScore]] = {}
        for choice in choices:
            if id(choice.prompt_ids) not in out:
                out[id(choice.prompt_ids)] = await loop.run_in_executor(
                    self._score_pool, prompt_logprobs, self.model, choice.prompt_ids, top
                )
        return out

    def _prompt_logprobs(self, ids: list[int], scores: list[TokenScore]) -> dict[str, Any]:
        """Completions' logprobs of the prompt's tokens (`echo`): the first has none, as in vLLM and OpenAI."""
        text = [self._decode([t]) for t in ids]
        offsets, at = [], 0
        for tok in text:
            offsets.append(at)
            at += len(tok)
        return {
            "tokens": text,
            "token_logprobs": [lp for lp, _ in scores],
            "top_logprobs": [None if lp is None else {self._decode([t]): v for t, v in top} for lp, top in scores],
            "text_offset": offsets,
        }

    def _logprobs(self, events: list[TokenEvent], chat: bool, offset: int = 0) -> dict[str, Any]:
        """OpenAI's `logprobs` of a choice: chat's `content` list, or completions' parallel lists (vLLM's shapes,
        vllm/entrypoints/openai/serving_chat.py `_create_chat_logprobs`, serving_completion.py `_create_logprobs`).
        Every generated token is listed, up to and including one that completed a stop sequence, as in vLLM.
        `offset`: where these tokens' text starts in the choice's text (a stream's later chunks, `echo`)."""
        text = [self._decode([e.token_id]) for e in events]
        tops = [[(self._decode([t]), lp) for t, lp in e.top] for e in events]
        if chat:
            return {
                "content": [
                    {
                        "token": tok,
                        "logprob": e.logprob,
                        "bytes": list(tok.encode()),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top],
                    }
                    for e, tok, top in zip(events, text, tops, strict=True)
                ]
            }
        offsets, at = [], offset
        for tok in text:
            offsets.append(at)
            at += len(tok)
        return {
            "tokens": text,
            "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [dict(top) for top in tops],
            "text_offset": offsets,
        }

    async def stream(self, body: GenerationBody, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """Admit the request, then stream its chunks (see `Backend.stream`)."""
        choices = await self._admit(body, ctx)
        return self._chunks(body, choices, ctx)

    async def _chunks(
        self, body: GenerationBody, choices: list[_Choice], ctx: RequestContext
    ) -> AsyncIterator[dict[str, Any]]:
        """Every choice's chunks, each as soon as it is ready (with `n > 1` or a prompt list, choices interleave,
        told apart by their `index`, as OpenAI streams them), then the usage chunk."""
        chat = isinstance(body, ChatCompletionRequest)
        rid, model = ctx.request_id, self.model_id
        streams = [self._choice_chunks(body, c, ctx) for c in choices]
        merged = streams[0] if len(streams) == 1 else _interleave(streams)
        try:
            async for chunk in merged:
                yield chunk
        finally:
            await merged.aclose()  # type: ignore[attr-defined]  # at once when the client goes: its rows stop
        if body.include_usage:
            usage = Usage(
                prompt_tokens=ctx.prompt_tokens,
                completion_tokens=ctx.completion_tokens,
                total_tokens=ctx.prompt_tokens + ctx.completion_tokens,
            )
            yield chat_chunk(rid, model, {}, None, usage) if chat else completion_chunk(rid, model, "", None, usage)

    async def _choice_chunks(
        self, body: GenerationBody, choice: _Choice, ctx: RequestContext
    ) -> AsyncIterator[dict[str, Any]]:
        """One choice's chunks: (chat) the role, the text deltas with their tokens' logprobs, the finish reason."""
        chat = isinstance(body, ChatCompletionRequest)
        rid, model, i = ctx.request_id, self.model_id, choice.index
        want = body.logprobs_count
        offset = 0
        if chat:
            yield _indexed(chat_chunk(rid, model, {"role": "assistant", "content": ""}, None), i)
        elif isinstance(body, CompletionRequest) and body.echo:
            head = self._echo_text(body, choice)
            logprobs = None
            if want is not None:
                scores = await self._prompt_scores([choice], want)
                logprobs = self._prompt_logprobs(choice.prompt_ids, scores[id(choice.prompt_ids)])
            yield _indexed(completion_chunk(rid, model, head, None), i, logprobs)
            offset = len(head)
        collected: list[TokenEvent] | None = [] if want is not None else None
        sent = 0
        tools = ToolStream(self.tool_format) if self._parses_tools(body) and self.tool_format else None
        if choice.gen is None:
            choice.finish_reason = "length"
        else:
            async for delta in self._text_deltas(choice.gen, choice.events, body.stop_list, choice, collected):
                if tools is not None:  # tool-call markup becomes tool_calls deltas, the rest content deltas
                    for d in tools.feed(delta):
                        yield _indexed(chat_chunk(rid, model, d, None), i)
                    continue
                logprobs = None
                if collected is not None:
                    logprobs = self._logprobs(collected[sent:], chat, offset)
                    sent = len(collected)
                offset += len(delta)
                one = (
                    chat_chunk(rid, model, {"content": delta}, None)
                    if chat
                    else completion_chunk(rid, model, delta, None)
                )
                yield _indexed(one, i, logprobs)
        if tools is not None:
            for d in tools.finish():
                yield _indexed(chat_chunk(rid, model, d, None), i)
            if tools.calls:
                choice.finish_reason = _tool_finish(choice.finish_reason)
        rest = None
        if collected is not None and len(collected) > sent:  # tokens whose text never showed (a stop, a special)
            rest = self._logprobs(collected[sent:], chat, offset)
        last = (
            chat_chunk(rid, model, {}, choice.finish_reason)
            if chat
            else completion_chunk(rid, model, "", choice.finish_reason)
        )
        yield _indexed(last, i, rest)

    def _parses_tools(self, body: GenerationBody) -> bool:
        return isinstance(body, ChatCompletionRequest) and body.tool_mode != "none" and self.tool_format is not None


class _Choice:
    """One choice of a request (prompt `index // n`, sample `index % n`): its engine request (None when nothing
    is generated: `echo` with max_tokens 0) and event queue, and its own token count and finish reason, which
    `_text_deltas` fills in and which add up to the request's (`RequestContext`)."""

    def __init__(self, index: int, prompt_ids: list[int], events: asyncio.Queue[Event]) -> None:
        self.index = index
        self.prompt_ids = prompt_ids
        self.events = events
        self.gen: GenerationRequest | None = None
        self.ctx: RequestContext | None = None
        self.siblings: list[_Choice] = [self]
        self._tokens = 0
        self._finish: str | None = None

    def bind(self, ctx: RequestContext, siblings: list[_Choice]) -> None:
        self.ctx, self.siblings = ctx, siblings

    def first_token(self) -> None:
        if self.ctx is not None:
            self.ctx.first_token()

    @property
    def completion_tokens(self) -> int:
        return self._tokens

    @completion_tokens.setter
    def completion_tokens(self, value: int) -> None:
        self._tokens = value
        if self.ctx is not None:
            self.ctx.completion_tokens = sum(c._tokens for c in self.siblings)

    @property
    def finish_reason(self) -> str | None:
        return self._finish

    @finish_reason.setter
    def finish_reason(self, value: str | None) -> None:
        self._finish = value
        if self.ctx is not None:
            self.ctx.finish_reason = value  # the audit line's: the last choice's to finish


def _choice_params(params: SamplingParams, j: int) -> SamplingParams:
    """Choice j's sampling: with a seed, choice j draws from seed + j (mod 2^64), so the choices differ and a
    request with the same seed gets the same choices again (choice 0 is what n=1 gets)."""
    if j == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + j) % 2**64)


def _emitter(relay: _EventRelay, events: asyncio.Queue[Event]) -> Callable[[Event], None]:
    def emit(event: Event) -> None:  # runs on the engine thread
        relay.post(events, event)

    return emit


def _indexed(body: dict[str, Any], index: int, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A one-choice response or chunk body with the choice's `index` (and a chunk's logprobs)."""
    choice = body["choices"][0]
    choice["index"] = index
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return body


def _joined(head: dict[str, Any], tail: dict[str, Any]) -> dict[str, Any]:
    """Two completions logprobs objects, one after the other (the echoed prompt's, then the completion's)."""
    return {k: head[k] + tail[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


async def _all(coros: list[Awaitable[Any]]) -> list[Any]:
    """Run every choice's collection together; the first failure cancels the rest (their engine rows stop)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _interleave(streams: list[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[dict[str, Any]]:
    """Items of several async iterators as each becomes ready; closing this closes them all (their engine rows
    stop)."""
    pending: dict[asyncio.Future[dict[str, Any]], AsyncIterator[dict[str, Any]]] = {
        asyncio.ensure_future(anext(s)): s for s in streams
    }
    order = {id(s): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: order[id(pending[f])]):
                stream = pending.pop(fut)
                try:
                    item = fut.result()
                except StopAsyncIteration:
                    continue
                yield item
                pending[asyncio.ensure_future(anext(stream))] = stream
    finally:
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]


def _tool_finish(reason: str | None) -> str | None:
    """OpenAI's finish_reason of an answer that called tools (a cut-off one stays "length")."""
    return "tool_calls" if reason == "stop" else reason


def _template_message(m: Any, content: str) -> dict[str, Any]:
    """A history message as chat templates take it, with its tool calls or the id of the call it answers."""
    out: dict[str, Any] = {"role": m.role, "content": content}
    if m.tool_calls:
        out["tool_calls"] = template_tool_calls(m.tool_calls)
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None and m.role == "tool":
        out["name"] = m.name
    return out


def _prefix_cache(cfg: ServingConfig, observer: object) -> PrefixCache | None:
    if not cfg.prefix_cache_mb:
        return None
    hook = observer if hasattr(observer, "prefix_cache") else None
    return PrefixCache(cfg.prefix_cache_mb * 2**20, observer=hook)  # type: ignore[arg-type]


class _EventRelay:
    """Carries engine-thread events to the event loop with one wake-up per burst (a decode step emits one token for
    every row), instead of one cross-thread wake-up per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []
        self._scheduled = False
        self._lock = threading.Lock()

    def post(self, queue: asyncio.Queue[Event], event: Event) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


def _fast_decode(tokenizer: PreTrainedTokenizerBase) -> Callable[..., str]:
    """The Rust tokenizer's own `decode` when it gives the same text as the wrapper's (no clean-up pass): the
    wrapper's Python costs ~4x the decode itself, twice per streamed token on the event loop."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer.decode
    return backend.decode


def _find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Index of the earliest stop sequence in the not-yet-final part of text."""
    hits = [i for s in stops if (i := text.find(s, max(0, sent - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop sequence.

    Only positions in the tail where the stop's first character occurs are tried (str.find, in C), leftmost first:
    the first match is the longest. Trying every length with a fresh slice cost O(len(stop)^2) per token."""
    best = 0
    for s in stops:
        tail = text[-(len(s) - 1) :] if len(s) > 1 else ""
        i = tail.find(s[0])
        while i >= 0 and len(tail) - i > best:
            if s.startswith(tail[i:]):
                best = len(tail) - i
                break
            i = tail.find(s[0], i + 1)
    return best
