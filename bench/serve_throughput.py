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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
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


def sequential_generate(model_dir: Path, n: int, max_tokens: int, threads: int) -> float:
    """tokens/s of one `generate` call per request, one request at a time (what a naive server does)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eos = set(model.generation_config.eos_token_id or [])
    model.generate(torch.tensor([tok.encode("warm up")]), max_new_tokens=4, pad_token_id=tok.pad_token_id)
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            ids = torch.tensor([tok.encode(PROMPTS[i % len(PROMPTS)])])
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1] :].tolist()
            tokens += next((j for j, t in enumerate(new) if t in eos), len(new))
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


async def paired_latency(direct: str, front: str, n: int, max_tokens: int) -> tuple[float, float]:
    """Median latency of the same greedy non-streaming request, alternating direct / through the gateway."""
    body = {"model": "debug-model", "prompt": "gateway overhead", "max_tokens": max_tokens, "temperature": 0}
    times: dict[str, list[float]] = {direct: [], front: []}
    async with httpx.AsyncClient(timeout=300) as client:
        for url in (direct, front):
            (await client.post(url + "/v1/completions", json=body)).raise_for_status()
        for i in range(2 * n):
            url = (direct, front)[i % 2]
            t0 = time.perf_counter()
            (await client.post(url + "/v1/completions", json=body)).raise_for_status()
            times[url].append(time.perf_counter() - t0)
    return statistics.median(times[direct]), statistics.median(times[front])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--sequential-requests", type=int, default=16)
    parser.add_argument("--overhead-requests", type=int, default=20)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="CPU threads for both the baseline and the server (on shared cores 2 threads ran ~15x slower than 1)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from training.debug_model import write_debug_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_debug_model(Path(tmp) / "debug-model")
        seq = sequential_generate(model_dir, args.sequential_requests, args.max_tokens, args.torch_threads)
        print(f"sequential generate: {seq:8.1f} tokens/s  ({args.sequential_requests} requests, one at a time)")

        results: dict[tuple[str, int], float] = {}
        for policy in ("continuous", "dynamic"):
            proc, url = start(
                "--model", str(model_dir), "--served-model-name", "debug-model", "--batching", policy,
                "--torch-threads", str(args.torch_threads),
            )  # fmt: skip
            try:
                for clients in (1, 4, 16) if policy == "continuous" else (16,):
                    tps, ttfts = asyncio.run(load(url, clients, args.requests_per_client, args.max_tokens))
                    results[(policy, clients)] = tps
                    print(
                        f"server {policy:10s} {clients:2d} clients: {tps:8.1f} tokens/s  ratio {tps / seq:5.2f}  "
                        f"ttft p50 {pct(ttfts, 0.5) * 1000:7.1f} ms  p99 {pct(ttfts, 0.99) * 1000:7.1f} ms"
                    )
                if policy == "continuous":
                    front, front_url = start("--upstream", url)
                    try:
                        d, f = asyncio.run(paired_latency(url, front_url, args.overhead_requests, args.max_tokens))
                    finally:
                        stop(front)
                    print(
                        f"gateway overhead: direct {d * 1000:.1f} ms, through gateway {f * 1000:.1f} ms "
                        f"(median of {args.overhead_requests}): +{(f / d - 1) * 100:.1f}%"
                    )
            finally:
                stop(proc)
        print(f"continuous / dynamic at 16 clients: {results[('continuous', 16)] / results[('dynamic', 16)]:.2f}")
        print(f"ratio_16: {results[('continuous', 16)] / seq:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
