"""Serving configuration: declared once, read once from flags and environment variables.

Every option has a flag and an environment variable (`SERVING_<NAME>`); flags win. Containers usually set env vars
(SageMaker passes none of our flags, only `serve`), Kubernetes usually passes args.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from facts.cluster import SERVING_OPS_PORT, SERVING_PORT
from facts.serving import QUANTIZATIONS, env_name, flag

SAGEMAKER_MODEL_DIR = "/opt/ml/model"
# --max-batched-tokens 0. On CPU a prefill token costs about what a decode row does (compute-bound), so a 64-token
# budget makes an iteration with a prompt chunk cost a few plain decode steps of a 16-row batch: short requests'
# first token waits for at most that, not for a whole long prompt (bench/serve_mixed.py). At the full size
# (16 short tenants, a tenant with two ~4096-token prompts in flight, fp32, one round each, 2026-12-08) the short
# tenants' TTFT p99 with the long tenant over without it was 1.21x with 64, 2.11x with 96, 3.50x with 128 (twice),
# 6.7x with 256 and 20.7x with 512; whole prompts have their own allowance (serving/scheduler.py). On a GPU a
# step is bound by reading weights until far more tokens, so vLLM's default for its OpenAI server applies
# (vllm/engine/arg_utils.py, `EngineArgs._set_default_args`, v0.10: 2048, or 8192 on GPUs with >= 70 GiB other than
# A100).
CPU_TOKEN_BUDGET = 64
GPU_TOKEN_BUDGET = 2048


def check_quantization(method: str, engine: str) -> None:
    """Raise ValueError naming the choices when `method` does not fit `engine` (builtin or vllm)."""
    choices = QUANTIZATIONS[engine]
    if method not in choices:
        raise ValueError(f"{method!r} is not one of {', '.join(choices)} for the {engine} engine")


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the process exits with a clear message."""


@dataclass(frozen=True)
class ServingConfig:
    """Every setting of the server; each field is a flag and a `SERVING_<FLAG>` environment variable."""

    model: str = field(default="", metadata={"help": "Model directory, or s3://bucket/prefix (downloaded to a cache)."})
    served_model_name: str = field(
        default="", metadata={"help": "Model id clients send; default: the model directory's name."}
    )
    host: str = field(default="0.0.0.0", metadata={"help": "Address to bind."})
    port: int = field(default=SERVING_PORT, metadata={"help": "Port to bind (SageMaker requires 8080)."})
    ops_port: int = field(
        default=0,
        metadata={
            "help": "Operations listener port (same --host): /healthz, /readyz, /ping and /metrics only, with "
            f"connection slots no client connection can take (the EKS Deployment uses {SERVING_OPS_PORT}). "
            "/metrics is served only here: 0 = no operations listener and no /metrics."
        },
    )
    upstream: str = field(
        default="",
        metadata={
            "help": "Base URL of an OpenAI-compatible engine (e.g. vLLM at http://127.0.0.1:8000); "
            "when set, this service is a gateway and loads no model."
        },
    )
    engine: str = field(
        default="builtin",
        metadata={
            "help": "builtin (load the model in this process) or vllm (start `vllm serve` on loopback as a "
            "child process and front it); ignored when --upstream is set."
        },
    )
    vllm_command: str = field(default="vllm serve", metadata={"help": "Command that starts vLLM (model dir appended)."})
    vllm_args: str = field(default="", metadata={"help": "Extra vLLM arguments, e.g. '--tensor-parallel-size 4'."})
    vllm_port: int = field(default=8000, metadata={"help": "Loopback port of the vLLM child process."})
    upstream_api_key: str = field(default="", metadata={"help": "Bearer key this gateway sends to the upstream."})
    api_keys_file: str = field(
        default="",
        metadata={"help": "API keys file (see docs/serving.md); required unless --allow-unauthenticated is given."},
    )
    keys_reload_s: float = field(
        default=10.0,
        metadata={
            "help": "How often the API keys file is checked for changes (reloaded without a restart; SIGHUP reloads "
            "at once); 0 = on SIGHUP only."
        },
    )
    allow_unauthenticated: bool = field(
        default=False,
        metadata={
            "help": "Serve without API keys (anyone who reaches the port may call the API); only behind another "
            "authenticating layer, e.g. SageMaker (IAM). Without it, a missing or empty keys file is a start-up error."
        },
    )
    model_cache_dir: str = field(
        default="",
        metadata={
            "help": "Where s3:// models are downloaded: a private (0700) directory this user owns; "
            "default $XDG_CACHE_HOME/llm-serving/models or ~/.cache/llm-serving/models."
        },
    )
    max_batch_size: int = field(default=16, metadata={"help": "Most sequences decoded together."})
    batch_wait_ms: float = field(default=5.0, metadata={"help": "How long the batcher waits to fill a batch."})
    max_queue: int = field(
        default=64, metadata={"help": "Most requests waiting for a batch; beyond it requests get 503."}
    )
    batching: str = field(
        default="continuous",
        metadata={"help": "continuous (requests join the running batch between steps) or dynamic (batch by batch)."},
    )
    max_inflight: int = field(
        default=0,
        metadata={
            "help": "Most generation requests handled at once (streams included); beyond it 503. "
            "0 = automatic: max_batch_size + max_queue for the built-in engine, 256 as a gateway."
        },
    )
    max_tokens_cap: int = field(
        default=1024,
        metadata={"help": "Largest max_tokens a request gets (a larger ask is clamped to it and reported)."},
    )
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens when a request gives none."})
    max_model_len: int = field(
        default=0, metadata={"help": "Context length (prompt + completion); 0 = the model's max_position_embeddings."}
    )
    default_rpm: int = field(default=600, metadata={"help": "Per-key requests per minute unless the key sets rpm=."})
    default_tpm: int = field(
        default=200_000, metadata={"help": "Per-key tokens (prompt+completion) per minute unless the key sets tpm=."}
    )
    drain_timeout_s: float = field(
        default=30.0, metadata={"help": "On SIGTERM, how long in-flight requests may take to finish."}
    )
    request_timeout_s: float = field(default=600.0, metadata={"help": "Upstream request timeout."})
    max_request_bytes: int = field(
        default=0,
        metadata={
            "help": "Largest request body; larger ones get 413 before they are read. 0 = automatic: "
            "max(1 MiB, 64 bytes per token of context) (the gateway assumes a 128k context unless --max-model-len)."
        },
    )
    body_timeout_s: float = field(
        default=30.0, metadata={"help": "Time a client has to send a request body once its headers arrived (408)."}
    )
    header_timeout_s: float = field(
        default=10.0,
        metadata={"help": "Time a connection has to send a complete request head (new or kept-alive); then closed."},
    )
    keepalive_timeout_s: float = field(default=5.0, metadata={"help": "Idle keep-alive connections close after this."})
    max_connections: int = field(
        default=0,
        metadata={
            "help": "Most open client connections; beyond it new connections are closed at once. 0 = automatic: "
            "the open-file limit minus 128 (descriptors for the model, logs and the upstream), at most 4096."
        },
    )
    max_connections_per_peer: int = field(
        default=0,
        metadata={
            "help": "Most open client connections from one peer address; beyond it its new connections are closed "
            "at once. 0 = automatic: half the connection cap (behind a proxy or load balancer every connection comes "
            "from its few addresses: raise it there)."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "Built-in engine dtype: float32, bfloat16 or float16."})
    torch_threads: int = field(
        default=0,
        metadata={
            "help": "Built-in engine CPU threads (torch.set_num_threads); 0 = the CPUs this process may use "
            "(affinity and cgroup CPU quota, see serving/threads.py). Use 1 for tiny models or on shared cores."
        },
    )
    device: str = field(default="cpu", metadata={"help": "Built-in engine device: cpu or cuda."})
    quantization: str = field(
        default="none",
        metadata={
            "help": "Weight quantization (serving/quantize.py): built-in engine none or int8; with --engine vllm "
            "passed as `vllm serve --quantization` (fp8, awq, gptq, ...)."
        },
    )
    prefix_cache_mb: int = field(
        default=256,
        metadata={
            "help": "Built-in engine: memory for cached KV blocks of shared prompt prefixes (serving/prefix_cache.py); "
            "0 disables prefix caching. The vLLM engine runs with --enable-prefix-caching."
        },
    )
    max_batched_tokens: int = field(
        default=0,
        metadata={
            "help": "Built-in engine: tokens computed per engine iteration, one per decoding row plus prompt tokens "
            "(chunked prefill, as vLLM's --max-num-batched-tokens); a longer prompt is prefilled in chunks between "
            "decode steps, so no step waits on a whole long prompt; whole prompts of one iteration may take 8 "
            "budgets. 0 = automatic: 64 on CPU (a chunk costs a few decode steps there), 2048 on a GPU (vLLM's "
            "online-serving default)."
        },
    )
    max_key_prefill_tokens: int = field(
        default=4096,
        metadata={
            "help": "Built-in engine: most prompt tokens one API key may have being prefilled at once (its next "
            "request waits; a key may always prefill one request, however long). 0 = no cap."
        },
    )
    prefix_cache_groups: str = field(
        default="",
        metadata={
            "help": "Built-in engine: API key ids whose prompts share prefix-cache blocks, as "
            "'group:key-a,key-b;other:key-c'. Every other key's cached blocks are its own (salted by key id)."
        },
    )
    log_level: str = field(default="info", metadata={"help": "Log level."})

    def __post_init__(self) -> None:
        if not self.model and not self.upstream:
            raise ConfigError("set --model (SERVING_MODEL) or --upstream (SERVING_UPSTREAM)")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} out of range")
        for name in (
            "max_batch_size",
            "max_queue",
            "max_tokens_cap",
            "default_max_tokens",
            "default_rpm",
            "default_tpm",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.default_max_tokens > self.max_tokens_cap:
            raise ConfigError("default_max_tokens must be <= max_tokens_cap")
        if self.max_inflight < 0:
            raise ConfigError("max_inflight must be >= 0")
        if not 0 <= self.ops_port < 65536:
            raise ConfigError(f"ops_port {self.ops_port} out of range")
        if self.ops_port == self.port:
            raise ConfigError(f"ops_port must differ from port ({self.port})")
        for name in ("max_request_bytes", "max_connections", "max_connections_per_peer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        for name in ("body_timeout_s", "header_timeout_s", "keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.keys_reload_s < 0:
            raise ConfigError("keys_reload_s must be >= 0")
        if self.torch_threads < 0:
            raise ConfigError("torch_threads must be >= 0")
        if self.batching not in ("continuous", "dynamic"):
            raise ConfigError(f"batching {self.batching!r} is not one of continuous, dynamic")
        if self.engine not in ("builtin", "vllm"):
            raise ConfigError(f"engine {self.engine!r} is not one of builtin, vllm")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype {self.dtype!r} is not one of float32, bfloat16, float16")
        if self.prefix_cache_mb < 0:
            raise ConfigError("prefix_cache_mb must be >= 0")
        for name in ("max_batched_tokens", "max_key_prefill_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        self.cache_groups  # noqa: B018 (parses, raising ConfigError naming the key)
        try:  # a gateway (--upstream) loads no model: its engine decides
            if not self.upstream:
                check_quantization(self.quantization, self.engine)
        except ValueError as exc:
            raise ConfigError(f"quantization: {exc}") from exc
        if self.quantization == "int8" and self.device == "cpu" and self.dtype != "float32":
            raise ConfigError("quantization int8 on cpu needs dtype float32 (int8 kernels take float32 activations)")
        if self.quantization == "int8" and self.device.startswith("cuda"):
            # torchao's eager int8 weight-only linear dequantizes the whole weight to bf16 on every call: ~5 bytes of
            # memory traffic per parameter against bf16's 2, so on a GPU (decode is bound by reading weights) it
            # saves memory, not time. vLLM's quantized kernels read the quantized weights directly.
            raise ConfigError(
                "quantization int8 is CPU-only in the built-in engine (on a GPU it is slower than bfloat16); on a GPU "
                "serve a quantized checkpoint with --engine vllm --quantization awq|gptq, or fp8 on a bf16 checkpoint"
            )
        if self.api_keys_file and not Path(self.api_keys_file).is_file():
            raise ConfigError(f"api keys file {self.api_keys_file} does not exist")

    @property
    def inflight_limit(self) -> int:
        """The in-flight bound: `--max-inflight`, else 256 for a gateway or the engine's batch plus queue."""
        if self.max_inflight:
            return self.max_inflight
        gateway = bool(self.upstream) or self.engine == "vllm"
        return 256 if gateway else self.max_batch_size + self.max_queue

    @property
    def cache_groups(self) -> dict[str, str]:
        """`--prefix-cache-groups` as key id -> group name."""
        groups: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in self.prefix_cache_groups.split(";"))):
            name, sep, ids = part.partition(":")
            keys = [k.strip() for k in ids.split(",") if k.strip()]
            if not sep or not name.strip() or not keys:
                raise ConfigError(
                    "prefix_cache_groups: each group must be 'name:key-id,key-id' (groups separated by ';')"
                )
            for key in keys:
                if key in groups:
                    raise ConfigError(f"prefix_cache_groups: key id {key!r} is in more than one group")
                groups[key] = name.strip()
        return groups

    @property
    def token_budget(self) -> int:
        """The engine's per-iteration token budget: `--max-batched-tokens`, else by device."""
        if self.max_batched_tokens:
            return self.max_batched_tokens
        return CPU_TOKEN_BUDGET if self.device == "cpu" else GPU_TOKEN_BUDGET

    def cache_salt(self, key_id: str) -> str:
        """The prefix-cache salt of a key's requests: its group's, else its own (serving/prefix_cache.py)."""
        group = self.cache_groups.get(key_id)
        return f"group:{group}" if group is not None else f"key:{key_id}"

    @property
    def model_id(self) -> str:
        """The model id clients send: `--served-model-name`, else the model's (or upstream's) last path part."""
        if self.served_model_name:
            return self.served_model_name
        source = self.model or self.upstream
        return source.rstrip("/").rsplit("/", 1)[-1] or "model"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, built from `ServingConfig`'s fields and their help."""
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="OpenAI-compatible LLM server (built-in engine or gateway to an upstream engine such as vLLM). "
        "Every flag can also be given as an environment variable SERVING_<FLAG> (dashes as underscores).",
    )
    for f in fields(ServingConfig):
        help_ = f"{f.metadata['help']} [env {env_name(f.name)}; default {f.default!r}]"
        if isinstance(f.default, bool):  # a switch: present = true (env: true/false, 1/0, yes/no)
            parser.add_argument(flag(f.name), action="store_const", const=True, default=None, help=help_)
            continue
        parser.add_argument(flag(f.name), type=type(f.default), default=None, help=help_)
    return parser


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServingConfig:
    """Flags override `SERVING_*` environment variables, which override defaults.

    On SageMaker (`serve` entry point, no flags), the model defaults to /opt/ml/model.
    """
    environ = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    values: dict[str, object] = {}
    for f in fields(ServingConfig):
        if args[f.name] is not None:
            values[f.name] = args[f.name]
        elif env_name(f.name) in environ:
            raw = environ[env_name(f.name)]
            try:
                values[f.name] = _parse_bool(raw) if isinstance(f.default, bool) else type(f.default)(raw)
            except ValueError as exc:
                raise ConfigError(f"{env_name(f.name)}={raw!r}: {exc}") from exc
    if not values.get("model") and not values.get("upstream") and Path(SAGEMAKER_MODEL_DIR).is_dir():
        values["model"] = SAGEMAKER_MODEL_DIR
    return ServingConfig(**values)  # type: ignore[arg-type]
