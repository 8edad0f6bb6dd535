"""Serving on a real model (SmolLM2-135M-Instruct, ops/smollm2.py), in one run with alternating rounds:

- sequential `generate` in this process (one request at a time: what a naive server does);
- our engine fp32 and our engine `--quantization int8` (`python -m serving`);
- `transformers serve --continuous-batching` (what a user could pick instead);

each at 1 and 16 concurrent streaming chat clients (tokens/s, TTFT p50/p99, peak RSS of the server); then TTFT with and
without prefix caching on chat prompts that share a ~200-token system prompt (our fp32 engine with the default cache
vs `--prefix-cache-mb 0`, alternating request by request).

    .venv/bin/python bench/serve_real.py [--rounds 3] [--max-tokens 64] [--threads 1]

Every server and the baseline get the same CPU threads (`--threads`; `OMP_NUM_THREADS` for `transformers serve`).
Completion tokens are counted the same way for every server: the streamed text re-tokenized (no EOS), so no server
gains from its own usage accounting. Ratios are per round against `transformers serve` in the same round, then the
median over rounds. Compare within one run only: neighbours' jobs change the machine's speed from minute to minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.serve_throughput import pct  # noqa: E402
from ops.net import free_port  # noqa: E402
from ops.smollm2 import ensure as smollm2_dir  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about autumn.",
    "Explain what a GPU does.",
    "Give me three tips for a job interview.",
    "How does a refrigerator work?",
    "What is the difference between weather and climate?",
    "Describe a cat to someone who has never seen one.",
    "Why do we need sleep?",
    "What is machine learning?",
    "Suggest a name for a bakery.",
    "How do plants make food?",
    "What is the tallest mountain on Earth?",
    "Write a sentence using the word 'serendipity'.",
    "What are the primary colors?",
    "How many legs does a spider have?",
    "What is a black hole?",
]

# ~200 tokens of a system prompt shared by every request of the prefix-cache measurement
SYSTEM_PROMPT = (
    "You are the support assistant of Acme Cloud, a platform that runs containers, managed databases and machine "
    "learning models for small and medium businesses. Answer in a friendly, professional tone and keep answers short: "
    "two or three sentences unless the user asks for detail. Never invent product names, prices or limits; when you "
    "do not know, say so and point the user to the documentation at docs.acme.example or to the support team. Do not "
    "ask for passwords, API keys or payment details, and tell the user to rotate any secret they paste into the chat. "
    "For billing questions, explain that invoices are issued on the first day of each month and can be downloaded "
    "from the console. For outages, refer to the status page before troubleshooting. When the user writes in another "
    "language, answer in that language. Format commands and file names as code. Be concise, accurate and kind."
)


def model_rss_kib(pid: int, field: str = "VmHWM") -> int:
    """Peak (VmHWM) or current (VmRSS) resident memory of a process and its children, KiB."""
    total = 0
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Server:
    def __init__(self, name: str, command: list[str], env: dict[str, str], model: str, ready_path: str) -> None:
        self.name, self.model = name, model
        self.port = free_port()
        command = [c.replace("{port}", str(self.port)) for c in command]
        self.log = open(f"/tmp/bench-serve-real-{name.replace(' ', '_')}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} did not start; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def one_chat(
    client: httpx.AsyncClient, server: Server, messages: list[dict], max_tokens: int, tok
) -> tuple[int, float, float]:
    body = {"model": server.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    ttft = None
    text = ""
    async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content") or ""
                if delta:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text += delta
    total = time.perf_counter() - t0
    return len(tok.encode(text, add_special_tokens=False)), ttft if ttft is not None else total, total


def user(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


async def load(server: Server, clients: int, per_client: int, max_tokens: int, tok) -> tuple[float, list[float]]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:

        async def worker(c: int) -> list[tuple[int, float, float]]:
            return [
                await one_chat(client, server, user(QUESTIONS[(c * per_client + k) % len(QUESTIONS)]), max_tokens, tok)
                for k in range(per_client)
            ]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    return sum(r[0] for r in results) / wall, [r[1] for r in results]


async def prefix_ttft(cached: Server, uncached: Server, n: int, tok) -> tuple[list[float], list[float]]:
    """TTFT of single requests sharing SYSTEM_PROMPT, alternating cached / uncached server (same load for both)."""
    on: list[float] = []
    off: list[float] = []
    async with httpx.AsyncClient(timeout=600) as client:
        for i in range(n):
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, *user(QUESTIONS[i % len(QUESTIONS)])]
            order = (cached, uncached) if i % 2 == 0 else (uncached, cached)
            for s in order:
                _, ttft, _ = await one_chat(client, s, messages, 4, tok)
                (on if s is cached else off).append(ttft)
    return on, off


class Sequential:
    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def run(self, n: int, max_tokens: int) -> float:
        tokens, t0 = 0, time.perf_counter()
        with self.torch.inference_mode():
            for i in range(n):
                ids = self.tok.apply_chat_template(user(QUESTIONS[i % len(QUESTIONS)]), add_generation_prompt=True)
                ids = self.torch.tensor([list(ids["input_ids"])])
                out = self.model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
                text = self.tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                tokens += len(self.tok.encode(text, add_special_tokens=False))
        return tokens / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for every server and the baseline; 0 = each at its own defaults (ours: --torch-threads 0, "
        "the rule in serving/threads.py; transformers serve and the baseline: torch's default, OMP_NUM_THREADS unset)",
    )
    parser.add_argument("--per-client-16", type=int, default=2, help="requests per client at 16 clients")
    parser.add_argument("--requests-1", type=int, default=3, help="requests at 1 client (and sequential)")
    parser.add_argument("--prefix-requests", type=int, default=8, help="request pairs per round for prefix TTFT")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = smollm2_dir()
    threads = str(args.threads)
    ours = [sys.executable, "-m", "serving", "--model", str(model_dir), "--served-model-name", "smol"]
    ours += ["--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning", "--torch-threads", threads]
    ours += ["--allow-unauthenticated"]  # loopback-only benchmark servers, no keys
    hf_cli = str(Path(sys.executable).parent / "transformers")
    # PROOF.md: size the paged KV cache explicitly, or continuous batching sizes it from system RAM (9 GB seen)
    hf = [hf_cli, "serve", str(model_dir), "--continuous-batching", "--host", "127.0.0.1", "--port", "{port}"]
    hf += ["--cb-block-size", "32", "--cb-num-blocks", "512", "--cb-max-batch-tokens", "2048", "--dtype", "float32"]
    env = {"OMP_NUM_THREADS": threads} if args.threads else {}
    specs = {
        "transformers serve --continuous-batching": (hf, str(model_dir), "/health"),
        "ours fp32": (ours, "smol", "/readyz"),
        "ours int8": ([*ours, "--quantization", "int8"], "smol", "/readyz"),
        "ours fp32, no prefix cache": ([*ours, "--prefix-cache-mb", "0"], "smol", "/readyz"),
    }
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    sequential = Sequential(model_dir)
    sequential.run(1, 8)  # warm up
    servers: dict[str, Server] = {}
    seq_tps: list[float] = []
    tps: dict[tuple[str, int], list[float]] = {}
    ttfts: dict[tuple[str, int], list[float]] = {}
    pref_on: list[float] = []
    pref_off: list[float] = []
    configs = [(name, c) for name in list(specs)[:3] for c in (1, 16)]
    started = time.time()
    try:
        for name, (cmd, model, ready) in specs.items():
            servers[name] = Server(name, cmd, env, model, ready)
            asyncio.run(load(servers[name], 1, 1, 8, tok))  # warm up (and load the model where lazy)
        for r in range(args.rounds):
            seq_tps.append(sequential.run(args.requests_1, args.max_tokens))
            order = configs if r % 2 == 0 else configs[::-1]
            for name, clients in order:
                per_client = args.requests_1 if clients == 1 else args.per_client_16
                t, tt = asyncio.run(load(servers[name], clients, per_client, args.max_tokens, tok))
                tps.setdefault((name, clients), []).append(t)
                ttfts.setdefault((name, clients), []).extend(tt)
                print(f"  round {r + 1} {name:42s} {clients:2d} clients {t:7.1f} tokens/s", flush=True)
            on, off = asyncio.run(
                prefix_ttft(servers["ours fp32"], servers["ours fp32, no prefix cache"], args.prefix_requests, tok)
            )
            pref_on += on
            pref_off += off
        rss = {name: model_rss_kib(s.proc.pid) for name, s in servers.items()}
        rss_now = {name: model_rss_kib(s.proc.pid, "VmRSS") for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()

    hf_name = "transformers serve --continuous-batching"
    load_avg = os.getloadavg()
    print(
        f"\nSmolLM2-135M-Instruct, {args.max_tokens} tokens/request, temperature 0, "
        f"{f'{args.threads} thread(s) each' if args.threads else 'each at its default threads'}, "
        f"{args.rounds} rounds, {time.time() - started:.0f} s; load average now {load_avg[0]:.1f} {load_avg[1]:.1f}"
    )
    print(f"sequential generate: {statistics.median(seq_tps):7.1f} tokens/s (median of rounds)")
    for clients in (1, 16):
        for name in list(specs)[:3]:
            key = (name, clients)
            vs_hf = statistics.median(a / b for a, b in zip(tps[key], tps[(hf_name, clients)], strict=True))
            vs_seq = statistics.median(a / b for a, b in zip(tps[key], seq_tps, strict=True))
            print(
                f"{name:42s} {clients:2d} clients: {statistics.median(tps[key]):7.1f} tokens/s  "
                f"vs transformers serve {vs_hf:5.2f}x  vs sequential {vs_seq:5.2f}x  "
                f"ttft p50 {pct(ttfts[key], 0.5) * 1000:7.0f} ms  p99 {pct(ttfts[key], 0.99) * 1000:7.0f} ms  "
                f"RSS {rss_now[name] / 1024:5.0f} MiB (peak {rss[name] / 1024:5.0f})"
            )
    p50_on, p50_off = pct(pref_on, 0.5), pct(pref_off, 0.5)
    system_tokens = len(tok.encode(SYSTEM_PROMPT, add_special_tokens=False))
    print(
        f"prefix cache, {system_tokens}-token shared system prompt, {len(pref_on)} requests each: TTFT p50 "
        f"{p50_on * 1000:.0f} ms with / {p50_off * 1000:.0f} ms without (ratio {p50_on / p50_off:.2f}); "
        f"p99 {pct(pref_on, 0.99) * 1000:.0f} / {pct(pref_off, 0.99) * 1000:.0f} ms"
    )
    for name in ("ours int8", "ours fp32"):
        ratio = statistics.median(a / b for a, b in zip(tps[(name, 16)], tps[(hf_name, 16)], strict=True))
        print(f"ratio_16 {name.split()[-1]} vs transformers serve: {ratio:.2f}")
    print(f"prefix_ttft_ratio: {p50_on / p50_off:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
