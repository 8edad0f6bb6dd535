"""Serving on EKS: the serving Deployment on the inference GPU pool, its Service, disruption budget, autoscaler and
(optionally) an internal ALB Ingress.

The pod's scheduling contract (node selector, toleration, GPU request) is derived from the same `GpuPool` object the
node group is built from, so labels and taints cannot drift apart and leave pods Pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from facts.cluster import SERVING_PORT
from facts.instance_types import GPU_INSTANCE_TYPES, gpu_memory_gib
from facts.tags import stack_tags
from infra.config import StackConfig
from infra.vllm_sizing import VllmSizing, sizing_for

SERVICE_NAME = "llm-serving"
VLLM_PORT = 8000
API_KEYS_SECRET = "serving-api-keys"
"""Created by the operator, never by this program: keys must not live in code or in Pulumi state.
`kubectl -n llm-serving create secret generic serving-api-keys --from-file=keys=./keys` (format: docs/serving.md).
Pods stay in ContainerCreating until it exists (the volume is not optional): louder than serving unauthenticated.
"""
API_KEYS_DIR = "/etc/llm-platform/api-keys"
API_KEYS_FILE = f"{API_KEYS_DIR}/keys"
CACHE_DIR = "/var/cache/llm-serving"
VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"
"""Pinned: vLLM's flags and its torch/CUDA stack change with every release. vLLM 0.33.0 is the release on PyPI
(checked with `pip index versions vllm`); its images are tagged `v<version>` (docs.vllm.ai, deployment/docker).
Docker Hub is not reachable from where this was written: CI resolves the tag to a digest before a deploy."""
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
    config: StackConfig
    """The validated stack configuration (serving section, the inference pool)."""
    provider: k8s.Provider
    """Explicit provider for the cluster."""
    namespace: str
    """Serving namespace (from KubernetesBase)."""
    service_account: str
    """Service account bound to the serving Pod Identity role (from KubernetesBase)."""
    image: pulumi.Input[str]
    """Full serving image reference: `<serving repository url>:<servingImageTag>`."""
    models_bucket: pulumi.Input[str]
    """Bucket holding exported models; the model is read from `s3://<bucket>/<servingModelPrefix>`."""


class ServingOnEks(pulumi.ComponentResource):
    service_name: str
    deployment: k8s.apps.v1.Deployment
    service: k8s.core.v1.Service
    ingress: k8s.networking.v1.Ingress | None

    def __init__(self, name: str, args: ServingOnEksArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:ServingOnEks", name, None, opts)
        self._name = name
        self._args = args
        self._k8s_opts = pulumi.ResourceOptions(parent=self, provider=args.provider)
        cfg = args.config
        self._pool = cfg.cluster.pool("inference")
        self._labels = {
            "app.kubernetes.io/name": SERVICE_NAME,
            "app.kubernetes.io/component": "server",
            "app.kubernetes.io/part-of": "llm-platform",
        }
        self.service_name = SERVICE_NAME

        self.deployment = self._create_deployment()
        self.service = k8s.core.v1.Service(
            f"{name}-service",
            metadata=self._metadata(),
            spec=k8s.core.v1.ServiceSpecArgs(
                type="ClusterIP",
                selector=self._labels,
                ports=[k8s.core.v1.ServicePortArgs(name="http", port=80, target_port="http", protocol="TCP")],
            ),
            opts=self._k8s_opts,
        )
        self._create_disruption_budget()
        if cfg.autoscaling.serving_autoscaler == "cpu":
            # With KEDA, its ScaledObject owns the HPA (infra/serving_autoscaling.py); two HPAs on one Deployment fight.
            self._create_autoscaler()
        self.ingress = self._create_ingress() if cfg.serving.ingress else None

        self.register_outputs(
            {
                "service_name": self.service_name,
                "namespace": args.namespace,
                "deployment": self.deployment.metadata.name,
            }
        )

    def _metadata(self, **extra: Any) -> k8s.meta.v1.ObjectMetaArgs:
        return k8s.meta.v1.ObjectMetaArgs(
            name=SERVICE_NAME, namespace=self._args.namespace, labels=self._labels, **extra
        )

    # -- the pod ---------------------------------------------------------------------------------------------------
    def _model_uri(self) -> pulumi.Output[str]:
        prefix = self._args.config.serving.model_prefix
        return pulumi.Output.from_input(self._args.models_bucket).apply(lambda b: f"s3://{b}/{prefix}")

    def _create_deployment(self) -> k8s.apps.v1.Deployment:
        cfg = self._args.config
        vllm = cfg.serving.engine == "vllm"
        containers = [self._gateway_container(vllm)]
        # vLLM is a native sidecar (an init container with restartPolicy Always; Kubernetes >= 1.29, every version
        # this platform supports): the kubelet starts it before the gateway and stops it only after the gateway
        # has exited, so it serves the gateway's whole preStop + drain instead of getting SIGTERM with it.
        init_containers = [self._vllm_container()] if vllm else None
        volumes = [
            k8s.core.v1.VolumeArgs(
                name="api-keys",
                secret=k8s.core.v1.SecretVolumeSourceArgs(secret_name=API_KEYS_SECRET, optional=False),
            ),
            # The root filesystem is read-only: model downloads, caches and scratch go to node-local emptyDirs.
            k8s.core.v1.VolumeArgs(
                name="cache",
                empty_dir=k8s.core.v1.EmptyDirVolumeSourceArgs(size_limit=f"{self._cache_gib()}Gi"),
            ),
            k8s.core.v1.VolumeArgs(name="tmp", empty_dir=k8s.core.v1.EmptyDirVolumeSourceArgs(size_limit="4Gi")),
        ]
        if vllm:
            # NCCL and vLLM's workers exchange tensors through shared memory; the default 64 MiB is too small.
            volumes.append(
                k8s.core.v1.VolumeArgs(
                    name="dshm", empty_dir=k8s.core.v1.EmptyDirVolumeSourceArgs(medium="Memory", size_limit="8Gi")
                )
            )
        pod = k8s.core.v1.PodSpecArgs(
            service_account_name=self._args.service_account,
            # The pod never calls the Kubernetes API; Pod Identity uses its own projected token.
            automount_service_account_token=False,
            termination_grace_period_seconds=TERMINATION_GRACE_S,
            security_context=k8s.core.v1.PodSecurityContextArgs(
                run_as_non_root=True,
                run_as_user=1000,
                run_as_group=1000,
                fs_group=1000,
                seccomp_profile=k8s.core.v1.SeccompProfileArgs(type="RuntimeDefault"),
            ),
            # The same GpuPool the node group was built from: its labels select the nodes, its taints are tolerated.
            node_selector=self._pool.labels,
            tolerations=[
                k8s.core.v1.TolerationArgs(key=t["key"], operator="Equal", value=t["value"], effect=t["effect"])
                for t in self._pool.taints
            ],
            # ScheduleAnyway: GPU capacity is scarce and uneven across zones; a hard spread would leave replicas
            # Pending when one zone has no GPU left, which is worse than two replicas sharing a zone.
            topology_spread_constraints=[
                k8s.core.v1.TopologySpreadConstraintArgs(
                    max_skew=1,
                    topology_key="topology.kubernetes.io/zone",
                    when_unsatisfiable="ScheduleAnyway",
                    label_selector=k8s.meta.v1.LabelSelectorArgs(match_labels=self._labels),
                )
            ],
            init_containers=init_containers,
            containers=containers,
            volumes=volumes,
        )
        return k8s.apps.v1.Deployment(
            f"{self._name}-deployment",
            metadata=self._metadata(),
            spec=k8s.apps.v1.DeploymentSpecArgs(
                # No `replicas`: the HPA owns the count (starting at servingReplicas). Setting it here would make
                # every `pulumi up` reset a scaled-out Deployment back to the minimum.
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=self._labels),
                # A GPU node rarely has room for a surge pod: replace one replica at a time instead.
                strategy=k8s.apps.v1.DeploymentStrategyArgs(
                    type="RollingUpdate",
                    rolling_update=k8s.apps.v1.RollingUpdateDeploymentArgs(max_surge=0, max_unavailable=1),
                ),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(
                        labels=self._labels,
                        annotations={
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(SERVING_PORT),
                            "prometheus.io/path": "/metrics",
                        },
                    ),
                    spec=pod,
                ),
            ),
            opts=self._k8s_opts.merge(
                # Pods can wait up to the startup budget for a node to scale up and a model to load.
                pulumi.ResourceOptions(custom_timeouts=pulumi.CustomTimeouts(create="40m", update="40m"))
            ),
        )

    def _gateway_container(self, vllm: bool) -> k8s.core.v1.ContainerArgs:
        """The serving container. With the built-in engine it loads the model and holds the GPUs; with vLLM it is
        the gateway in front of it (keys, limits, metrics) and loads nothing."""
        # The engine is always explicit: an image's baked SERVING_ENGINE (the vLLM image sets vllm) must not pick
        # it. Flags win over environment variables in serving/config.py.
        model_args: list[pulumi.Input[str]] = (
            ["--upstream", f"http://127.0.0.1:{VLLM_PORT}"]
            if vllm
            else ["--engine", "builtin", "--device", "cuda", "--dtype", "bfloat16", "--model", self._model_uri()]
        )
        env = [
            k8s.core.v1.EnvVarArgs(name="SERVING_DRAIN_TIMEOUT_S", value=str(DRAIN_TIMEOUT_S)),
            k8s.core.v1.EnvVarArgs(name="SERVING_MODEL_CACHE_DIR", value=f"{CACHE_DIR}/models"),
            k8s.core.v1.EnvVarArgs(name="HOME", value="/tmp"),
        ]
        if vllm:
            env.append(k8s.core.v1.EnvVarArgs(name="SERVING_SERVED_MODEL_NAME", value=self._served_model_name()))
        else:
            env.append(k8s.core.v1.EnvVarArgs(name="HF_HOME", value=f"{CACHE_DIR}/hf"))
            quantization = self._args.config.serving.quantization
            if quantization != "none":  # the built-in engine's --quantization (serving/quantize.py)
                env.append(k8s.core.v1.EnvVarArgs(name="SERVING_QUANTIZATION", value=quantization))
        resources = (
            k8s.core.v1.ResourceRequirementsArgs(
                requests={"cpu": "500m", "memory": "512Mi"}, limits={"cpu": "1", "memory": "1Gi"}
            )
            if vllm
            else self._engine_resources()
        )
        return k8s.core.v1.ContainerArgs(
            name="server",
            image=self._args.image,
            args=[*model_args, "--port", str(SERVING_PORT), "--api-keys-file", API_KEYS_FILE],
            ports=[k8s.core.v1.ContainerPortArgs(name="http", container_port=SERVING_PORT, protocol="TCP")],
            env=env,
            resources=resources,
            readiness_probe=_http_probe("/readyz", "http", period=5, failures=3),
            liveness_probe=_http_probe("/healthz", "http", period=10, failures=3),
            # Liveness only starts once this succeeds, so a slow model load is not mistaken for a hung server.
            startup_probe=_http_probe("/readyz", "http", period=STARTUP_PERIOD_S, failures=STARTUP_FAILURE_THRESHOLD),
            lifecycle=k8s.core.v1.LifecycleArgs(
                pre_stop=k8s.core.v1.LifecycleHandlerArgs(sleep=k8s.core.v1.SleepActionArgs(seconds=PRE_STOP_SLEEP_S))
            ),
            security_context=_restricted_container(),
            volume_mounts=[
                k8s.core.v1.VolumeMountArgs(name="api-keys", mount_path=API_KEYS_DIR, read_only=True),
                k8s.core.v1.VolumeMountArgs(name="cache", mount_path=CACHE_DIR),
                k8s.core.v1.VolumeMountArgs(name="tmp", mount_path="/tmp"),
            ],
        )

    def _vllm_container(self) -> k8s.core.v1.ContainerArgs:
        """vLLM behind the gateway: clients reach it only through the gateway, which authenticates them. It binds all
        addresses because kubelet probes come from the node, not loopback; the namespace's network policies admit
        only port 8080 from other pods, so 8000 is reachable from the pod itself and its node alone."""
        cache = f"{CACHE_DIR}/vllm"
        return k8s.core.v1.ContainerArgs(
            name="vllm",
            image=VLLM_IMAGE,
            restart_policy="Always",
            # `vllm serve <model>`: the positional model (the `--model` flag is deprecated there). The command is set
            # rather than left to the image's entrypoint, so the arguments mean the same whatever it is.
            command=["vllm", "serve"],
            args=[
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
            env=[
                # The S3 streamer's client needs the region: IMDS (hop limit 1) is out of a pod's reach.
                k8s.core.v1.EnvVarArgs(name="AWS_REGION", value=self._args.config.region),
                k8s.core.v1.EnvVarArgs(name="HOME", value="/tmp"),
                k8s.core.v1.EnvVarArgs(name="HF_HOME", value=f"{cache}/hf"),
                k8s.core.v1.EnvVarArgs(name="VLLM_CACHE_ROOT", value=cache),
                k8s.core.v1.EnvVarArgs(name="XDG_CACHE_HOME", value=cache),
                k8s.core.v1.EnvVarArgs(name="TRITON_CACHE_DIR", value=f"{cache}/triton"),
                k8s.core.v1.EnvVarArgs(name="VLLM_NO_USAGE_STATS", value="1"),
                k8s.core.v1.EnvVarArgs(name="DO_NOT_TRACK", value="1"),
            ],
            resources=self._engine_resources(),
            startup_probe=_http_probe(
                "/health", VLLM_PORT, period=STARTUP_PERIOD_S, failures=STARTUP_FAILURE_THRESHOLD
            ),
            liveness_probe=_http_probe("/health", VLLM_PORT, period=10, failures=3),
            security_context=_restricted_container(run_as_user=VLLM_UID),
            volume_mounts=[
                k8s.core.v1.VolumeMountArgs(name="cache", mount_path=CACHE_DIR),
                k8s.core.v1.VolumeMountArgs(name="tmp", mount_path="/tmp"),
                k8s.core.v1.VolumeMountArgs(name="dshm", mount_path="/dev/shm"),
            ],
        )

    def vllm_sizing(self) -> VllmSizing:
        """Sized for the pool's smallest GPU (infra/vllm_sizing.py; config loading has checked that it fits)."""
        serving = self._args.config.serving
        smallest = min(self._pool.instance_types, key=gpu_memory_gib)
        return sizing_for(serving.model_prefix, serving.model_shape, smallest, serving.gpus_per_replica)

    def _vllm_quantization_args(self) -> list[str]:
        """servingQuantization as vLLM's --quantization (AWQ/GPTQ need a checkpoint quantized that way; fp8
        quantizes a bf16 checkpoint on load: https://docs.vllm.ai/en/latest/features/quantization/)."""
        quantization = self._args.config.serving.quantization
        return [] if quantization == "none" else ["--quantization", quantization]

    def _served_model_name(self) -> str:
        return self._args.config.serving.model_prefix.rstrip("/").rsplit("/", 1)[-1]

    def _engine_resources(self) -> k8s.core.v1.ResourceRequirementsArgs:
        """The engine's share of a node, in proportion to the GPUs it asks for, sized for the smallest instance type
        of the pool so the pod fits on any of them. Requests leave room for the kubelet and the DaemonSets."""
        share = self._args.config.serving.gpus_per_replica / self._pool.gpus_per_node
        smallest = min((GPU_INSTANCE_TYPES[t] for t in self._pool.instance_types), key=lambda t: t.vcpus)
        cpu = max(1, int(smallest.vcpus * share * 0.5))
        memory_gib = max(2, int(smallest.memory_gib * share * 0.5))
        gpus = str(self._args.config.serving.gpus_per_replica)
        return k8s.core.v1.ResourceRequirementsArgs(
            requests={"cpu": str(cpu), "memory": f"{memory_gib}Gi", "nvidia.com/gpu": gpus},
            limits={
                "cpu": str(max(cpu, int(smallest.vcpus * share * 0.75))),
                "memory": f"{max(memory_gib, int(smallest.memory_gib * share * 0.75))}Gi",
                "nvidia.com/gpu": gpus,
            },
        )

    def _cache_gib(self) -> int:
        """Model files land on the node's root volume: allow most of it, leaving room for images."""
        return max(10, self._pool.disk_gb // 2)

    # -- around the pod --------------------------------------------------------------------------------------------
    def _create_disruption_budget(self) -> None:
        # maxUnavailable 1, not minAvailable 1: with a single replica minAvailable 1 would block every node drain,
        # so managed node group upgrades and scale-in would fail after their eviction timeout. With more replicas it
        # still keeps all but one serving during voluntary disruptions.
        k8s.policy.v1.PodDisruptionBudget(
            f"{self._name}-pdb",
            metadata=self._metadata(),
            spec=k8s.policy.v1.PodDisruptionBudgetSpecArgs(
                max_unavailable=1,
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=self._labels),
            ),
            opts=self._k8s_opts,
        )

    def _create_autoscaler(self) -> None:
        serving = self._args.config.serving
        k8s.autoscaling.v2.HorizontalPodAutoscaler(
            f"{self._name}-hpa",
            metadata=self._metadata(),
            spec=k8s.autoscaling.v2.HorizontalPodAutoscalerSpecArgs(
                scale_target_ref=k8s.autoscaling.v2.CrossVersionObjectReferenceArgs(
                    api_version="apps/v1", kind="Deployment", name=self.deployment.metadata.name
                ),
                min_replicas=serving.replicas,
                max_replicas=serving.max_replicas,
                # CPU for now (metrics-server add-on); the serving queue depth is the better signal and replaces it.
                metrics=[
                    k8s.autoscaling.v2.MetricSpecArgs(
                        type="Resource",
                        resource=k8s.autoscaling.v2.ResourceMetricSourceArgs(
                            name="cpu",
                            target=k8s.autoscaling.v2.MetricTargetArgs(
                                type="Utilization", average_utilization=HPA_CPU_TARGET
                            ),
                        ),
                    )
                ],
                # A new replica may need a new GPU node and a model load (minutes): scale down slowly.
                behavior=k8s.autoscaling.v2.HorizontalPodAutoscalerBehaviorArgs(
                    scale_down=k8s.autoscaling.v2.HPAScalingRulesArgs(stabilization_window_seconds=600)
                ),
            ),
            opts=self._k8s_opts,
        )

    def _create_ingress(self) -> k8s.networking.v1.Ingress:
        """Internal ALB through the AWS Load Balancer Controller (installed separately). The stack tags go on the ALB
        and its target groups, so the teardown sweep finds them even though no Pulumi resource owns them."""
        cfg = self._args.config
        tags = ",".join(f"{k}={v}" for k, v in stack_tags(cfg.stack, cfg.environment).items())
        return k8s.networking.v1.Ingress(
            f"{self._name}-ingress",
            metadata=self._metadata(
                annotations={
                    "alb.ingress.kubernetes.io/scheme": "internal",
                    "alb.ingress.kubernetes.io/target-type": "ip",
                    "alb.ingress.kubernetes.io/healthcheck-path": "/readyz",
                    "alb.ingress.kubernetes.io/load-balancer-name": f"{cfg.name_prefix}-serving",
                    "alb.ingress.kubernetes.io/tags": tags,
                    # Generation can take minutes; the ALB's default 60 s idle timeout would cut long completions.
                    "alb.ingress.kubernetes.io/load-balancer-attributes": "idle_timeout.timeout_seconds=600",
                }
            ),
            spec=k8s.networking.v1.IngressSpecArgs(
                ingress_class_name="alb",
                rules=[
                    k8s.networking.v1.IngressRuleArgs(
                        http=k8s.networking.v1.HTTPIngressRuleValueArgs(
                            paths=[
                                k8s.networking.v1.HTTPIngressPathArgs(
                                    path="/",
                                    path_type="Prefix",
                                    backend=k8s.networking.v1.IngressBackendArgs(
                                        service=k8s.networking.v1.IngressServiceBackendArgs(
                                            name=self.service.metadata.name,
                                            port=k8s.networking.v1.ServiceBackendPortArgs(name="http"),
                                        )
                                    ),
                                )
                            ]
                        )
                    )
                ],
            ),
            opts=self._k8s_opts,
        )


def _http_probe(path: str, port: int | str, period: int, failures: int) -> k8s.core.v1.ProbeArgs:
    return k8s.core.v1.ProbeArgs(
        http_get=k8s.core.v1.HTTPGetActionArgs(path=path, port=port),
        period_seconds=period,
        failure_threshold=failures,
        timeout_seconds=5,
    )


def _restricted_container(run_as_user: int | None = None) -> k8s.core.v1.SecurityContextArgs:
    """What the "restricted" Pod Security Standard demands, plus a read-only root filesystem."""
    return k8s.core.v1.SecurityContextArgs(
        run_as_user=run_as_user,
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        run_as_non_root=True,
        capabilities=k8s.core.v1.CapabilitiesArgs(drop=["ALL"]),
        seccomp_profile=k8s.core.v1.SeccompProfileArgs(type="RuntimeDefault"),
    )
