"""Serving on EKS: the serving Deployment on the inference GPU pool, its Service, disruption budget, (with
`servingAutoscaler: cpu`) its CPU autoscaler and (optionally) an internal ALB Ingress, written as plain Kubernetes
objects (infra/k8s_objects.py).

The pod's scheduling contract (node selector, toleration, GPU request) is derived from the same `GpuPool` object the
node group is built from, so labels and taints cannot drift apart and leave pods Pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from facts.cluster import SERVING_OPS_PORT, SERVING_PORT
from facts.instance_types import GPU_INSTANCE_TYPES, gpu_memory_gib
from facts.serving import env_name, flag
from infra import k8s_objects
from infra.config import AutoscalingConfig, ClusterConfig, ServingConfig
from infra.vllm_sizing import VllmSizing, sizing_for

SERVICE_NAME = "llm-serving"
VLLM_PORT = 8000
API_KEYS_SECRET = "serving-api-keys"
"""The Kubernetes Secret the pods mount the keys file from (format: docs/serving.md). The program writes it from the
stack's Secrets Manager secret, which the preview-time checks require (infra/preflight.py), as a Pulumi secret; the
keys file may hold SHA-256 digests instead of keys, so no usable key is in state. The volume is not optional: without
the Secret pods stay in ContainerCreating, louder than serving unauthenticated."""
API_KEYS_DIR = "/etc/llm-platform/api-keys"
API_KEYS_FILE = f"{API_KEYS_DIR}/keys"
CACHE_DIR = "/var/cache/llm-serving"
VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"
"""Pinned: vLLM's flags and its torch/CUDA stack change with every release. vLLM 0.33.0 is the release on PyPI
(checked with `pip index versions vllm`); its images are tagged `v<version>` (docs.vllm.ai, deployment/docker).
A tag, not a digest: Docker Hub was not reachable from where this was written, and nothing in the deploy resolves the
tag to a digest yet (the serving image has `servingImageDigest`; this sidecar has no such setting)."""
VLLM_UID = 65534
"""`nobody`, present in the passwd file of every Debian/Ubuntu image, vLLM's included. Under an arbitrary uid
with no passwd entry, Python's getpass.getuser() (torch inductor's and Triton's cache paths) raises KeyError."""

DRAIN_TIMEOUT_S = 30
"""How long the server lets in-flight requests finish after SIGTERM (its --drain-timeout-s)."""
PRE_STOP_SLEEP_S = 10
"""Endpoints and ALB targets are removed asynchronously; keep serving this long before draining starts."""
TERMINATION_GRACE_S = PRE_STOP_SLEEP_S + DRAIN_TIMEOUT_S + 20
STARTUP_PERIOD_S = 10
STARTUP_FAILURE_THRESHOLD = 180
"""30 minutes to download and load a model before the kubelet gives up on a pod."""
HPA_CPU_TARGET = 70


@dataclass
class ServingOnEksArgs:
    serving: ServingConfig
    """The serving section: engine, model, GPUs per replica, replicas, quantization, ingress."""
    cluster: ClusterConfig
    """The cluster section: its inference pool is where the pods run, and what they are sized for."""
    autoscaling: AutoscalingConfig
    """The autoscaling section: with `servingAutoscaler: cpu` this component owns the HPA."""
    region: str
    """AWS region (the vLLM S3 streamer's client needs it)."""
    name_prefix: str
    """`<project>-<stack>`: names the internal ALB."""
    tags: dict[str, str]
    """Stack tags, put on the ALB and its target groups (the teardown sweep finds them by these)."""
    provider: k8s.Provider
    """Explicit provider for the cluster."""
    namespace: pulumi.Input[str]
    """Serving namespace (from KubernetesBase)."""
    service_account: pulumi.Input[str]
    """Service account bound to the serving Pod Identity role (from KubernetesBase)."""
    image: pulumi.Input[str]
    """Full serving image reference: `<serving repository url>@<digest>`, or `:<servingImageTag>` without a digest."""
    models_bucket: pulumi.Input[str]
    """Bucket holding exported models; the model is read from `s3://<bucket>/<servingModelPrefix>`."""


class ServingOnEks(pulumi.ComponentResource):
    """The serving Deployment on the inference GPU pool (the serving container, and vLLM as its native sidecar with
    `servingEngine: vllm`), its ClusterIP Service, a PodDisruptionBudget, the CPU autoscaler (with
    `servingAutoscaler: cpu`) and, with `servingIngress`, an internal ALB Ingress."""

    service_name: str
    """Name of the serving Service (and of the Deployment and the other objects), in the serving namespace."""
    deployment: k8s.apps.v1.Deployment
    """The serving Deployment (an autoscaler outside this component targets its `metadata.name`)."""
    service: k8s.core.v1.Service
    """The ClusterIP Service in front of the pods (port 80, named `http`)."""
    ingress: k8s.networking.v1.Ingress | None
    """The internal ALB Ingress, or None without `servingIngress`."""

    def __init__(self, name: str, args: ServingOnEksArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:ServingOnEks", name, None, opts)
        self._name = name
        self._args = args
        self._k8s_opts = pulumi.ResourceOptions(parent=self, provider=args.provider)
        self._pool = args.cluster.pool("inference")
        self._labels = {
            "app.kubernetes.io/name": SERVICE_NAME,
            "app.kubernetes.io/component": "server",
            "app.kubernetes.io/part-of": "llm-platform",
        }
        self.service_name = SERVICE_NAME

        self.deployment = self._create_deployment()
        self.service = self._object(
            f"{name}-service",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": self._metadata(),
                "spec": {
                    "type": "ClusterIP",
                    "selector": self._labels,
                    "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
                },
            },
        )
        self._create_disruption_budget()
        if args.autoscaling.serving_autoscaler == "cpu":
            # With KEDA, its ScaledObject owns the HPA (infra/serving_autoscaling.py); two HPAs on one Deployment fight.
            self._create_autoscaler()
        self.ingress = self._create_ingress() if args.serving.ingress else None

        self.register_outputs(
            {
                "service_name": self.service_name,
                "namespace": args.namespace,
                "deployment": self.deployment.metadata.name,
            }
        )

    def _metadata(self, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        return k8s_objects.metadata(SERVICE_NAME, self._args.namespace, self._labels, annotations)

    def _object(self, resource_name: str, obj: dict[str, Any], opts: pulumi.ResourceOptions | None = None) -> Any:
        return k8s_objects.apply(resource_name, obj, self._k8s_opts.merge(opts) if opts else self._k8s_opts)

    # -- the pod ---------------------------------------------------------------------------------------------------
    def _model_uri(self) -> pulumi.Output[str]:
        prefix = self._args.serving.model_prefix
        return pulumi.Output.from_input(self._args.models_bucket).apply(lambda b: f"s3://{b}/{prefix}")

    def _create_deployment(self) -> k8s.apps.v1.Deployment:
        vllm = self._args.serving.engine == "vllm"
        volumes: list[dict[str, Any]] = [
            {"name": "api-keys", "secret": {"secretName": API_KEYS_SECRET, "optional": False}},
            # The root filesystem is read-only: model downloads, caches and scratch go to node-local emptyDirs.
            {"name": "cache", "emptyDir": {"sizeLimit": f"{self._cache_gib()}Gi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
        ]
        if vllm:
            # NCCL and vLLM's workers exchange tensors through shared memory; the default 64 MiB is too small.
            volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}})
        pod: dict[str, Any] = {
            "serviceAccountName": self._args.service_account,
            # The pod never calls the Kubernetes API; Pod Identity uses its own projected token.
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            # The same GpuPool the node group was built from: its labels select the nodes, its taints are tolerated.
            "nodeSelector": self._pool.labels,
            "tolerations": [
                {"key": t["key"], "operator": "Equal", "value": t["value"], "effect": t["effect"]}
                for t in self._pool.taints
            ],
            # ScheduleAnyway: GPU capacity is scarce and uneven across zones; a hard spread would leave replicas
            # Pending when one zone has no GPU left, which is worse than two replicas sharing a zone.
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": self._labels},
                }
            ],
            "containers": [self._gateway_container(vllm)],
            "volumes": volumes,
        }
        if vllm:
            # vLLM is a native sidecar (an init container with restartPolicy Always; Kubernetes >= 1.29, every
            # version this platform supports): the kubelet starts it before the gateway and stops it only after the
            # gateway has exited, so it serves the gateway's whole preStop + drain instead of getting SIGTERM with it.
            pod["initContainers"] = [self._vllm_container()]
        return self._object(
            f"{self._name}-deployment",
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": self._metadata(),
                "spec": {
                    # No `replicas`: the HPA owns the count (starting at servingReplicas). Setting it here would make
                    # every `pulumi up` reset a scaled-out Deployment back to the minimum.
                    "selector": {"matchLabels": self._labels},
                    # A GPU node rarely has room for a surge pod: replace one replica at a time instead.
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                    "template": {
                        "metadata": {
                            "labels": self._labels,
                            "annotations": {
                                "prometheus.io/scrape": "true",
                                # the operations listener: /metrics is not served on the client port
                                "prometheus.io/port": str(SERVING_OPS_PORT),
                                "prometheus.io/path": "/metrics",
                            },
                        },
                        "spec": pod,
                    },
                },
            },
            # Pods can wait up to the startup budget for a node to scale up and a model to load.
            pulumi.ResourceOptions(custom_timeouts=pulumi.CustomTimeouts(create="40m", update="40m")),
        )

    def _gateway_container(self, vllm: bool) -> dict[str, Any]:
        """The serving container. With the built-in engine it loads the model and holds the GPUs; with vLLM it is
        the gateway in front of it (keys, limits, metrics) and loads nothing."""
        # The engine is always explicit: an image's baked SERVING_ENGINE (the vLLM image sets vllm) must not pick
        # it. Flags win over environment variables in serving/config.py.
        # Names come from facts.serving (flag, env_name), as serving/config.py derives them; a test parses the
        # rendered args and env with serving.config's own loader (tests/infra/test_serving_contract.py).
        model_args: list[pulumi.Input[str]] = (
            [flag("upstream"), f"http://127.0.0.1:{VLLM_PORT}"]
            if vllm
            else [
                flag("engine"), "builtin", flag("device"), "cuda", flag("dtype"), "bfloat16",
                flag("model"), self._model_uri(),
            ]
        )  # fmt: skip
        env: list[dict[str, Any]] = [
            {"name": env_name("drain_timeout_s"), "value": str(DRAIN_TIMEOUT_S)},
            {"name": env_name("model_cache_dir"), "value": f"{CACHE_DIR}/models"},
            {"name": "HOME", "value": "/tmp"},
        ]
        if vllm:
            env.append({"name": env_name("served_model_name"), "value": self._served_model_name()})
        else:
            env.append({"name": "HF_HOME", "value": f"{CACHE_DIR}/hf"})
            quantization = self._args.serving.quantization
            if quantization != "none":  # the built-in engine's --quantization (serving/quantize.py)
                env.append({"name": env_name("quantization"), "value": quantization})
        resources = (
            {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
            if vllm
            else self._engine_resources()
        )
        return {
            "name": "server",
            "image": self._args.image,
            "args": [
                *model_args,
                flag("port"),
                str(SERVING_PORT),
                flag("ops_port"),
                str(SERVING_OPS_PORT),
                flag("api_keys_file"),
                API_KEYS_FILE,
            ],
            "ports": [
                {"name": "http", "containerPort": SERVING_PORT, "protocol": "TCP"},
                {"name": "ops", "containerPort": SERVING_OPS_PORT, "protocol": "TCP"},
            ],
            "env": env,
            "resources": resources,
            # Probes use the operations listener: its connection slots are its own, so a flood of client
            # connections on the http port cannot fail them (docs/serving.md "Connections").
            "readinessProbe": _http_probe("/readyz", "ops", period=5, failures=3),
            "livenessProbe": _http_probe("/healthz", "ops", period=10, failures=3),
            # Liveness only starts once this succeeds, so a slow model load is not mistaken for a hung server.
            "startupProbe": _http_probe("/readyz", "ops", period=STARTUP_PERIOD_S, failures=STARTUP_FAILURE_THRESHOLD),
            "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SLEEP_S}}},
            "securityContext": _restricted_container(),
            "volumeMounts": [
                {"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True},
                {"name": "cache", "mountPath": CACHE_DIR},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }

    def _vllm_container(self) -> dict[str, Any]:
        """vLLM behind the gateway: clients reach it only through the gateway, which authenticates them. It binds all
        addresses because kubelet probes come from the node, not loopback; the namespace's network policies admit
        only port 8080 from other pods, so 8000 is reachable from the pod itself and its node alone."""
        cache = f"{CACHE_DIR}/vllm"
        return {
            "name": "vllm",
            "image": VLLM_IMAGE,
            "restartPolicy": "Always",
            # `vllm serve <model>`: the positional model (the `--model` flag is deprecated there). The command is set
            # rather than left to the image's entrypoint, so the arguments mean the same whatever it is.
            "command": ["vllm", "serve"],
            "args": [
                self._model_uri(),
                # Streams safetensors straight from S3 (credentials from Pod Identity) instead of a full download.
                "--load-format",
                "runai_streamer",
                "--served-model-name",
                self._served_model_name(),
                "--host",
                "0.0.0.0",
                "--port",
                str(VLLM_PORT),
                *self.vllm_sizing().args(),
                # KV blocks of shared prompt prefixes are reused across requests; explicit, so an image default
                # cannot turn it off (https://docs.vllm.ai/en/latest/features/automatic_prefix_caching.html)
                "--enable-prefix-caching",
                *self._vllm_quantization_args(),
            ],
            "env": [
                # The S3 streamer's client needs the region: IMDS (hop limit 1) is out of a pod's reach.
                {"name": "AWS_REGION", "value": self._args.region},
                {"name": "HOME", "value": "/tmp"},
                {"name": "HF_HOME", "value": f"{cache}/hf"},
                {"name": "VLLM_CACHE_ROOT", "value": cache},
                {"name": "XDG_CACHE_HOME", "value": cache},
                {"name": "TRITON_CACHE_DIR", "value": f"{cache}/triton"},
                {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
                {"name": "DO_NOT_TRACK", "value": "1"},
            ],
            "resources": self._engine_resources(),
            "startupProbe": _http_probe(
                "/health", VLLM_PORT, period=STARTUP_PERIOD_S, failures=STARTUP_FAILURE_THRESHOLD
            ),
            "livenessProbe": _http_probe("/health", VLLM_PORT, period=10, failures=3),
            "securityContext": _restricted_container(run_as_user=VLLM_UID),
            "volumeMounts": [
                {"name": "cache", "mountPath": CACHE_DIR},
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "dshm", "mountPath": "/dev/shm"},
            ],
        }

    def vllm_sizing(self) -> VllmSizing:
        """Sized for the pool's smallest GPU (infra/vllm_sizing.py; config loading has checked that it fits)."""
        serving = self._args.serving
        smallest = min(self._pool.instance_types, key=gpu_memory_gib)
        return sizing_for(serving.model_prefix, serving.model_shape, smallest, serving.gpus_per_replica)

    def _vllm_quantization_args(self) -> list[str]:
        """servingQuantization as vLLM's --quantization (AWQ/GPTQ need a checkpoint quantized that way; fp8
        quantizes a bf16 checkpoint on load: https://docs.vllm.ai/en/latest/features/quantization/)."""
        quantization = self._args.serving.quantization
        return [] if quantization == "none" else ["--quantization", quantization]

    def _served_model_name(self) -> str:
        return self._args.serving.model_prefix.rstrip("/").rsplit("/", 1)[-1]

    def _engine_resources(self) -> dict[str, Any]:
        """The engine's share of a node, in proportion to the GPUs it asks for, sized for the smallest instance type
        of the pool so the pod fits on any of them. Requests leave room for the kubelet and the DaemonSets."""
        share = self._args.serving.gpus_per_replica / self._pool.gpus_per_node
        smallest = min((GPU_INSTANCE_TYPES[t] for t in self._pool.instance_types), key=lambda t: t.vcpus)
        cpu = max(1, int(smallest.vcpus * share * 0.5))
        memory_gib = max(2, int(smallest.memory_gib * share * 0.5))
        gpus = str(self._args.serving.gpus_per_replica)
        return {
            "requests": {"cpu": str(cpu), "memory": f"{memory_gib}Gi", "nvidia.com/gpu": gpus},
            "limits": {
                "cpu": str(max(cpu, int(smallest.vcpus * share * 0.75))),
                "memory": f"{max(memory_gib, int(smallest.memory_gib * share * 0.75))}Gi",
                "nvidia.com/gpu": gpus,
            },
        }

    def _cache_gib(self) -> int:
        """Model files land on the node's root volume: allow most of it, leaving room for images."""
        return max(10, self._pool.disk_gb // 2)

    # -- around the pod --------------------------------------------------------------------------------------------
    def _create_disruption_budget(self) -> None:
        # maxUnavailable 1, not minAvailable 1: with a single replica minAvailable 1 would block every node drain,
        # so managed node group upgrades and scale-in would fail after their eviction timeout. With more replicas it
        # still keeps all but one serving during voluntary disruptions.
        self._object(
            f"{self._name}-pdb",
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": self._metadata(),
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": self._labels}},
            },
        )

    def _create_autoscaler(self) -> None:
        serving = self._args.serving
        self._object(
            f"{self._name}-hpa",
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": self._metadata(),
                "spec": {
                    "scaleTargetRef": {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": self.deployment.metadata.name,
                    },
                    "minReplicas": serving.replicas,
                    "maxReplicas": serving.max_replicas,
                    # CPU (metrics-server add-on); `servingAutoscaler: keda` scales on the serving queue instead.
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": {"type": "Utilization", "averageUtilization": HPA_CPU_TARGET},
                            },
                        }
                    ],
                    # A new replica may need a new GPU node and a model load (minutes): scale down slowly.
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
                },
            },
        )

    def _create_ingress(self) -> k8s.networking.v1.Ingress:
        """Internal ALB through the AWS Load Balancer Controller (infra/load_balancer_controller.py). The stack tags
        go on the ALB and its target groups, so the teardown sweep finds them even though no Pulumi resource owns
        them."""
        tags = ",".join(f"{k}={v}" for k, v in self._args.tags.items())
        return self._object(
            f"{self._name}-ingress",
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "Ingress",
                "metadata": self._metadata(
                    annotations={
                        "alb.ingress.kubernetes.io/scheme": "internal",
                        "alb.ingress.kubernetes.io/target-type": "ip",
                        "alb.ingress.kubernetes.io/healthcheck-path": "/readyz",
                        "alb.ingress.kubernetes.io/load-balancer-name": f"{self._args.name_prefix}-serving",
                        "alb.ingress.kubernetes.io/tags": tags,
                        # Generation can take minutes; the ALB's default 60 s idle timeout would cut long completions.
                        "alb.ingress.kubernetes.io/load-balancer-attributes": "idle_timeout.timeout_seconds=600",
                    }
                ),
                "spec": {
                    "ingressClassName": "alb",
                    "rules": [
                        {
                            "http": {
                                "paths": [
                                    {
                                        "path": "/",
                                        "pathType": "Prefix",
                                        "backend": {
                                            "service": {"name": self.service.metadata.name, "port": {"name": "http"}}
                                        },
                                    }
                                ]
                            }
                        }
                    ],
                },
            },
        )


def _http_probe(path: str, port: int | str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def _restricted_container(run_as_user: int | None = None) -> dict[str, Any]:
    """What the "restricted" Pod Security Standard demands, plus a read-only root filesystem."""
    context: dict[str, Any] = {} if run_as_user is None else {"runAsUser": run_as_user}
    return {
        **context,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
