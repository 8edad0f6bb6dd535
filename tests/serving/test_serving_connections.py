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

from tests.serving.conftest import ALICE_KEY, MODEL_ID, ServerFactory, ServingProcess


@pytest.fixture(scope="module")
def guarded(start_server: ServerFactory, debug_model_dir: Path) -> ServingProcess:
    return start_server(
        "--model", str(debug_model_dir), "--served-model-name", MODEL_ID, "--allow-unauthenticated",
        "--header-timeout-s", "1", "--keepalive-timeout-s", "1", "--max-connections", "40", "--body-timeout-s", "1",
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


# -- early responses, per-peer cap, the operations listener ----------------------------------------------------------


def response_then_closed(sock: socket.socket, trickle: bytes = b"x", within: float = 5.0) -> bytes:
    """The response head the server sends; asserts the server then closes the connection, though the client keeps
    trickling body bytes (one every 0.2 s) as an attacker holding the slot would."""
    sock.settimeout(within)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "closed before answering"
        head += chunk
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            sock.sendall(trickle)
        except OSError:
            return head
        if closed_within(sock, 0.2):
            return head
    raise AssertionError(f"connection still open {within}s after {head.splitlines()[0]!r}")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"Authorization: Bearer sk-wrong-key-0123456789\r\nContent-Length: 1000\r\n", b"401"),
        (b"Content-Length: 1000\r\n", b"401"),  # no key at all
        (f"Authorization: Bearer {ALICE_KEY}\r\nContent-Length: 999999999\r\n".encode(), b"413"),
    ],
)
def test_a_response_sent_before_the_body_was_read_closes_the_connection(
    server: ServingProcess, headers: bytes, status: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + headers)
        sock.sendall(b'\r\n{"mod')
        head = response_then_closed(sock)
    assert head.split(b" ")[1] == status
    assert b"connection: close" in head.lower()


def test_a_body_timeout_closes_the_connection(guarded: ServingProcess) -> None:
    """408 after --body-timeout-s (30 s by default, so here a server with 1 s)."""
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        head = response_then_closed(sock, within=10)
    assert head.split(b" ")[1] == b"408"


def test_a_fully_read_request_keeps_the_connection(server: ServingProcess) -> None:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ALICE_KEY}"}) as client:
        first = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "x", "temperature": 9})
        assert first.status_code == 400 and first.headers.get("connection") != "close"  # refused after reading
        assert client.get("/healthz").status_code == 200


def connect_from(source: str, port: int) -> socket.socket:
    """A connection from another loopback address (Linux routes all of 127/8 to lo): another peer."""
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


@pytest.fixture(scope="module")
def capped(start_server: ServerFactory, debug_model_dir: Path) -> ServingProcess:
    return start_server(
        "--model", str(debug_model_dir), "--served-model-name", MODEL_ID, "--allow-unauthenticated",
        "--header-timeout-s", "20", "--max-connections", "20", "--max-connections-per-peer", "8",
    )  # fmt: skip


def test_per_peer_cap_leaves_room_for_other_peers(capped: ServingProcess) -> None:
    socks = [connect_from("127.0.0.2", capped.port) for _ in range(12)]
    try:
        closed = [closed_within(s, 0.5) for s in socks]
        assert closed[:8] == [False] * 8 and all(closed[8:])
        with connect_from("127.0.0.3", capped.port) as other:
            other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            other.settimeout(10)
            assert other.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for s in socks:
            s.close()


def test_probes_and_metrics_have_their_own_listener(capped: ServingProcess) -> None:
    """Every client slot taken (20, from three peers): the client port refuses new connections, the operations
    listener still answers probes. /metrics is served there and only there; the API is not served there."""
    socks = [connect_from(f"127.0.0.{4 + i % 3}", capped.port) for i in range(24)]
    try:
        assert sum(closed_within(s, 0.5) for s in socks) == 4
        with connect_from("127.0.0.9", capped.port) as late:
            assert closed_within(late, 2)  # beyond the cap
        for path in ("/healthz", "/readyz", "/ping"):
            assert httpx.get(capped.ops_url + path, timeout=10).status_code == 200, path
        metrics = httpx.get(capped.ops_url + "/metrics", timeout=10)
        assert metrics.status_code == 200 and "llm_serving_prefix_cache" in metrics.text
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    client_metrics = httpx.get(capped.url + "/metrics", timeout=10)
    assert client_metrics.status_code == 404 and client_metrics.json()["error"]["type"] == "not_found_error"
    assert httpx.get(capped.url + "/healthz", timeout=10).status_code == 200  # probes answer on both
    body = {"model": MODEL_ID, "prompt": "x", "max_tokens": 1}
    assert httpx.post(capped.ops_url + "/v1/completions", json=body, timeout=10).status_code == 404
    assert httpx.post(capped.url + "/v1/completions", json=body, timeout=30).status_code == 200
