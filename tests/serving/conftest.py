"""Serving fixtures: the debug model, and real `python -m serving` processes on loopback ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ops.net import free_port, wait_http
from tests.helpers import REPO_ROOT

ALICE_KEY = "sk-test-alice-0123456789"
LIMITED_KEY = "sk-test-limited-0123456789"
STRICT_KEY = "sk-test-strict-0123456789"  # rpm=3: counted before validation
TINY_KEY = "sk-test-tiny-0123456789"  # tpm=60: reservations under concurrency
FRONT_KEY = "sk-test-front-0123456789"
MODEL_ID = "debug-model"
GPT2_MODEL_ID = "debug-gpt2"


@pytest.fixture(scope="session")
def debug_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.debug_model import write_debug_model

    return write_debug_model(tmp_path_factory.mktemp("models") / MODEL_ID)


def write_debug_gpt2(out_dir: Path) -> Path:
    """A tiny GPT-2 (random, seeded weights; the debug Llama's tokenizer) in Hugging Face format: an architecture
    the engine's direct-tensor Llama path does not take, so it decodes through the model's own `forward`.

    Unlike the Llama it has learned absolute positions, LayerNorm and biases, so left padding only works if the
    engine's position ids are right. Special tokens get zero output rows, as in `training.debug_model`, so the
    random model practically never ends early."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    from training.debug_model import IM_END, SPECIAL_TOKENS, build_tokenizer

    tokenizer = build_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=4,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for token in SPECIAL_TOKENS:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)].zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def gpt2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The non-Llama debug model (`write_debug_gpt2`)."""
    return write_debug_gpt2(tmp_path_factory.mktemp("models") / GPT2_MODEL_ID)


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "keys"
    path.write_text(
        f"# key-id  key  limits\nalice {ALICE_KEY} rpm=100000 tpm=100000000\nlimited {LIMITED_KEY} rpm=2\n"
        f"strict {STRICT_KEY} rpm=3\ntiny {TINY_KEY} tpm=60  # a comment after whitespace\n"
    )
    return path


@dataclass
class ServingProcess:
    """A running `python -m serving`; stdout (the audit log) and stderr go to files the test can read."""

    proc: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path
    _files: list = field(default_factory=list)
    ops_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        """The operations listener (--ops-port): probes and /metrics."""
        return f"http://127.0.0.1:{self.ops_port}"

    def audit_lines(self) -> list[dict]:
        lines = self.stdout_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith('{"event":"request"')]

    def logs(self) -> str:
        return self.stdout_path.read_text() + self.stderr_path.read_text()

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            for f in self._files:
                f.close()


ServerFactory = Callable[..., ServingProcess]


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start `python -m serving <args>` on a free loopback port (and its operations listener on another); every
    process is stopped at session end."""
    started: list[ServingProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServingProcess:
        port, ops_port = free_port(), free_port()
        while ops_port == port:
            ops_port = free_port()
        logs = tmp_path_factory.mktemp("server")
        out, err = (logs / "stdout.log").open("wb"), (logs / "stderr.log").open("wb")
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--ops-port",
                str(ops_port),
                *args,
            ],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=err,
            env=full_env,
        )
        server = ServingProcess(proc, port, logs / "stdout.log", logs / "stderr.log", [out, err], ops_port)
        started.append(server)
        try:
            wait_http(server.url + "/readyz", 120, proc, "server")
        except Exception:
            server.stop(10)
            raise RuntimeError(f"server failed to start:\n{server.logs()[-4000:]}") from None
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)
        for f in server._files:
            f.close()


@pytest.fixture(scope="session")
def server(start_server: ServerFactory, debug_model_dir: Path, keys_file: Path) -> ServingProcess:
    """The shared server: debug model, API keys, default limits."""
    return start_server(
        "--model", str(debug_model_dir), "--served-model-name", MODEL_ID, "--api-keys-file", str(keys_file),
        "--max-tokens-cap", "256",
    )  # fmt: skip
