"""Start-up lifecycle and graceful shutdown.

    load engine -> bind socket -> build app -> serve

The engine loads before the socket is bound, so a bound port always means a loaded model (probes never see a
half-started server). On SIGTERM/SIGINT the server stops accepting, `/readyz` turns 503, in-flight requests get up to
`drain_timeout_s` to finish, then the engine stops and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from serving import audit
from serving.auth import KeyStore
from serving.backends.base import Backend
from serving.config import ServingConfig
from serving.handlers import AppState
from serving.metrics import Metrics

log = logging.getLogger("serving")


class DrainingServer(uvicorn.Server):
    """uvicorn, but a termination signal is a normal, successful exit after draining.

    uvicorn re-raises a captured signal after shutdown (the process would die by SIGTERM, exit status 143); a
    container orchestrator should see exit 0 after a clean drain, so the signal is not recorded for re-raising.
    """

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.serving_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True  # a second signal: stop waiting
            return
        log.info("lifecycle: signal %d: draining (deadline %.0fs)", sig, self.config.timeout_graceful_shutdown or 0)
        self.serving_state.draining = True
        self.serving_state.metrics.ready.set(0)
        self.should_exit = True


def load_engine(cfg: ServingConfig, metrics: Metrics) -> Backend:
    from serving.model_source import resolve_model_dir

    if cfg.upstream:
        from serving.backends.upstream import UpstreamBackend

        log.info("lifecycle: engine = upstream %s", cfg.upstream)
        return UpstreamBackend(cfg.upstream, cfg.upstream_api_key, cfg.request_timeout_s)
    model_dir = resolve_model_dir(cfg.model, cfg.model_cache_dir)
    if cfg.engine == "vllm":
        return start_vllm(cfg, model_dir)
    from serving.backends.local import LocalBackend

    log.info("lifecycle: loading built-in engine from %s", model_dir)
    return LocalBackend(model_dir, cfg, observer=metrics)


def start_vllm(cfg: ServingConfig, model_dir: Path) -> Backend:
    """Start vLLM on loopback as a child process and front it. Readiness waits for it (/readyz asks it), so the
    socket binds at once and probes see "not ready" while vLLM loads, instead of a closed port."""
    from serving.backends.upstream import UpstreamBackend
    from serving.quantize import vllm_args

    command = [
        *shlex.split(cfg.vllm_command),
        str(model_dir),
        "--host", "127.0.0.1",
        "--port", str(cfg.vllm_port),
        "--served-model-name", cfg.model_id,
        *vllm_args(cfg.quantization),
        # KV blocks of shared prompt prefixes are reused across requests (on by default in vLLM's V1 engine;
        # explicit so an image's default cannot turn it off: https://docs.vllm.ai/en/latest/features/automatic_prefix_caching.html)
        *(["--enable-prefix-caching"] if cfg.prefix_cache_mb else ["--no-enable-prefix-caching"]),
        *shlex.split(cfg.vllm_args),
    ]  # fmt: skip
    log.info("lifecycle: starting engine process: %s", shlex.join(command))
    # own session: a Ctrl-C or group signal must not stop the engine before the gateway has drained
    child = subprocess.Popen(command, start_new_session=True)
    return UpstreamBackend(
        f"http://127.0.0.1:{cfg.vllm_port}", "", cfg.request_timeout_s, child=child,
        child_stop_timeout_s=cfg.drain_timeout_s,
    )  # fmt: skip


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when it is, and
    # without it Nagle + delayed ACKs add ~40 ms to every response on a keep-alive connection
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(cfg: ServingConfig) -> int:
    logging.basicConfig(
        level=cfg.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    audit.configure_audit_log()
    metrics = Metrics()

    backend = load_engine(cfg, metrics)
    keys = (
        KeyStore.from_file(cfg.api_keys_file, cfg.default_rpm, cfg.default_tpm) if cfg.api_keys_file else KeyStore([])
    )
    if keys.enabled:
        log.info("lifecycle: %d API keys loaded (hashes only)", len(keys))
    else:
        log.warning("lifecycle: no API keys configured: authentication is DISABLED")

    sock = bind_socket(cfg.host, cfg.port)
    log.info("lifecycle: bound %s:%d (pid %d)", cfg.host, cfg.port, os.getpid())

    from serving.app import build_app  # imported late: FastAPI import cost is not on the engine's critical path

    state = AppState(
        cfg=cfg,
        backend=backend,
        keys=keys,
        metrics=metrics,
        default_model="" if cfg.upstream and not cfg.served_model_name else cfg.model_id,
    )
    app = build_app(state)
    metrics.ready.set(1)
    log.info("lifecycle: app built; serving")

    server = DrainingServer(
        uvicorn.Config(
            app,
            log_level=cfg.log_level,
            access_log=False,  # the audit log is the access log, without secrets
            timeout_graceful_shutdown=int(cfg.drain_timeout_s),
            lifespan="on",
        ),
        state,
    )
    server.run(sockets=[sock])
    log.info("lifecycle: stopped")
    return 0
