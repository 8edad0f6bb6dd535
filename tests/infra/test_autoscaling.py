"""GPU capacity from zero and back under the mock engine: Cluster Autoscaler (ASG node-template tags, its pinned
chart and the values our contracts depend on, least-privilege Pod Identity role), spot interruption handling
(aws-node-termination-handler's chart in queue mode), and KEDA (its chart) with the ScaledObject for serving, per
stack. Our own Kubernetes objects are validated strictly; the ScaledObject against the KEDA CRD schema in infra/crds."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import kubernetes_validate
import pulumi_aws as aws
import pulumi_kubernetes as k8s
import pytest

from facts import pulumi_types as tok
from facts.instance_types import GPU_INSTANCE_TYPES
from facts.tags import stack_tags
from infra.charts import CHART_TYPE, CHARTS
from infra.cluster_autoscaler import SERVICE_ACCOUNT as CLUSTER_AUTOSCALER_SA
from infra.cluster_autoscaler import (
    ClusterAutoscaler,
    ClusterAutoscalerArgs,
    ClusterAutoscalerIdentity,
    ClusterAutoscalerIdentityArgs,
    max_nodes_total,
    node_template_tags,
)
from infra.config import ConfigError, StackConfig
from infra.config import load_stack as config
from infra.serving_autoscaling import SCALED_OBJECT_CRD, ServingAutoscaling, ServingAutoscalingArgs, scaled_object
from infra.spot_interruptions import (
    SPOT_EVENT_PATTERNS,
    NodeTerminationHandler,
    NodeTerminationHandlerArgs,
    SpotInterruptionQueue,
    SpotInterruptionQueueArgs,
    needs_node_termination_handler,
)
from ops.mocks import Recorded, RecordingMocks, Run
from tests.helpers import REPO_ROOT, run_component

STACKS = ("dev", "staging", "prod")
ACCOUNT = "123456789012"
PROMETHEUS = "http://prometheus.monitoring.svc:9090"
ASG_TAG = tok.AUTOSCALING_TAG
ROLE = tok.IAM_ROLE
ROLE_POLICY = tok.IAM_ROLE_POLICY
POD_IDENTITY = tok.EKS_POD_IDENTITY_ASSOCIATION
SCALED_OBJECT = tok.KEDA_SCALED_OBJECT


def fake_cluster(cfg: StackConfig) -> tuple[k8s.Provider, dict[str, aws.eks.NodeGroup]]:
    provider = k8s.Provider("k8s", kubeconfig="{}")
    groups = {
        pool: aws.eks.NodeGroup(
            f"ng-{pool}",
            cluster_name=cfg.name_prefix,
            node_group_name=f"{cfg.name_prefix}-{pool}",
            node_role_arn="arn:aws:iam::123456789012:role/node",
            subnet_ids=["subnet-a", "subnet-b"],
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(min_size=0, max_size=2, desired_size=0),
        )
        for pool in ("system", *(p.name for p in cfg.cluster.gpu_pools), cfg.cluster.batch_pool.name)
    }
    return provider, groups


def run_capacity(cfg: StackConfig) -> Run:
    def program() -> dict[str, Any]:
        provider, groups = fake_cluster(cfg)
        tags = stack_tags(cfg.stack, cfg.environment)
        # Both halves, as the two layers declare them (infra/layers.py): the AWS half, then the chart.
        ca = ClusterAutoscalerIdentity(
            "autoscaler",
            ClusterAutoscalerIdentityArgs(
                cluster=cfg.cluster,
                name_prefix=cfg.name_prefix,
                cluster_name=cfg.name_prefix,
                node_groups=groups,
                tags=tags,
                account_id=ACCOUNT,
            ),
        )
        ClusterAutoscaler(
            "autoscaler",
            ClusterAutoscalerArgs(
                cluster=cfg.cluster,
                autoscaling=cfg.autoscaling,
                region=cfg.region,
                cluster_name=cfg.name_prefix,
                provider=provider,
            ),
        )
        outputs: dict[str, Any] = {"ca_role": ca.role_arn}
        if needs_node_termination_handler(cfg.autoscaling, cfg.cluster):
            queue = SpotInterruptionQueue(
                "spot",
                SpotInterruptionQueueArgs(
                    name_prefix=cfg.name_prefix, cluster_name=cfg.name_prefix, tags=tags, account_id=ACCOUNT
                ),
            )
            NodeTerminationHandler(
                "spot",
                NodeTerminationHandlerArgs(
                    autoscaling=cfg.autoscaling,
                    region=cfg.region,
                    cluster_name=cfg.name_prefix,
                    queue_url=queue.queue_url,
                    provider=provider,
                ),
            )
            outputs["queue"] = queue.queue_url
        if cfg.autoscaling.serving_autoscaler == "keda":
            so = ServingAutoscaling(
                "serving-autoscaling",
                ServingAutoscalingArgs(
                    cfg.autoscaling, cfg.serving, provider, "llm-serving", "llm-serving", PROMETHEUS
                ),
            )
            outputs["scaled_object"] = so.scaled_object_name
        return outputs

    return run_component(cfg, program, RecordingMocks(cfg.region))


_runs: dict[str, tuple[StackConfig, Run]] = {}


@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest) -> tuple[StackConfig, Run]:
    if request.param not in _runs:
        cfg = config(request.param)
        _runs[request.param] = (cfg, run_capacity(cfg))
    return _runs[request.param]


@pytest.fixture(scope="module")
def keda_dev() -> tuple[StackConfig, Run]:
    cfg = config("dev", servingAutoscaler="keda", servingScaleToZero=True)
    return cfg, run_capacity(cfg)


def crd_schema() -> dict[str, Any]:
    return json.loads((REPO_ROOT / SCALED_OBJECT_CRD).read_text())


def k8s_objects(run: Run) -> list[Recorded]:
    return [r for r in run.resources if r.type.startswith("kubernetes:") and not r.type.startswith("pulumi:")]


def chart(run: Run, parent: str) -> Recorded:
    (rec,) = [r for r in run.of_type(CHART_TYPE) if r.parent == parent]
    return rec


def assert_pinned(rec: Recorded, key: str, namespace: str) -> None:
    pinned = CHARTS[key]
    assert rec.inputs["chart"] == pinned.chart and rec.inputs["version"] == pinned.version
    assert rec.inputs.get("repositoryOpts", {}).get("repo") == pinned.repository
    assert rec.inputs["namespace"] == namespace and rec.inputs["name"] == key
    assert rec.provider and "k8s" in rec.provider, "charts must go through the cluster's explicit provider"


# -- Cluster Autoscaler ------------------------------------------------------------------------------------------


def test_gpu_groups_describe_their_nodes_to_scale_from_zero(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    tags = run.of_type(ASG_TAG)
    for pool in cfg.cluster.gpu_pools:
        asg = f"eks-{cfg.name_prefix}-{pool.name}-asg"
        on_group = {t.inputs["tag"]["key"]: t.inputs["tag"] for t in tags if t.inputs["autoscalingGroupName"] == asg}
        assert set(on_group) == set(node_template_tags(pool))
        prefix = "k8s.io/cluster-autoscaler/node-template"
        assert on_group[f"{prefix}/label/llm-platform/pool"]["value"] == pool.name
        assert on_group[f"{prefix}/label/llm-platform/purpose"]["value"] == pool.purpose
        assert on_group[f"{prefix}/taint/nvidia.com/gpu"]["value"] == "true:NoSchedule"
        assert on_group[f"{prefix}/resources/nvidia.com/gpu"]["value"] == str(pool.gpus_per_node)
        assert (f"{prefix}/resources/vpc.amazonaws.com/efa" in on_group) is pool.efa
        # CA's AWS README: GPU nodes must carry k8s.amazonaws.com/accelerator, or CA scales out again while the
        # device plugin registers; the node group sets it as a node label and the template says so.
        accelerator = GPU_INSTANCE_TYPES[pool.instance_types[0]].accelerator
        assert on_group[f"{prefix}/label/k8s.amazonaws.com/accelerator"]["value"] == accelerator
        assert pool.labels["k8s.amazonaws.com/accelerator"] == accelerator
        # Template tags describe the group; they must not land on instances.
        assert all(t["propagateAtLaunch"] is False for t in on_group.values())
    # The system group is fixed-size; EKS already sets the auto-discovery tags, which we must not own (a destroy
    # would delete them from under EKS).
    assert not [t for t in tags if "system" in t.inputs["autoscalingGroupName"]]
    assert not [t for t in tags if t.inputs["tag"]["key"].startswith("k8s.io/cluster-autoscaler/enabled")]


def test_controller_chart_runs_pinned_on_the_system_pool_and_caps_the_cluster(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    rec = chart(run, "autoscaler")
    assert_pinned(rec, "cluster-autoscaler", "kube-system")
    values = rec.inputs["values"]
    version = cfg.autoscaling.cluster_autoscaler_version
    assert values["image"] == {"tag": f"v{version}"}
    assert version.rsplit(".", 1)[0] == cfg.cluster.kubernetes_version
    assert values["nodeSelector"] == {"llm-platform/pool": "system"}
    # The service account Pod Identity binds, and the name the chart's lease/endpoints RBAC (resourceNames) expects.
    assert values["rbac"]["serviceAccount"] == {"create": True, "name": CLUSTER_AUTOSCALER_SA}
    assert values["fullnameOverride"] == "cluster-autoscaler"
    # The chart renders --node-group-auto-discovery=asg:tag=<tags> from these, and AWS_REGION from awsRegion.
    assert values["cloudProvider"] == "aws" and values["awsRegion"] == cfg.region
    assert values["autoDiscovery"] == {
        "clusterName": cfg.name_prefix,
        "tags": ["k8s.io/cluster-autoscaler/enabled", f"k8s.io/cluster-autoscaler/{cfg.name_prefix}"],
    }
    args = values["extraArgs"]
    assert args["expander"] == "least-waste" and args["balance-similar-node-groups"] is True
    assert args["skip-nodes-with-system-pods"] is False
    assert args["scale-down-unneeded-time"] == f"{cfg.autoscaling.scale_down_unneeded_minutes}m"
    gpu_nodes = sum(p.max_size for p in cfg.cluster.gpu_pools)
    total = cfg.cluster.system_node_count + gpu_nodes + cfg.cluster.batch_pool.max_size
    assert args["max-nodes-total"] == total and max_nodes_total(cfg.cluster) == total
    # The GPU budget: each group's maximum bounds it, and together they stay within maxGpus.
    assert sum(p.max_size * p.gpus_per_node for p in cfg.cluster.gpu_pools) <= cfg.cluster.max_gpus
    # No hand-written copy of the controller or its RBAC is left beside the chart.
    assert not [r for r in run.resources if r.type.startswith("kubernetes:") and r.type != CHART_TYPE]


def test_autoscaler_role_is_least_privilege_through_pod_identity(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    role = run.one(ROLE, "autoscaler-role").inputs
    trust = json.loads(role["assumeRolePolicy"])["Statement"]
    assert trust == [
        {
            "Effect": "Allow",
            "Principal": {"Service": "pods.eks.amazonaws.com"},
            "Action": ["sts:AssumeRole", "sts:TagSession"],
            "Condition": {"StringEquals": {"aws:SourceAccount": ACCOUNT}},
        }
    ]
    policy = json.loads(run.one(ROLE_POLICY, "autoscaler-policy").inputs["policy"])
    for statement in policy["Statement"]:
        assert "*" not in statement["Action"] and not any(a.endswith(":*") for a in statement["Action"])
        mutating = [a for a in statement["Action"] if not a.split(":")[1].startswith(("Describe", "Get"))]
        if mutating:
            assert statement["Condition"] == {
                "StringEquals": {f"aws:ResourceTag/k8s.io/cluster-autoscaler/{cfg.name_prefix}": "owned"}
            }
    assert any("autoscaling:SetDesiredCapacity" in s["Action"] for s in policy["Statement"])
    assoc = run.one(POD_IDENTITY, "autoscaler-pod-identity").inputs
    assert (assoc["namespace"], assoc["serviceAccount"]) == ("kube-system", CLUSTER_AUTOSCALER_SA)
    assert assoc["clusterName"] == cfg.name_prefix
    # The controller starts only once its role is associated and its policy attached: both are the AWS layer's,
    # applied before the cluster layer installs the chart (infra/layers.py; tests/infra/test_engine_rules.py checks
    # the split on the whole program).


def test_tags_and_unique_names(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    tags = stack_tags(cfg.stack, cfg.environment)
    taggable = (ROLE, POD_IDENTITY, tok.SQS_QUEUE, tok.CLOUDWATCH_EVENT_RULE)
    for rec in run.resources:
        if rec.type in taggable:
            assert rec.inputs.get("tags") == tags, rec.name
    assert run.duplicate_names() == []


def test_efa_template_count_is_the_launch_template_count() -> None:
    """A p5 node has 32 EFA interfaces: a pod asking for 32 must see 32 in the template, or CA never scales up."""
    prod = config("prod").cluster.pool("training")
    assert prod.instance_types == ("p5.48xlarge",) and prod.efa
    tags = node_template_tags(prod)
    assert tags["k8s.io/cluster-autoscaler/node-template/resources/vpc.amazonaws.com/efa"] == "32"
    assert tags["k8s.io/cluster-autoscaler/node-template/label/k8s.amazonaws.com/accelerator"] == "nvidia-h100"
    assert prod.describe()["efa_interfaces_per_node"] == 32
    staging = config("staging").cluster.pool("training")
    efa_tag = "k8s.io/cluster-autoscaler/node-template/resources/vpc.amazonaws.com/efa"
    assert node_template_tags(staging)[efa_tag] == "1"
    assert config("dev").cluster.pool("inference").labels["k8s.amazonaws.com/accelerator"] == "nvidia-l4"


# -- spot interruptions ----------------------------------------------------------------------------------------------


def test_spot_pools_get_queue_mode_termination_handler(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    spot = any(p.capacity_type == "SPOT" for p in cfg.cluster.gpu_pools)
    assert needs_node_termination_handler(cfg.autoscaling, cfg.cluster) is spot
    rules = run.of_type(tok.CLOUDWATCH_EVENT_RULE)
    if not spot:
        assert not rules and not run.of_type(tok.SQS_QUEUE)
        return
    assert {json.dumps(json.loads(r.inputs["eventPattern"]), sort_keys=True) for r in rules} == {
        json.dumps(p, sort_keys=True) for p in SPOT_EVENT_PATTERNS.values()
    }
    queue = run.one(tok.SQS_QUEUE).inputs
    assert queue["messageRetentionSeconds"] == 300 and queue["sqsManagedSseEnabled"] is True
    targets = run.of_type(tok.CLOUDWATCH_EVENT_TARGET)
    assert len(targets) == len(rules) and all(t.inputs["arn"].endswith(":llmp-dev-node-termination") for t in targets)
    queue_policy = json.loads(run.one(tok.SQS_QUEUE_POLICY).inputs["policy"])
    (statement,) = queue_policy["Statement"]
    assert statement["Action"] == "sqs:SendMessage"
    assert len(statement["Condition"]["ArnEquals"]["aws:SourceArn"]) == len(rules)
    nth_policy = json.loads(run.one(ROLE_POLICY, "spot-policy").inputs["policy"])
    assert nth_policy["Statement"][0]["Resource"].endswith(":llmp-dev-node-termination")
    rec = chart(run, "spot")
    assert_pinned(rec, "aws-node-termination-handler", "kube-system")
    values = rec.inputs["values"]
    # Queue mode: the chart's Deployment (which sets NODE_NAME from spec.nodeName), reading our queue.
    assert values["enableSqsTerminationDraining"] is True
    assert values["queueURL"].endswith("/llmp-dev-node-termination") and values["awsRegion"] == cfg.region
    assert values["checkTagBeforeDraining"] is True
    assert values["managedTag"] == f"k8s.io/cluster-autoscaler/{cfg.name_prefix}"
    assert values["podTerminationGracePeriod"] == -1
    assert values["serviceAccount"] == {"create": True, "name": "aws-node-termination-handler"}
    assert values["nodeSelector"] == {"llm-platform/pool": "system"}
    assert values["image"] == {"tag": f"v{cfg.autoscaling.node_termination_handler_version}"}
    assoc = run.one(POD_IDENTITY, "spot-pod-identity").inputs
    assert (assoc["namespace"], assoc["serviceAccount"]) == ("kube-system", "aws-node-termination-handler")


def test_spot_handler_can_be_switched_off() -> None:
    no_handler = config("dev", spotInterruptionHandler=False)
    assert not needs_node_termination_handler(no_handler.autoscaling, no_handler.cluster)


# -- serving autoscaling (KEDA) ----------------------------------------------------------------------------------------


def test_keda_is_installed_from_its_chart_before_the_scaled_object(keda_dev: tuple[StackConfig, Run]) -> None:
    _, run = keda_dev
    rec = chart(run, "serving-autoscaling")
    assert_pinned(rec, "keda", "keda")
    assert rec.inputs["values"]["nodeSelector"] == {"llm-platform/pool": "system"}
    assert rec.inputs["values"]["crds"] == {"install": True}
    (ns,) = run.of_type(tok.K8S_NAMESPACE)
    assert ns.inputs["metadata"]["name"] == "keda"
    assert f"kubernetes:core/v1:Namespace::{ns.name}" in rec.depends_on
    # The CRD (and its admission webhook) come with the chart: the ScaledObject must wait for it.
    assert f"{CHART_TYPE}::{rec.name}" in run.one(SCALED_OBJECT).depends_on
    # The CRD schema we validate against is of the release the chart installs.
    assert (
        crd_schema()["x-source"]["keda_release"].lstrip("v").split(".")[:2] == CHARTS["keda"].app_version.split(".")[:2]
    )


def test_scaled_object_matches_the_keda_crd_schema(keda_dev: tuple[StackConfig, Run]) -> None:
    cfg, run = keda_dev
    schema = crd_schema()
    assert schema["x-source"]["keda_release"].startswith("v2.")
    rec = run.one(SCALED_OBJECT)
    jsonschema.validate(rec.inputs, schema["openAPIV3Schema"])
    spec = rec.inputs["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-serving"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, cfg.serving.max_replicas)
    load, window = spec["triggers"]
    assert load["type"] == "prometheus" and load["metricType"] == "AverageValue"
    assert load["metadata"]["serverAddress"] == PROMETHEUS
    assert "llm_serving_inflight_requests" in load["metadata"]["query"]
    assert load["metadata"]["threshold"] == str(cfg.autoscaling.serving_target_inflight_per_replica)
    assert window["type"] == "cron" and window["metadata"]["desiredReplicas"] == str(cfg.serving.replicas)
    for rec in k8s_objects(run):
        if rec.type not in (SCALED_OBJECT, CHART_TYPE):
            kubernetes_validate.validate(rec.inputs, cfg.cluster.kubernetes_version, strict=True)


def test_scaled_object_schema_rejects_mistakes() -> None:
    schema = crd_schema()["openAPIV3Schema"]
    keda = config("dev", servingAutoscaler="keda")
    good = scaled_object(keda.autoscaling, keda.serving, "llm-serving", "llm-serving", PROMETHEUS)
    jsonschema.validate(good, schema)
    assert good["spec"]["minReplicaCount"] == 1 and len(good["spec"]["triggers"]) == 1
    typo = json.loads(json.dumps(good))
    typo["spec"]["minReplicas"] = typo["spec"].pop("minReplicaCount")
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        jsonschema.validate(typo, schema)
    wrong_type = json.loads(json.dumps(good))
    wrong_type["spec"]["triggers"][0]["metadata"]["threshold"] = 8
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong_type, schema)
    no_target = json.loads(json.dumps(good))
    del no_target["spec"]["scaleTargetRef"]
    with pytest.raises(jsonschema.ValidationError, match="scaleTargetRef"):
        jsonschema.validate(no_target, schema)


def test_the_scaling_signal_is_a_metric_the_serving_container_emits() -> None:
    source = (REPO_ROOT / "serving" / "metrics.py").read_text()
    assert '"llm_serving_inflight_requests"' in source


def test_shipped_stacks_use_cpu_hpa_without_keda(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    assert cfg.autoscaling.serving_autoscaler == "cpu"
    assert not run.of_type(SCALED_OBJECT)
    assert not [r for r in run.of_type(CHART_TYPE) if r.inputs["chart"] == "keda"]


# -- config rules ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"servingAutoscaler": "keda", "metrics": "amp"}, "keda reads the in-cluster Prometheus"),
        ({"servingScaleToZero": True}, "scale to zero needs llm-platform:servingAutoscaler = keda"),
        ({"clusterAutoscalerVersion": "1.32.1"}, "its minor version must equal llm-platform:kubernetesVersion"),
        ({"clusterAutoscalerVersion": "latest"}, "must be a release version"),
        ({"servingAutoscaler": "hpa"}, "must be one of cpu, keda"),
        ({"scaleDownUnneededMinutes": 0}, "must be between 1 and 120"),
        ({"servingActiveHoursStart": "8am"}, "5-field cron"),
        ({"metrics": "cloudwatch"}, "must be one of amp, in-cluster, none"),
    ],
)
def test_config_rules(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config("dev", **overrides)
    assert message in str(err.value)
    key = next(iter(overrides))
    assert f"llm-platform:{key}" in str(err.value) or "llm-platform:servingAutoscaler" in str(err.value)


@pytest.mark.parametrize(
    ("instance_type", "efa"), [("p5.48xlarge", "32"), ("p4d.24xlarge", "4"), ("g6e.12xlarge", "1")]
)
def test_scale_from_zero_template_offers_every_efa_interface_the_node_gets(instance_type: str, efa: str) -> None:
    """The training Job requests all of a node's EFA devices (one per network card, infra/cluster.py): a template
    offering fewer would keep the autoscaler from ever adding a node for it."""
    from tests.infra.scheduling import EFA_RESOURCE, allocatable

    cfg = config("prod", trainingInstanceTypes=[instance_type], trainingEfa=True)
    tags = node_template_tags(cfg.cluster.pool("training"))
    assert tags[f"k8s.io/cluster-autoscaler/node-template/resources/{EFA_RESOURCE}"] == efa
    assert allocatable(instance_type, efa=True)[EFA_RESOURCE] == float(efa)


def test_instances_carry_the_tag_the_termination_handler_checks(run_stack) -> None:
    """checkTagBeforeDraining: the handler drains only instances with its managedTag (read from the EC2 instance,
    NTH v1.25.6 pkg/monitor/sqsevent CheckIfManaged); every node group's launch template puts it on its instances."""
    run = run_stack("dev")
    [nth] = [c for c in run.of_type(CHART_TYPE) if c.inputs["chart"] == CHARTS["aws-node-termination-handler"].chart]
    managed = nth.inputs["values"]["managedTag"]
    assert nth.inputs["values"]["checkTagBeforeDraining"] is True
    templates = run.of_type(tok.EC2_LAUNCH_TEMPLATE)
    assert templates
    for lt in templates:
        kinds = {spec["resourceType"]: spec["tags"] for spec in lt.inputs["tagSpecifications"]}
        assert kinds["instance"].get(managed) == "owned", lt.name
        assert managed not in kinds["volume"]
