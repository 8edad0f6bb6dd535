"""API keys reload without a restart: a changed keys file (polled) or SIGHUP swaps the keys while requests keep being
served; a revoked key is refused, a new one accepted, a kept one never fails; a broken file keeps the keys in force
and an emptied one refuses everyone."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.serving.conftest import MODEL_ID, ServerFactory, ServingProcess

OLD = "sk-rotate-old-0123456789"
KEPT = "sk-rotate-kept-0123456789"
NEW = "sk-rotate-new-0123456789"
BODY = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 1}


def write_atomically(path: Path, text: str) -> None:
    """As a Kubernetes Secret volume updates: the new content appears at once, as a new file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def status(server: ServingProcess, key: str) -> int:
    return httpx.post(
        server.url + "/v1/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ).status_code


def until(server: ServingProcess, key: str, expected: int, timeout: float = 20) -> float:
    started = time.monotonic()
    while status(server, key) != expected:
        assert time.monotonic() - started < timeout, f"{key[:13]}... not {expected} after {timeout}s"
        time.sleep(0.1)
    return time.monotonic() - started


def start(start_server: ServerFactory, model: Path, keys: Path, *extra: str) -> ServingProcess:
    return start_server(
        "--model", str(model), "--served-model-name", MODEL_ID, "--api-keys-file", str(keys), *extra
    )  # fmt: skip


def test_rotation_under_load_fails_no_request(
    start_server: ServerFactory, debug_model_dir: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"old {OLD}\nkept {KEPT}\n")
    server = start(start_server, debug_model_dir, keys, "--keys-reload-s", "0.5")
    assert status(server, OLD) == 200 and status(server, NEW) == 401
    failures: list[int] = []
    served = [0]
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEPT}"}, timeout=30) as client:
            while not stop.is_set():
                code = client.post("/v1/completions", json=BODY).status_code
                served[0] += 1
                if code != 200:
                    failures.append(code)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        write_atomically(keys, f"kept {KEPT}\nnew {NEW}\n")  # step 1 and 3 at once: add the new key, drop the old
        assert until(server, OLD, 401) < 15  # well within a minute
        until(server, NEW, 200)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == [] and served[0] > 5
    assert OLD not in server.logs() and NEW not in server.logs()
    assert "api keys reloaded: 2 keys" in server.logs()


def test_sighup_reloads_and_a_broken_file_keeps_the_keys(
    start_server: ServerFactory, debug_model_dir: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"old {OLD}\nkept {KEPT}\n")
    server = start(start_server, debug_model_dir, keys, "--keys-reload-s", "0")  # SIGHUP only
    write_atomically(keys, f"kept {KEPT}\nbroken sk-rotate-broken-line-0123456789 rpm=x\n")
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while "keeping the keys loaded before" not in server.logs():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status(server, OLD) == 200  # still in force: the broken file was not applied
    assert "sk-rotate-broken" not in server.logs()
    write_atomically(keys, f"kept {KEPT}\n")
    time.sleep(1.0)
    assert status(server, OLD) == 200  # no polling: nothing changes until SIGHUP
    server.proc.send_signal(signal.SIGHUP)
    until(server, OLD, 401)
    assert status(server, KEPT) == 200
    write_atomically(keys, "# every key revoked\n")
    server.proc.send_signal(signal.SIGHUP)
    until(server, KEPT, 401)  # an emptied file refuses everyone; it never turns authentication off
    assert server.proc.poll() is None
