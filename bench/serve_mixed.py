"""Mixed multi-tenant load on the built-in engine: short chat tenants with and without a tenant sending long prompts.

    .venv/bin/python bench/serve_mixed.py [--clients 16] [--long-tokens 4096] [--rounds 2] [--baseline-tree DIR]

Each server configuration runs two phases, back to back, in every round (configurations alternate within a round,
so they see the same machine load):
- `alone`: `--clients` short-chat tenants (one API key each), closed loop, `--requests` each;
- `mixed`: the same, while one more tenant (its own key) keeps sending long prompts (`--long-tokens`, max_tokens 1,
  a fresh prefix each so the prefix cache cannot help) for the whole phase, `--long-clients` at a time.
It prints the short tenants' time to first token and per-request decode rate (tokens/s after the first token),
p50/p99, for both phases, and the ratios mixed/alone; and the `alone` throughput of each configuration against the
first one. Configurations:
- `after`: this tree, default flags (chunked prefill, fair admission, per-key prefill cap);
- `unchunked`: this tree with `--max-batched-tokens 1000000 --max-key-prefill-tokens 0` (whole prompts between two
  steps, no per-key cap; admission still round-robin across keys);
- `before` (with `--baseline-tree`): the server from another checkout (e.g. `git worktree add /tmp/base main`).

A phase stops after `--phase-timeout` seconds (300 by default): without it, whole-prompt prefill at the issue's size
did not finish its 64 short requests in 15 minutes. Requests still waiting then count with their wait so far as their
time to first token (a lower bound), and the line says TIMED OUT.

With `--sweep-threads`, instead: only the short tenants (no long tenant), for fp32 and int8 each at the default
threads (`--torch-threads 0`) and at every count from 1 to the CPUs this process may use, configurations alternating
within each round; it prints each configuration's tokens/s and `default_vs_best_<quantization>`: the default's
tokens/s over the best count's (serving/threads.py `engine_threads` is the rule under test).

Prints ratios, not verdicts; numbers are noisy on shared machines: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from ops.net import free_port  # noqa: E402

SHORT_PROMPTS = [
    "What is a Kubernetes pod?",
    "Say hello in French.",
    "Name three prime numbers.",
    "What does a load balancer do?",
    "Give me a synonym for fast.",
    "What colour is the sky?",
    "Summarise: the cat sat on the mat.",
    "What is 12 times 12?",
]
WORDS = [
    *("the", "platform", "serves", "models", "to", "many", "tenants", "while"),
    *("a", "scheduler", "shares", "each", "step", "fairly", "among", "them"),
]


def start(tree: Path, model_dir: Path, keys_file: Path, flags: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--model",
            str(model_dir),
            "--served-model-name",
            "smol",
            "--api-keys-file",
            str(keys_file),
            "--default-rpm",
            "1000000",
            "--default-tpm",
            "100000000",
            "--max-tokens-cap",
            "4096",
            *flags,
        ],
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server {flags} from {tree} did not start")


def long_prompt(tokens: int) -> str:
    """About `tokens` tokens of text (SmolLM2's tokenizer: ~1 token per word here), a random first line so no two
    share a cached prefix."""
    rng = random.Random(secrets.randbits(32))
    return secrets.token_hex(8) + " " + " ".join(rng.choice(WORDS) for _ in range(tokens))


async def chat(
    client: httpx.AsyncClient, url: str, key: str, content: str, max_tokens: int
) -> tuple[int, float, float]:
    """(completion tokens, ttft, total seconds) of one streamed chat request."""
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return tokens, ttft if ttft is not None else total, total


async def phase(url: str, keys: dict[str, str], args: argparse.Namespace, with_long: bool) -> dict[str, object]:
    limits = httpx.Limits(max_connections=args.clients + args.long_clients + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        stop = asyncio.Event()
        long_done = 0

        async def long_tenant() -> None:
            nonlocal long_done
            while not stop.is_set():
                await chat(client, url, keys["long"], long_prompt(args.long_tokens), 1)
                long_done += 1

        results: list[tuple[int, float, float]] = []
        started: dict[int, float] = {}  # short tenant -> when its request in flight was sent

        async def short_tenant(c: int) -> None:
            key = keys[f"short{c}"]
            for k in range(args.requests):
                started[c] = time.perf_counter()
                results.append(
                    await chat(client, url, key, SHORT_PROMPTS[(c + k) % len(SHORT_PROMPTS)], args.max_tokens)
                )
                del started[c]

        longs = [asyncio.create_task(long_tenant()) for _ in range(args.long_clients if with_long else 0)]
        if longs:
            await asyncio.sleep(args.long_head_start)  # the long prompts are already in the engine
        t0 = time.perf_counter()
        shorts = [asyncio.create_task(short_tenant(c)) for c in range(args.clients)]
        _, pending = await asyncio.wait(shorts, timeout=args.phase_timeout or None)
        wall = time.perf_counter() - t0
        # A phase cut at --phase-timeout: a request still waiting counts with its wait so far as its time to first
        # token (a lower bound), so the percentiles stay comparable and never flatter the configuration that timed out.
        censored = [(0, wall + t0 - sent, wall + t0 - sent) for sent in started.values()] if pending else []
        for task in pending:
            task.cancel()
        stop.set()
        for task in longs:
            if pending:
                task.cancel()
            else:  # let the last long request finish (max_tokens 1) rather than cut a connection
                await task
        await asyncio.gather(*pending, *longs, return_exceptions=True)
    ttfts = [r[1] for r in results] + [r[1] for r in censored]
    rates = [(r[0] - 1) / (r[2] - r[1]) for r in results if r[0] > 1 and r[2] > r[1]]
    return {
        "ttft": ttfts,
        "rate": rates,
        "throughput": sum(r[0] for r in results) / wall,
        "long_done": long_done,
        "timed_out": len(censored),
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="short-chat tenants, one key each")
    parser.add_argument("--requests", type=int, default=4, help="requests per short tenant per phase")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens per short request")
    parser.add_argument("--long-tokens", type=int, default=4096, help="approximate tokens per long prompt")
    parser.add_argument("--long-clients", type=int, default=2, help="long prompts the long tenant keeps in flight")
    parser.add_argument("--long-head-start", type=float, default=1.0, help="seconds the long tenant starts first")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-tree", type=Path, help="a checkout of the code before, served as `before`")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--torch-threads", type=int, default=0, help="0 = the server's default")
    parser.add_argument("--budget", type=int, action="append", default=[], help="also this --max-batched-tokens")
    parser.add_argument("--only", default="", help="comma-separated configurations to run, e.g. after,budget64")
    parser.add_argument("--sweep-threads", action="store_true", help="compare thread counts (see above)")
    parser.add_argument(
        "--phase-timeout",
        type=float,
        default=300,
        help="seconds after which a phase stops; requests still waiting count with their wait so far (0 = none)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from ops.smollm2 import ensure

    model_dir = ensure()
    if args.sweep_threads:
        return sweep_threads(args, model_dir)
    common = ["--quantization", args.quantization, "--torch-threads", str(args.torch_threads)]
    configs: dict[str, tuple[Path, list[str]]] = {"after": (REPO_ROOT, common)}
    unlimited = ["--max-batched-tokens", "1000000", "--max-key-prefill-tokens", "0"]
    configs["unchunked"] = (REPO_ROOT, [*common, *unlimited])
    if args.baseline_tree:
        configs["before"] = (args.baseline_tree.resolve(), common)
    for budget in args.budget:
        configs[f"budget{budget}"] = (REPO_ROOT, [*common, "--max-batched-tokens", str(budget)])
    if args.only:
        configs = {name: configs[name] for name in args.only.split(",")}
    keys = {f"short{c}": secrets.token_hex(16) for c in range(args.clients)} | {"long": secrets.token_hex(16)}
    results: dict[tuple[str, str], list[dict[str, object]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = Path(tmp) / "keys"
        keys_file.write_text("".join(f"{name} {key}\n" for name, key in keys.items()))
        keys_file.chmod(0o600)
        for rnd in range(args.rounds):
            for name, (tree, flags) in configs.items():  # one server at a time: they would share the 2 cores
                proc, url = start(tree, model_dir, keys_file, flags)
                try:
                    asyncio.run(phase(url, keys, argparse.Namespace(**{**vars(args), "requests": 1}), False))  # warm
                    for label, with_long in (("alone", False), ("mixed", True)):
                        res = asyncio.run(phase(url, keys, args, with_long))
                        results.setdefault((name, label), []).append(res)
                        print(
                            f"round {rnd} {name:9} {label}: ttft p50 {pct(res['ttft'], 0.5):.2f}s "  # type: ignore[arg-type]
                            f"p99 {pct(res['ttft'], 0.99):.2f}s, {res['throughput']:.1f} tok/s, "  # type: ignore[arg-type]
                            f"long prompts done {res['long_done']}"
                            + (f", TIMED OUT with {res['timed_out']} requests waiting" if res["timed_out"] else ""),
                            flush=True,
                        )
                finally:
                    proc.terminate()
                    proc.wait(120)
    print(
        f"\nSmolLM2-135M, {args.clients} short tenants x {args.requests} requests x {args.max_tokens} tokens, "
        f"long tenant {args.long_clients} x ~{args.long_tokens}-token prompts, {args.rounds} rounds, "
        f"quantization {args.quantization}, torch threads {args.torch_threads or 'default'}"
    )
    print("config     phase  ttft_p50  ttft_p99  rate_p50  rate_p99(slowest)  tok/s")
    for (name, label), runs in results.items():
        ttft = [t for r in runs for t in r["ttft"]]  # type: ignore[attr-defined]
        rate = [t for r in runs for t in r["rate"]]  # type: ignore[attr-defined]
        tput = sum(r["throughput"] for r in runs) / len(runs)  # type: ignore[misc]
        print(
            f"{name:10} {label:5}  {pct(ttft, 0.5):7.2f}s  {pct(ttft, 0.99):7.2f}s  {pct(rate, 0.5):7.1f}  "
            f"{pct(rate, 0.01):7.1f}           {tput:6.1f}"
        )
    for name in configs:
        alone = [t for r in results[(name, "alone")] for t in r["ttft"]]  # type: ignore[attr-defined]
        mixed = [t for r in results[(name, "mixed")] for t in r["ttft"]]  # type: ignore[attr-defined]
        print(f"ttft_p99_ratio_{name}: {pct(mixed, 0.99) / pct(alone, 0.99):.2f} (mixed / alone)")
    first = next(iter(configs))
    base = sum(r["throughput"] for r in results[(first, "alone")])  # type: ignore[misc]
    for name in configs:
        tput = sum(r["throughput"] for r in results[(name, "alone")])  # type: ignore[misc]
        print(f"throughput_alone_{name}_vs_{first}: {tput / base:.3f}")
    return 0


def sweep_threads(args: argparse.Namespace, model_dir: Path) -> int:
    from serving.threads import cpu_budget

    counts = range(1, cpu_budget().threads + 1)
    configs = {(q, t): ["--quantization", q, "--torch-threads", str(t)] for q in ("none", "int8") for t in (0, *counts)}
    keys = {f"short{c}": secrets.token_hex(16) for c in range(args.clients)} | {"long": secrets.token_hex(16)}
    tps: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys_file = Path(tmp) / "keys"
        keys_file.write_text("".join(f"{name} {key}\n" for name, key in keys.items()))
        keys_file.chmod(0o600)
        for rnd in range(args.rounds):
            for (quant, threads), flags in configs.items():
                proc, url = start(REPO_ROOT, model_dir, keys_file, flags)
                try:
                    asyncio.run(phase(url, keys, argparse.Namespace(**{**vars(args), "requests": 1}), False))
                    res = asyncio.run(phase(url, keys, args, False))
                finally:
                    proc.terminate()
                    proc.wait(120)
                tps.setdefault((quant, threads), []).append(res["throughput"])  # type: ignore[arg-type]
                print(f"round {rnd} {quant} threads {threads or 'default'}: {res['throughput']:.1f} tok/s", flush=True)
    print(
        f"\nSmolLM2-135M, {args.clients} clients x {args.requests} requests x {args.max_tokens} tokens, no long tenant"
    )
    for quant in ("none", "int8"):
        mean = {t: sum(v) / len(v) for (q, t), v in tps.items() if q == quant}
        best = max((t for t in mean if t), key=lambda t: mean[t])
        print(f"{quant}: " + ", ".join(f"{t or 'default'} {mean[t]:.1f}" for t in mean) + f" tok/s; best {best}")
        print(f"default_vs_best_{quant}: {mean[0] / mean[best]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
