"""Serving throughput on the debug model: the server under 1, 4 and 16 concurrent streaming clients versus calling
`generate` one request at a time in this process; time to first token; the gateway's added latency.

    .venv/bin/python bench/serve_throughput.py [--max-tokens 32] [--requests-per-client 4]

Prints ratios, not verdicts. The last line is `ratio_16: X` (server at 16 clients / sequential generate).
Numbers are noisy on shared machines: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from ops.net import free_port  # noqa: E402

PROMPTS = [
    "The platform serves models to applications",
    "Once upon a time",
    "Batching concurrent requests",
    "A short prompt",
    "Kubernetes schedules pods onto nodes with free GPUs",
    "hello",
    "The quick brown fox jumps over the lazy dog",
    "Tokens per second",
]


def start(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = ("--allow-unauthenticated", *args)  # loopback-only benchmark servers, no keys
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(60)


class Sequential:
    """One `generate` call per request, one request at a time, in this process (what a naive server does)."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.eos = set(self.model.generation_config.eos_token_id or [])
        self.run(1, 4)  # warm up

    def run(self, n: int, max_tokens: int) -> float:
        """tokens/s over n requests."""
        tokens, t0 = 0, time.perf_counter()
        with self.torch.inference_mode():
            for i in range(n):
                ids = self.torch.tensor([self.tok.encode(PROMPTS[i % len(PROMPTS)])])
                out = self.model.generate(
                    ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tok.pad_token_id
                )
                new = out[0, ids.shape[1] :].tolist()
                tokens += next((j for j, t in enumerate(new) if t in self.eos), len(new))
        return tokens / (time.perf_counter() - t0)


async def one_stream(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> tuple[int, float, float]:
    body = {
        "model": "debug-model",
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return tokens, ttft if ttft is not None else total, total


async def load(url: str, clients: int, per_client: int, max_tokens: int) -> tuple[float, list[float]]:
    """Closed loop: each client sends its next request when the previous one ends. Returns tokens/s and TTFTs."""
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await one_stream(client, url, 0, 4)  # warm up

        async def worker(c: int) -> list[tuple[int, float, float]]:
            return [await one_stream(client, url, c * per_client + k, max_tokens) for k in range(per_client)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    return sum(r[0] for r in results) / wall, [r[1] for r in results]


async def paired_latency(direct: str, front: str, n: int, max_tokens: int) -> tuple[float, float, float]:
    """The same greedy non-streaming request, alternating direct / through the gateway, so both see the same load.

    Returns the median direct latency, the median gateway latency and the median of the per-pair ratios (robust to
    load drifting during the run).
    """
    body = {"model": "debug-model", "prompt": "gateway overhead", "max_tokens": max_tokens, "temperature": 0}
    pairs: list[tuple[float, float]] = []
    async with httpx.AsyncClient(timeout=300) as client:
        for url in (direct, front):
            (await client.post(url + "/v1/completions", json=body)).raise_for_status()
        for i in range(n):
            times = []
            for url in (direct, front) if i % 2 == 0 else (front, direct):
                t0 = time.perf_counter()
                (await client.post(url + "/v1/completions", json=body)).raise_for_status()
                times.append(time.perf_counter() - t0)
            pairs.append((times[0], times[1]) if i % 2 == 0 else (times[1], times[0]))
    return (
        statistics.median(d for d, _ in pairs),
        statistics.median(f for _, f in pairs),
        statistics.median(f / d for d, f in pairs),
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--sequential-requests", type=int, default=8)
    parser.add_argument("--overhead-requests", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="measurements alternate over rounds; medians reported")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="CPU threads for both the baseline and the server (on shared cores 2 threads ran ~15x slower than 1)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from training.debug_model import write_debug_model

    # Neighbours' jobs make the machine's speed drift within seconds: every round measures the baseline and each
    # server configuration back to back, and the ratios are taken per round, then the median over rounds.
    seq_tps: list[float] = []
    tps: dict[tuple[str, int], list[float]] = {}
    ttfts: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_debug_model(Path(tmp) / "debug-model")
        sequential = Sequential(model_dir, args.torch_threads)
        servers = {
            policy: start(
                "--model",
                str(model_dir),
                "--served-model-name",
                "debug-model",
                "--batching",
                policy,
                "--torch-threads",
                str(args.torch_threads),
            )
            for policy in ("continuous", "dynamic")
        }
        configs = [("continuous", 1), ("continuous", 4), ("continuous", 16), ("dynamic", 16)]
        try:
            for _ in range(args.rounds):
                seq_tps.append(sequential.run(args.sequential_requests, args.max_tokens))
                for policy, clients in configs:
                    url = servers[policy][1]
                    t, ttft = asyncio.run(load(url, clients, args.requests_per_client, args.max_tokens))
                    tps.setdefault((policy, clients), []).append(t)
                    ttfts.setdefault((policy, clients), []).extend(ttft)
            front, front_url = start("--upstream", servers["continuous"][1])
            try:
                direct_s, front_s, overhead = asyncio.run(
                    paired_latency(servers["continuous"][1], front_url, args.overhead_requests, args.max_tokens)
                )
            finally:
                stop(front)
        finally:
            for proc, _ in servers.values():
                stop(proc)

    def ratio(key: tuple[str, int]) -> float:
        return statistics.median(t / s for t, s in zip(tps[key], seq_tps, strict=True))

    print(f"sequential generate: {statistics.median(seq_tps):8.1f} tokens/s (median of {args.rounds} rounds)")
    for key in configs:
        policy, clients = key
        print(
            f"server {policy:10s} {clients:2d} clients: {statistics.median(tps[key]):8.1f} tokens/s  "
            f"ratio {ratio(key):5.2f}  ttft p50 {pct(ttfts[key], 0.5) * 1000:7.1f} ms  "
            f"p99 {pct(ttfts[key], 0.99) * 1000:7.1f} ms"
        )
    cont_vs_dyn = statistics.median(c / d for c, d in zip(tps[("continuous", 16)], tps[("dynamic", 16)], strict=True))
    print(f"continuous / dynamic at 16 clients: {cont_vs_dyn:.2f}")
    print(
        f"gateway overhead: direct {direct_s * 1000:.1f} ms, through gateway {front_s * 1000:.1f} ms "
        f"(medians of {args.overhead_requests} pairs); median per-pair overhead +{(overhead - 1) * 100:.1f}%"
    )
    print(f"ratio_16: {ratio(('continuous', 16)):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
