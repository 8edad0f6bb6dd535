"""SIGTERM drains: in-flight streams complete, new work is refused, the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx

from tests.serving.conftest import MODEL_ID, ServerFactory

STREAMS = 3
TOKENS = 120


def test_sigterm_finishes_in_flight_streams_then_exits_0(start_server: ServerFactory, debug_model_dir: Path) -> None:
    server = start_server(
        "--model", str(debug_model_dir), "--served-model-name", MODEL_ID, "--drain-timeout-s", "60",
        "--allow-unauthenticated",
    )  # fmt: skip
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "tell me everything"}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = threading.Barrier(STREAMS + 1, timeout=60)
    results: list[list[str]] = [[] for _ in range(STREAMS)]

    def consume(i: int) -> None:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            first = True
            for line in r.iter_lines():
                if line:
                    results[i].append(line)
                    if first:
                        first = False
                        started.wait()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    started.wait()  # every stream has its first bytes
    server.proc.send_signal(signal.SIGTERM)
    at_signal = [len(lines) for lines in results]
    for t in threads:
        t.join(120)
    assert server.proc.wait(60) == 0
    # the streams were really in flight: each received more events after the signal
    assert all(n < len(lines) for n, lines in zip(at_signal, results, strict=True))
    for lines in results:
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2].removeprefix("data: "))["usage"]
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-2]]
        assert usage["completion_tokens"] == TOKENS or "stop" in finish  # ran to the end (or hit eos)
        assert finish[-1] in ("length", "stop")
    assert "lifecycle: signal 15: draining" in server.logs()
    try:
        r = httpx.get(server.url + "/readyz", timeout=2)
        refused = r.status_code != 200
    except httpx.TransportError:
        refused = True
    assert refused
