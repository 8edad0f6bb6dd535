"""Serving on EKS under the mock engine: the pod lands on the inference pool (selectors and tolerations match what the
node group offers), asks for GPUs, is probed, secured and autoscaled; every object is valid for the cluster version."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pulumi_kubernetes as k8s
import pytest

from facts import pulumi_types as tok
from facts.cluster import SERVING_OPS_PORT
from facts.tags import STACK_TAG, stack_tags
from infra.config import StackConfig
from infra.config import load_stack as stack_config
from infra.serving_eks import (
    API_KEYS_FILE,
    API_KEYS_SECRET,
    DRAIN_TIMEOUT_S,
    VLLM_IMAGE,
    VLLM_UID,
    ServingOnEks,
    ServingOnEksArgs,
)
from ops.mocks import Recorded, Run, run_program

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llmp-dev-serving:0.1.0"
BUCKET = "llmp-dev-models-123456789012"
NAMESPACE = "llm-serving"
SERVICE_ACCOUNT = "server"
DEPLOYMENT = tok.K8S_DEPLOYMENT


def run_serving(cfg: StackConfig) -> tuple[Run, dict[str, Any]]:
    attrs: dict[str, Any] = {}

    def program() -> dict[str, Any]:
        provider = k8s.Provider("k8s", kubeconfig="{}")
        serving = ServingOnEks(
            "serving",
            ServingOnEksArgs(
                serving=cfg.serving,
                cluster=cfg.cluster,
                autoscaling=cfg.autoscaling,
                region=cfg.region,
                name_prefix=cfg.name_prefix,
                tags=stack_tags(cfg.stack, cfg.environment),
                provider=provider,
                namespace=NAMESPACE,
                service_account=SERVICE_ACCOUNT,
                image=IMAGE,
                models_bucket=BUCKET,
            ),
        )
        attrs["service_name"] = serving.service_name
        return {}

    return run_program(program, {}, cfg.stack, cfg.project, cfg.region), attrs


def as_k8s_object(rec: Recorded) -> dict[str, Any]:
    """The object as the provider sends it to the API server (the recording mocks restore integers)."""
    return rec.inputs


def pod_spec(run: Run) -> dict[str, Any]:
    return as_k8s_object(run.one(DEPLOYMENT))["spec"]["template"]["spec"]


def container(run: Run, name: str) -> dict[str, Any]:
    pod = pod_spec(run)
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


@pytest.fixture
def dev() -> tuple[StackConfig, Run, dict[str, Any]]:
    cfg = stack_config("dev")
    run, attrs = run_serving(cfg)
    return cfg, run, attrs


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"servingEngine": "vllm"},
        {"servingIngress": True},
        {"kubernetesVersion": "1.31", "clusterAutoscalerVersion": "1.31.0"},
        {
            "kubernetesVersion": "1.35",
            "clusterAutoscalerVersion": "1.35.0",
            "servingEngine": "vllm",
            "servingIngress": True,
        },
    ],
)
def test_every_object_is_valid_for_the_configured_kubernetes_version(overrides: dict[str, Any]) -> None:
    cfg = stack_config("dev", **overrides)
    run, _ = run_serving(cfg)
    objects = [r for r in run.resources if r.type.startswith("kubernetes:")]
    assert len(objects) >= 4
    for rec in objects:
        kubernetes_validate.validate(as_k8s_object(rec), cfg.cluster.kubernetes_version, strict=True)
        assert rec.provider and "k8s" in rec.provider
        assert rec.inputs["metadata"]["namespace"] == NAMESPACE


def test_pod_lands_on_the_inference_pool(dev: tuple[StackConfig, Run, dict]) -> None:
    cfg, run, _ = dev
    pool = cfg.cluster.pool("inference")
    pod = pod_spec(run)
    assert pod["nodeSelector"] == pool.labels
    # every taint of the pool's nodes is tolerated (otherwise the pod stays Pending)
    for taint in pool.taints:
        assert any(
            t["key"] == taint["key"] and t["effect"] == taint["effect"] and t.get("value") == taint["value"]
            for t in pod["tolerations"]
        ), taint
    # and the pool's labels are not the training pool's
    assert pod["nodeSelector"] != cfg.cluster.pool("training").labels
    server = container(run, "server")
    gpus = str(cfg.serving.gpus_per_replica)
    assert server["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert server["resources"]["limits"]["nvidia.com/gpu"] == gpus
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(server["resources"][kind])


def test_engine_resources_fit_the_smallest_instance_of_the_pool(dev: tuple[StackConfig, Run, dict]) -> None:
    from facts.instance_types import GPU_INSTANCE_TYPES

    cfg, run, _ = dev
    smallest = min(GPU_INSTANCE_TYPES[t].memory_gib for t in cfg.cluster.pool("inference").instance_types)
    requests = container(run, "server")["resources"]["requests"]
    assert int(requests["memory"].removesuffix("Gi")) < smallest
    assert int(requests["cpu"]) < min(GPU_INSTANCE_TYPES[t].vcpus for t in cfg.cluster.pool("inference").instance_types)


def test_selector_matches_template_and_service(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, attrs = dev
    dep = run.one(DEPLOYMENT).inputs
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    svc = run.one(tok.K8S_SERVICE).inputs
    assert svc["metadata"]["name"] == attrs["service_name"]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == selector
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert "replicas" not in dep["spec"]  # the HPA owns it


def test_builtin_engine_container(dev: tuple[StackConfig, Run, dict]) -> None:
    cfg, run, _ = dev
    pod = pod_spec(run)
    assert [c["name"] for c in pod["containers"]] == ["server"]
    server = container(run, "server")
    assert server["image"] == IMAGE
    assert server["args"] == [
        # explicit: the vLLM image bakes SERVING_ENGINE=vllm, and the CPU default would fail on CUDA
        "--engine",
        "builtin",
        "--device",
        "cuda",
        "--dtype",
        "bfloat16",
        "--model",
        f"s3://{BUCKET}/{cfg.serving.model_prefix}",
        "--port",
        "8080",
        "--ops-port",
        str(SERVING_OPS_PORT),
        "--api-keys-file",
        API_KEYS_FILE,
    ]
    assert server["ports"] == [
        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        {"name": "ops", "containerPort": SERVING_OPS_PORT, "protocol": "TCP"},
    ]
    assert pod["serviceAccountName"] == SERVICE_ACCOUNT


def test_probes(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, _ = dev
    server = container(run, "server")
    # on the operations listener, whose connection slots no client connection can take
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    startup = server["startupProbe"]
    assert startup["httpGet"] == {"path": "/readyz", "port": "ops"}
    # generous: at least 15 minutes to download and load a model
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 900


def test_security_context_is_restricted_with_writable_scratch(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, _ = dev
    pod = pod_spec(run)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/tmp"] == "tmp"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["tmp"] and "emptyDir" in volumes["cache"]


def test_api_keys_come_from_the_operator_secret(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, _ = dev
    volumes = {v["name"]: v for v in pod_spec(run)["volumes"]}
    assert volumes["api-keys"]["secret"] == {"secretName": API_KEYS_SECRET, "optional": False}
    mount = next(m for m in container(run, "server")["volumeMounts"] if m["name"] == "api-keys")
    assert API_KEYS_FILE.startswith(mount["mountPath"] + "/") and mount["readOnly"] is True
    assert run.of_type(tok.K8S_SECRET) == []  # never created (or stored in state) by the program


def test_graceful_shutdown_outlasts_the_drain(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, _ = dev
    pod = pod_spec(run)
    server = container(run, "server")
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + DRAIN_TIMEOUT_S
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["SERVING_DRAIN_TIMEOUT_S"] == str(DRAIN_TIMEOUT_S)


def test_spread_across_zones_and_scraped(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, _ = dev
    dep = run.one(DEPLOYMENT).inputs
    [spread] = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(SERVING_OPS_PORT),  # /metrics is not served on the client port
        "prometheus.io/path": "/metrics",
    }


def test_disruption_budget_never_blocks_drains(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, _ = dev
    pdb = run.one(tok.K8S_POD_DISRUPTION_BUDGET).inputs["spec"]
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb
    assert pdb["selector"]["matchLabels"] == run.one(DEPLOYMENT).inputs["spec"]["selector"]["matchLabels"]


def test_autoscaler_bounds_follow_config() -> None:
    cfg = stack_config("dev", servingReplicas=2, servingMaxReplicas=5, inferenceMaxSize=5, maxGpus=10)
    run, _ = run_serving(cfg)
    hpa = run.one(tok.K8S_HORIZONTAL_POD_AUTOSCALER).inputs["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-serving"}
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"


def test_no_ingress_unless_enabled(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, _ = dev
    assert run.of_type(tok.K8S_INGRESS) == []


def test_internal_alb_ingress_when_enabled() -> None:
    run, attrs = run_serving(stack_config("dev", servingIngress=True))
    ing = run.one(tok.K8S_INGRESS).inputs
    annotations = ing["metadata"]["annotations"]
    assert annotations["alb.ingress.kubernetes.io/scheme"] == "internal"
    assert annotations["alb.ingress.kubernetes.io/target-type"] == "ip"
    assert f"{STACK_TAG}=dev" in annotations["alb.ingress.kubernetes.io/tags"]
    assert ing["spec"]["ingressClassName"] == "alb"
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": attrs["service_name"], "port": {"name": "http"}}


def test_vllm_engine_runs_beside_the_gateway() -> None:
    cfg = stack_config("dev", servingEngine="vllm")
    run, _ = run_serving(cfg)
    pod = pod_spec(run)
    assert [c["name"] for c in pod["containers"]] == ["server"]
    server, vllm = container(run, "server"), container(run, "vllm")
    assert server["args"][:2] == ["--upstream", "http://127.0.0.1:8000"]
    assert "--model" not in server["args"]
    assert server["args"][-2:] == ["--api-keys-file", API_KEYS_FILE]
    assert "nvidia.com/gpu" not in server["resources"]["requests"]
    assert vllm["image"] == VLLM_IMAGE and ":latest" not in VLLM_IMAGE
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == str(cfg.serving.gpus_per_replica)
    # `vllm serve <model>`: the positional model, not the deprecated --model flag
    assert vllm["command"] == ["vllm", "serve"]
    args = vllm["args"]
    assert args[0] == f"s3://{BUCKET}/{cfg.serving.model_prefix}" and "--model" not in args
    assert args[args.index("--port") + 1] == "8000"
    assert args[args.index("--tensor-parallel-size") + 1] == str(cfg.serving.gpus_per_replica)
    env = {e["name"]: e["value"] for e in vllm["env"]}
    assert env["AWS_REGION"] == cfg.region  # IMDS is out of a pod's reach (hop limit 1)
    assert vllm["securityContext"]["runAsUser"] == VLLM_UID  # a uid with a passwd entry in the vLLM image
    # the readiness the Service routes on is still the gateway's
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {v["name"] for v in pod["volumes"]} >= {"dshm", "cache", "tmp", "api-keys"}


def test_children_named_and_parented(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, _ = dev
    assert run.duplicate_names() == []
    for r in run.resources:
        if r.type.startswith("kubernetes:"):
            assert r.parent == "serving" and r.name.startswith("serving-"), r.name


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_shipped_stacks_are_valid_for_their_kubernetes_version(stack: str) -> None:
    cfg = stack_config(stack)
    run, _ = run_serving(cfg)
    assert run.duplicate_names() == []
    for rec in (r for r in run.resources if r.type.startswith("kubernetes:")):
        kubernetes_validate.validate(as_k8s_object(rec), cfg.cluster.kubernetes_version, strict=True)


def test_vllm_is_a_native_sidecar_that_outlives_the_gateway_drain() -> None:
    """A restartable init container starts before the gateway and is stopped only after it has exited, so the
    gateway's preStop + drain never routes to a vLLM that already got SIGTERM."""
    cfg = stack_config("dev", servingEngine="vllm")
    run, _ = run_serving(cfg)
    pod = pod_spec(run)
    assert [c["name"] for c in pod["initContainers"]] == ["vllm"]
    vllm = pod["initContainers"][0]
    assert vllm["restartPolicy"] == "Always"
    assert vllm["startupProbe"]["httpGet"]["path"] == "/health"  # the gateway starts once vLLM is up
    assert "lifecycle" not in vllm  # nothing delays it: it is stopped after the gateway, by ordering
    assert cfg.cluster.kubernetes_version >= "1.29"  # native sidecars are on by default from 1.29


@pytest.mark.parametrize(
    ("instance_types", "prefix", "expected_len"),
    [
        # prod's inference pool: one L40S (45 GiB): 23.5 GiB of KV cache for Llama-3.1-8B
        (["g6e.2xlarge"], "llama-3.1-8b-instruct", 96256),
        # an A10G / L4 (22.5 GiB): ~3.3 GiB after the weights, so far below the model's 131072
        (["g6.xlarge", "g6.2xlarge"], "llama-3.1-8b-instruct", 13312),
        (["g6.xlarge"], "debug-llama", 512),  # the model's own context fits whole
    ],
)
def test_vllm_args_are_sized_for_the_pools_smallest_gpu(
    instance_types: list[str], prefix: str, expected_len: int
) -> None:
    cfg = stack_config("dev", servingEngine="vllm", inferenceInstanceTypes=instance_types, servingModelPrefix=prefix)
    run, _ = run_serving(cfg)
    args = container(run, "vllm")["args"]
    assert args[args.index("--max-model-len") + 1] == str(expected_len)
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.90"
    assert args[args.index("--tensor-parallel-size") + 1] == "1"
