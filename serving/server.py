"""Start-up lifecycle and graceful shutdown.

    read keys -> bind socket -> load engine -> build app -> serve

The keys file is read and the port (and the operations listener's, `--ops-port`) bound before the model loads, so a bad
keys file or a busy port fails at once (one line, an exit status) instead of after minutes of loading. Until the app
serves, connections wait in the listen backlog (probes time out: Kubernetes' startupProbe covers the load). On
SIGTERM/SIGINT the server stops accepting, `/readyz` turns 503, in-flight requests get up to `drain_timeout_s` to finish
(then they are cut with a `drain_deadline` error), the engine stops and the process exits 0; a repeated signal also ends
in exit 0. While serving, the keys file is reloaded when it changes or on SIGHUP (`watch_keys`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving import audit
from serving.auth import KeyFile, KeyFileError, KeyStore
from serving.backends.base import Backend
from serving.config import ServingConfig
from serving.inflight import AppState
from serving.metrics import Metrics

log = logging.getLogger("serving")


# Exit statuses of start-up failures (one line on stderr each; docs/serving.md "Start-up lifecycle").
EXIT_CONFIG = 2  # bad flags / environment, keys file unreadable, malformed or empty without --allow-unauthenticated
EXIT_BIND = 3  # the port cannot be bound (in use, no permission)
EXIT_MODEL = 4  # the model cannot be found, downloaded or loaded
# uvicorn's own drain deadline is a backstop this long after ours (ours answers every cut request properly)
DRAIN_BACKSTOP_S = 5.0


class StartupError(Exception):
    """A start-up failure: one line on stderr and the exit status `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DrainingServer(uvicorn.Server):
    """uvicorn, but a termination signal is a normal, successful exit after draining.

    uvicorn re-raises a captured signal after shutdown (the process would die by SIGTERM, exit status 143); a
    container orchestrator should see exit 0 after a clean drain, so the signal is not recorded for re-raising.
    At `drain_timeout_s` after the signal, requests still in flight are cut with an OpenAI-shaped `drain_deadline`
    error and an audit line (`inflight.cut_in_flight`), before uvicorn's own deadline would cancel them into a
    plain-text 500.
    """

    def __init__(self, config: uvicorn.Config, state: AppState, key_file: KeyFile | None = None) -> None:
        super().__init__(config)
        self.serving_state = state
        self.key_file = key_file
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keys_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(_quiet_exception_handler())
        if self.key_file is not None:
            wake = asyncio.Event()
            self._loop.add_signal_handler(signal.SIGHUP, wake.set)
            self._keys_task = self._loop.create_task(
                watch_keys(self.serving_state, self.key_file, self.serving_state.cfg.keys_reload_s, wake)
            )
        await super().startup(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._keys_task is not None:
            self._keys_task.cancel()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True  # a second signal: stop waiting
            return
        drain = self.serving_state.cfg.drain_timeout_s
        log.info("lifecycle: signal %d: draining (deadline %.0fs)", sig, drain)
        self.serving_state.draining = True
        self.serving_state.metrics.ready.set(0)
        self.should_exit = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.call_later, drain, self._cut)

    def _cut(self) -> None:
        from serving.inflight import cut_in_flight

        cut = cut_in_flight(self.serving_state)
        if cut:
            log.warning("lifecycle: drain deadline: cut %d requests still in flight", cut)


def _quiet_exception_handler() -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """The loop's default handler, but each distinct message at most once per 10 s: when descriptors run out,
    asyncio reports every failed accept() with a traceback, and that must not become a log storm."""
    last: dict[str, float] = {}

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        now = time.monotonic()
        if now - last.get(message, -1e9) < 10.0:
            return
        last[message] = now
        loop.default_exception_handler(context)

    return handler


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus guards uvicorn lacks: a deadline for a complete request head (a new connection, or
    a kept-alive one that starts a request, must send its headers within `header_timeout_s`, so idle and half-sent
    connections cannot pile up), and caps on open connections: in all, per peer address, and apart for the
    operations listener (`ops_port`). Beyond a cap a new connection is closed at once, so sockets never exhaust the
    descriptors that health checks, the model and the upstream need, one peer cannot take every slot, and no client
    connection can take the probes' slots.

    uvicorn's `timeout_keep_alive` covers only the idle time after a response, and `limit_concurrency` answers 503
    only once a request head has arrived, which a slow client never completes. Use `guarded_protocol` to make the
    class for one server: the counters are per class.
    """

    header_timeout_s = 10.0
    max_connections = 1024
    max_connections_per_peer = 512
    ops_port = 0
    ops_max_connections = 32
    _clients = 0
    _ops = 0
    _peers: collections.Counter[str] = collections.Counter()
    _last_cap_log = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._slot: str | None = None  # what this connection counts against: "ops", or its peer address
        super().connection_made(transport)
        cls = type(self)
        sockname = transport.get_extra_info("sockname")
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else "-"
        if cls.ops_port and isinstance(sockname, tuple) and len(sockname) > 1 and sockname[1] == cls.ops_port:
            if cls._ops >= cls.ops_max_connections:
                return self._refuse(transport, f"operations listener cap ({cls.ops_max_connections})")
            cls._ops += 1
            self._slot = "ops"
        else:
            if cls._clients >= cls.max_connections:
                return self._refuse(transport, f"connection cap ({cls.max_connections})")
            if cls._peers[peer] >= cls.max_connections_per_peer:
                return self._refuse(transport, f"per-peer connection cap ({cls.max_connections_per_peer})")
            cls._clients += 1
            cls._peers[peer] += 1
            self._slot = peer
        self._watch_head()

    def _refuse(self, transport: asyncio.Transport, cap: str) -> None:
        now = time.monotonic()
        if now - GuardedH11Protocol._last_cap_log > 10.0:
            GuardedH11Protocol._last_cap_log = now
            log.warning("%s reached: closing new connections", cap)
        transport.abort()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._release_slot()
        super().connection_lost(exc)

    def _release_slot(self) -> None:
        cls, slot = type(self), getattr(self, "_slot", None)
        self._slot = None
        if slot == "ops":
            cls._ops -= 1
        elif slot is not None:
            cls._clients -= 1
            cls._peers[slot] -= 1
            if cls._peers[slot] <= 0:
                del cls._peers[slot]

    def _watch_head(self) -> None:
        """Armed while the client owes a request head: on a fresh connection, and once a kept-alive connection has
        sent part of one (before that, the idle kept-alive connection is uvicorn's keep-alive timer's)."""
        waiting = self.conn.their_state is h11.IDLE and self.timeout_keep_alive_task is None
        if waiting and self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)
        elif not waiting:
            self._stop_head_timer()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(cfg: ServingConfig) -> type[GuardedH11Protocol]:
    """The protocol class for one server: its timeouts and caps, and counters of its own."""
    cap = connection_cap(cfg)
    return type(
        "ServingH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout_s": cfg.header_timeout_s,
            "max_connections": cap,
            "max_connections_per_peer": cfg.max_connections_per_peer or max(1, cap // 2),
            "ops_port": cfg.ops_port,
            "_clients": 0,
            "_ops": 0,
            "_peers": collections.Counter(),
        },
    )


def connection_cap(cfg: ServingConfig) -> int:
    """Most open client connections: `--max-connections`, else what the descriptor limit leaves room for."""
    if cfg.max_connections:
        return cfg.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft - 128))


def load_engine(cfg: ServingConfig, metrics: Metrics) -> Backend:
    """The engine the config asks for: an upstream gateway (given, or a spawned vLLM), or the built-in one."""
    from serving.model_source import named_by_export, resolve_model_dir

    if cfg.upstream:
        from serving.backends.upstream import UpstreamBackend

        log.info("lifecycle: engine = upstream %s", cfg.upstream)
        return UpstreamBackend(
            cfg.upstream, cfg.upstream_api_key, cfg.request_timeout_s, default_max_tokens=cfg.default_max_tokens
        )
    model_dir = resolve_model_dir(cfg.model, cfg.model_cache_dir)
    cfg = named_by_export(cfg, model_dir)
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
    global _starting_child
    child = _starting_child = subprocess.Popen(command, start_new_session=True)
    return UpstreamBackend(
        f"http://127.0.0.1:{cfg.vllm_port}", "", cfg.request_timeout_s, child=child,
        child_stop_timeout_s=cfg.drain_timeout_s, default_max_tokens=cfg.default_max_tokens,
    )  # fmt: skip


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (a taken port fails start-up at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when it is, and
    # without it Nagle + delayed ACKs add ~40 ms to every response on a keep-alive connection
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def watch_keys(state: AppState, key_file: KeyFile, interval_s: float, wake: asyncio.Event) -> None:
    """Reload the keys file when it changes (checked every `interval_s`; 0: never by itself) or on SIGHUP (`wake`).

    A file that fails to parse keeps the keys in force (the error names the line, never its text); a file emptied of
    keys refuses every request (it never turns authentication off). Requests already admitted finish; a removed key
    is refused from its next request on, and its rate-limit windows (by key id) carry over for kept keys."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval_s or None)
        forced = wake.is_set()
        wake.clear()
        if not (forced or key_file.changed()):
            continue
        try:
            store = await asyncio.to_thread(key_file.load)
        except OSError as exc:
            log.error("api keys file %s: %s; keeping the keys loaded before", key_file.path, exc.strerror)
            continue
        except KeyFileError as exc:
            log.error("api keys file %s: %s; keeping the keys loaded before", key_file.path, exc)
            continue
        if not store.enabled and not state.cfg.allow_unauthenticated:
            log.warning("api keys file %s holds no keys now: every request is refused", key_file.path)
            store = KeyStore([], deny_all=True)
        else:
            log.info("api keys reloaded: %d keys (hashes only)", len(store))
        state.keys = store


def load_keys(cfg: ServingConfig) -> tuple[KeyStore, KeyFile | None]:
    """Fail closed: no keys means no server, unless the operator said --allow-unauthenticated. The `KeyFile` is
    watched for changes while serving (`watch_keys`)."""
    keys = KeyStore([])
    key_file = None
    if cfg.api_keys_file:
        key_file = KeyFile(cfg.api_keys_file, cfg.default_rpm, cfg.default_tpm)
        try:
            keys = key_file.load()
        except OSError as exc:
            raise StartupError(EXIT_CONFIG, f"api keys file {cfg.api_keys_file}: {exc.strerror}") from None
        except KeyFileError as exc:
            raise StartupError(EXIT_CONFIG, f"api keys file {cfg.api_keys_file}: {exc}") from None
    if keys.enabled:
        log.info("lifecycle: %d API keys loaded (hashes only)", len(keys))
        return keys, key_file
    if not cfg.allow_unauthenticated:
        where = f"api keys file {cfg.api_keys_file} holds no keys" if cfg.api_keys_file else "no --api-keys-file"
        raise StartupError(
            EXIT_CONFIG, f"{where}: refusing to serve without authentication (pass --allow-unauthenticated to do so)"
        )
    log.warning("lifecycle: --allow-unauthenticated: authentication is DISABLED")
    return keys, key_file


_starting_child: subprocess.Popen[bytes] | None = None
"""The vLLM engine process while the gateway starts (`_exit_quietly` stops it; the backend owns it afterwards)."""


def _exit_quietly(sig: int, frame: FrameType | None) -> None:
    """SIGTERM / SIGINT before serving (nothing in flight): exit 0 at once.

    `os._exit`, not `SystemExit`: the exception is raised wherever the main thread happens to be, and during the
    model load that can be inside library code that catches it (seen: a SIGTERM during start-up was swallowed and the
    server went on to serve, 1 run in 3 of tests/serving/test_serving_connections.py), and interpreter teardown would
    then join worker threads. Before serving there is nothing to drain; the engine process a gateway started is
    stopped first."""
    child = _starting_child
    if child is not None and child.poll() is None:
        child.terminate()
    log.info("lifecycle: signal %d before serving: exiting", sig)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def run(cfg: ServingConfig) -> int:
    """Start-up failures are one line on stderr and an exit status (EXIT_*), never a traceback."""
    logging.basicConfig(
        level=cfg.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    audit.configure_audit_log()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_quietly)
    # SIGHUP reloads the keys once serving (`DrainingServer.startup`); before that its default would kill the process
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return _run(cfg)
    except StartupError as exc:
        print(f"serving: {exc}", file=sys.stderr)
        return exc.status
    finally:
        # teardown (joining threads, freeing the model) can take a while, and a repeated SIGTERM then must not turn a
        # clean exit into 143: ignored at the OS level, because Python resets its own handlers to the default while
        # the interpreter finalizes (signal._PySignal_Fini), but keeps SIG_IGN
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


def _run(cfg: ServingConfig) -> int:
    metrics = Metrics()
    # cheap checks first: a bad keys file or a busy port fails in a second, not after minutes of model loading
    keys, key_file = load_keys(cfg)
    try:
        sock = bind_socket(cfg.host, cfg.port)
    except OSError as exc:
        raise StartupError(EXIT_BIND, f"cannot bind {cfg.host}:{cfg.port}: {exc.strerror}") from None
    sockets = [sock]
    if cfg.ops_port:
        try:
            sockets.append(bind_socket(cfg.host, cfg.ops_port))
        except OSError as exc:
            sock.close()
            raise StartupError(
                EXIT_BIND, f"cannot bind {cfg.host}:{cfg.ops_port} (--ops-port): {exc.strerror}"
            ) from None
    log.info("lifecycle: bound %s:%d (pid %d); loading the engine", cfg.host, cfg.port, os.getpid())
    try:
        backend = load_engine(cfg, metrics)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        log.debug("engine load failed", exc_info=True)
        for s in sockets:
            s.close()
        raise StartupError(EXIT_MODEL, f"cannot load the model {cfg.model}: {type(exc).__name__}: {exc}") from None

    from serving.app import build_app  # imported late: FastAPI import cost is not on the engine's critical path

    state = AppState(
        cfg=cfg,
        backend=backend,
        keys=keys,
        metrics=metrics,
        # the built-in engine knows its id (maybe named by the export); a gateway asks its upstream on first use
        default_model=""
        if cfg.upstream and not cfg.served_model_name
        else (getattr(backend, "model_id", "") or cfg.model_id),
        max_request_bytes=request_limit(cfg, backend),
    )
    app = build_app(state)
    metrics.ready.set(1)
    protocol = guarded_protocol(cfg)
    log.info(
        "lifecycle: app built; serving (request body limit %d bytes, at most %d connections, %d per peer)",
        state.max_request_bytes,
        protocol.max_connections,
        protocol.max_connections_per_peer,
    )

    server = DrainingServer(
        uvicorn.Config(
            app,
            http=protocol,
            log_level=cfg.log_level,
            access_log=False,  # the audit log is the access log, without secrets
            timeout_keep_alive=max(1, round(cfg.keepalive_timeout_s)),
            timeout_graceful_shutdown=round(cfg.drain_timeout_s + DRAIN_BACKSTOP_S),
            h11_max_incomplete_event_size=64 * 1024,  # request head size bound (uvicorn's default, stated)
            lifespan="on",
        ),
        state,
        key_file,
    )
    server.run(sockets=sockets)
    log.info("lifecycle: stopped")
    return 0


def request_limit(cfg: ServingConfig, backend: Backend) -> int:
    """--max-request-bytes, or max(1 MiB, 64 bytes per context token): room for a context-filling prompt in JSON
    with escapes, and nothing near the sizes that froze the server (multi-megabyte prompts for a 2k context)."""
    if cfg.max_request_bytes:
        return cfg.max_request_bytes
    context = cfg.max_model_len or int(getattr(backend, "max_model_len", 0) or 0) or 131072
    return max(1 << 20, 64 * context)
