"""Connections and shutdown: idle and half-sent sockets are closed, a connection cap keeps descriptors for probes,
the drain deadline answers cut requests properly, and repeated signals still exit 0."""

from __future__ import annotations

import json
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import MODEL_ID, ServerFactory, ServingProcess


@pytest.fixture(scope="module")
def guarded(start_server: ServerFactory, debug_model_dir: Path) -> ServingProcess:
    return start_server(
        "--model", str(debug_model_dir), "--served-model-name", MODEL_ID, "--allow-unauthenticated",
        "--header-timeout-s", "1", "--keepalive-timeout-s", "1", "--max-connections", "40",
    )  # fmt: skip


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connection_is_closed_after_the_header_timeout(guarded: ServingProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as idle:
        assert closed_within(idle, 5)


def test_half_sent_request_head_is_closed_even_if_it_trickles(guarded: ServingProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as slow:
        started = time.monotonic()
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        closed = False
        while time.monotonic() - started < 5:
            try:
                slow.sendall(b"X-Slow: 1\r\n")  # a byte now and then used to keep the connection forever
            except OSError:
                closed = True
                break
            if closed_within(slow, 0.3):
                closed = True
                break
        assert closed and time.monotonic() - started < 4


def test_kept_alive_connection_serves_several_requests(guarded: ServingProcess) -> None:
    with httpx.Client(base_url=guarded.url) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200


def test_connection_cap_and_timeouts_keep_probes_alive(guarded: ServingProcess) -> None:
    socks = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(120)]
    try:
        over = sum(closed_within(s, 0.5) for s in socks[60:])
        assert over >= 50  # beyond the cap of 40: closed at once
        time.sleep(1.5)  # the header timeout frees the idle ones
        assert httpx.get(guarded.url + "/healthz", timeout=5).status_code == 200
    finally:
        for s in socks:
            s.close()


def test_descriptor_exhaustion_does_not_stop_probes_or_flood_the_log(
    start_server: ServerFactory, debug_model_dir: Path
) -> None:
    """A file limit of 256 (the automatic cap is then 128 connections): 400 idle sockets without a key."""

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    import subprocess

    real_popen = subprocess.Popen

    def popen(*args, **kwargs):  # type: ignore[no-untyped-def]
        return real_popen(*args, preexec_fn=low_limit, **kwargs)

    subprocess.Popen = popen  # type: ignore[misc]
    try:
        server = start_server(
            "--model", str(debug_model_dir), "--served-model-name", MODEL_ID, "--allow-unauthenticated",
            "--header-timeout-s", "2",
        )  # fmt: skip
    finally:
        subprocess.Popen = real_popen  # type: ignore[misc]
    log_before = len(server.logs())
    socks = []
    try:
        for _ in range(400):
            try:
                socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
            except OSError:
                break
        deadline = time.monotonic() + 10
        ok = False
        while time.monotonic() < deadline and not ok:
            try:
                ok = httpx.get(server.url + "/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                time.sleep(0.5)
        assert ok, "health checks starved"
        assert server.proc.poll() is None
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    assert len(server.logs()) - log_before < 20_000  # a few lines, not a storm
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200


def test_drain_deadline_cuts_with_openai_errors_and_audit_lines(
    start_server: ServerFactory, debug_model_dir: Path
) -> None:
    server = start_server(
        "--model", str(debug_model_dir), "--served-model-name", MODEL_ID, "--allow-unauthenticated",
        "--drain-timeout-s", "0.3", "--max-batch-size", "2",
    )  # fmt: skip
    stream_body = {"model": MODEL_ID, "prompt": "go on", "max_tokens": 480, "temperature": 0, "stream": True}
    started = threading.Barrier(3, timeout=60)
    lines: list[str] = []
    plain: list[httpx.Response] = []

    def stream() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", json=stream_body, timeout=60) as r:
            it = r.iter_lines()
            lines.append(next(it))
            started.wait()
            lines.extend(line for line in it if line)

    def whole() -> None:
        started.wait()
        plain.append(httpx.post(server.url + "/v1/completions", json={**stream_body, "stream": False}, timeout=60))

    threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.2)  # the non-streaming request is in flight too (a batch of 2: both are decoding)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert server.proc.wait(30) == 0
    assert lines[-1] == "data: [DONE]"
    cut = json.loads(lines[-2][6:])
    assert cut["error"]["code"] == "drain_deadline", lines[-3:]
    assert plain[0].status_code == 503 and plain[0].json()["error"]["code"] == "drain_deadline"
    audit = [a for a in server.audit_lines() if a["error_code"] == "drain_deadline"]
    assert len(audit) == 2 and {a["stream"] for a in audit} == {True, False}


def test_a_repeated_signal_still_exits_0(start_server: ServerFactory, debug_model_dir: Path) -> None:
    server = start_server(
        "--model", str(debug_model_dir), "--served-model-name", MODEL_ID, "--allow-unauthenticated",
        "--drain-timeout-s", "5",
    )  # fmt: skip
    body = {"model": MODEL_ID, "prompt": "go on", "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())
        for _ in range(4):  # during the drain, and again during teardown
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.15)
    assert server.proc.wait(30) == 0


def test_sigterm_while_the_model_loads_exits_0(debug_model_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from ops.net import free_port
    from tests.helpers import REPO_ROOT

    err = (tmp_path / "stderr").open("w+b")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(free_port()), "--model",
         str(debug_model_dir), "--allow-unauthenticated"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"loading the engine" not in (tmp_path / "stderr").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        err.close()
