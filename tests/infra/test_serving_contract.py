"""The contract between infra and serving, tested from both ends: the container args and environment every shipped
stack renders (the EKS Deployment's server container and the SageMaker Model), under the mock engine, are parsed by
serving.config's own loader. Renaming or removing a setting in serving/config.py fails here, as does infra writing a
`SERVING_*` variable or flag that serving does not read."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from facts.cluster import SERVING_OPS_PORT, SERVING_PORT
from facts.serving import ENV_PREFIX, env_name, flag
from infra.config import load_stack as stack_config
from infra.sagemaker_endpoint import MODEL_DIR
from infra.serving_eks import API_KEYS_FILE, DRAIN_TIMEOUT_S
from serving.config import ServingConfig, build_parser, load_config
from tests.infra.conftest import SHIPPED_STACKS
from tests.infra.test_sagemaker_endpoint import MODEL, run_endpoint
from tests.infra.test_serving_eks import container, pod_spec, run_serving

ENGINES = [{}, {"servingEngine": "vllm"}]
SETTINGS = {f.name for f in dataclasses.fields(ServingConfig)}


def parse(args: list[str], env: dict[str, str], keys_file: Path | None = None) -> ServingConfig:
    """What the serving process would load from these args and this environment (the keys file, which only exists
    in the pod, replaced by a local one)."""
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in {env_name(s) for s in SETTINGS})
    assert unknown == [], f"infra sets variables serving does not read: {unknown}"
    if keys_file is not None:
        args = [str(keys_file) if a == API_KEYS_FILE else a for a in args]
    try:
        return load_config(args, env)
    except SystemExit as exc:  # argparse: an unknown flag or a bad value
        raise AssertionError(f"serving.config refuses the rendered args {args}") from exc


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text("team sk-contract-test-0123456789\n")
    return path


@pytest.mark.parametrize("overrides", ENGINES, ids=["builtin", "vllm"])
@pytest.mark.parametrize("stack", SHIPPED_STACKS)
def test_eks_server_container_is_what_serving_config_reads(
    stack: str, overrides: dict[str, Any], keys_file: Path
) -> None:
    cfg = stack_config(stack, **overrides)
    run, _ = run_serving(cfg)
    server = container(run, "server")
    env = {e["name"]: e["value"] for e in server["env"]}
    loaded = parse(list(server["args"]), env, keys_file)
    assert loaded.port == SERVING_PORT and loaded.ops_port == SERVING_OPS_PORT
    assert loaded.api_keys_file == str(keys_file) and not loaded.allow_unauthenticated
    assert loaded.drain_timeout_s == DRAIN_TIMEOUT_S
    if cfg.serving.engine == "vllm":
        assert loaded.upstream.startswith("http://127.0.0.1:") and loaded.served_model_name
    else:
        assert loaded.engine == "builtin" and loaded.device == "cuda" and loaded.model.startswith("s3://")
        assert loaded.quantization == cfg.serving.quantization
    # the ports the pod names are the ones the server binds
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": loaded.port, "ops": loaded.ops_port}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ports[server[probe]["httpGet"]["port"]] == loaded.ops_port
    template = run.one("kubernetes:apps/v1:Deployment").inputs["spec"]["template"]
    assert int(template["metadata"]["annotations"]["prometheus.io/port"]) == loaded.ops_port
    assert pod_spec(run)["terminationGracePeriodSeconds"] > loaded.drain_timeout_s


@pytest.mark.parametrize("overrides", ENGINES, ids=["builtin", "vllm"])
@pytest.mark.parametrize("stack", SHIPPED_STACKS)
def test_sagemaker_model_environment_is_what_serving_config_reads(stack: str, overrides: dict[str, Any]) -> None:
    cfg = stack_config(stack, **overrides)
    env = run_endpoint(cfg).one(MODEL).inputs["primaryContainer"]["environment"]
    loaded = parse([], env)  # SageMaker runs `serve` with no flags: the environment is all there is
    # the SageMaker container contract: /ping and /invocations on 8080
    assert loaded.port == SERVING_PORT == 8080
    assert loaded.model == MODEL_DIR and loaded.allow_unauthenticated
    assert loaded.engine == cfg.serving.engine


def test_every_setting_has_the_flag_and_variable_facts_name() -> None:
    """The serving end: each setting is read from `facts.serving.flag(name)` and `facts.serving.env_name(name)`,
    the names infra writes."""
    parser = build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for name in SETTINGS:
        assert flag(name) in flags, name
    loaded = load_config([], {env_name("upstream"): "http://up", env_name("ops_port"): "9999"})
    assert (loaded.upstream, loaded.ops_port) == ("http://up", 9999)
