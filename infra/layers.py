"""Two stacks per environment, one per network reach: the AWS layer and the cluster layer.

    stack `<env>`          the AWS layer: every AWS resource (VPC, storage, registry, IAM, the EKS cluster and its node
                           groups, controller roles and Pod Identity associations, the spot-interruption queue and its
                           EventBridge rules, the ASG node-template tags, the alert topic, its key and the alarms,
                           the AMP workspace and scraper, SageMaker, budgets, the in-VPC deployer runner). Applied from
                           a GitHub-hosted runner: it talks to AWS APIs only.
    stack `<env>-cluster`  the cluster layer: every Kubernetes object and Helm chart, through a Kubernetes provider
                           built from the AWS layer's outputs (a `pulumi.StackReference`). Applied only from the in-VPC
                           runner, the one place that reaches the private API endpoint.

Both stacks read the same file, `stacks/Pulumi.<env>.yaml` (`pulumi up --stack <env>-cluster --config-file
stacks/Pulumi.<env>.yaml`): an operator edits one file per environment. The program picks its layer from the stack
name (`layer_of`), and `infra.config.from_pulumi` validates the environment's config under the environment's name.

Why two stacks and not `--exclude`/`--target` within one (the real engine's rules; tests/ops/test_workflows.py states
them with their sources):
- A provider is always part of an update, targeted or not (pulumi/pulumi pkg/resource/deploy/step_generator.go,
  `isImplicitlyTargetedResource`: "we also implicitly target providers (both default and explicit)").
- A remote component (`kubernetes:helm.sh/v4:Chart`, `remote=True` in pulumi_kubernetes 4.34.2 helm/v4/Chart.py) does
  not go through the step generator: the engine calls the provider's Construct for it whatever --target/--exclude say
  (pulumi/pulumi pkg/resource/deploy/source_eval.go, "Remote components don't go through the step generator"), and
  Construct fails with "configured Kubernetes cluster is unreachable" (pulumi/pulumi-kubernetes
  provider/pkg/provider/provider_construct.go).
- `depends_on=[component]` means all of its children (pulumi 3.272.0 sdk/python/lib/pulumi/runtime/rpc.py
  `_add_dependency`: "Local component resources act as aggregations of their descendents").
A stack is the unit Pulumi's own docs split by lifecycle and access ("Organizing Projects & Stacks": separate stacks
for infrastructure with different lifecycles and owners, connected with stack references; "Stack References").
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi

from infra import outputs as out

CLUSTER_SUFFIX = "-cluster"
"""`<env>-cluster` is the cluster layer of environment `<env>`."""


class Layer(enum.Enum):
    AWS = "aws"
    CLUSTER = "cluster"


def layer_of(stack: str) -> Layer:
    """The layer a stack name selects: `<env>-cluster` the cluster layer, anything else the AWS layer."""
    return Layer.CLUSTER if stack.endswith(CLUSTER_SUFFIX) and stack != CLUSTER_SUFFIX else Layer.AWS


def environment_of(stack: str) -> str:
    """The environment (and its stack file `stacks/Pulumi.<env>.yaml`) a stack of either layer belongs to."""
    return stack.removesuffix(CLUSTER_SUFFIX) if layer_of(stack) is Layer.CLUSTER else stack


def cluster_stack(environment: str) -> str:
    """The cluster-layer stack of an environment."""
    return f"{environment}{CLUSTER_SUFFIX}"


def aws_stack_reference_name(organization: str, project: str, environment: str) -> str:
    """The fully qualified name the cluster layer reads the AWS layer by (`<org>/<project>/<stack>`; on a DIY backend
    the organization is `organization`, Pulumi docs "Stack References")."""
    return f"{organization}/{project}/{environment}"


HANDOFF_KEYS: tuple[str, ...] = (
    out.CLUSTER_NAME,
    out.CLUSTER_ENDPOINT,
    out.KUBECONFIG,
    out.VPC_ID,
    out.MODELS_BUCKET,
    out.SERVING_REPOSITORY_URL,
)
"""AWS-layer outputs the cluster layer always reads (besides the optional ones in `ClusterRef`)."""


@dataclass(frozen=True, kw_only=True)
class ClusterRef:
    """What the cluster layer knows of the cluster: handles built from the AWS layer's outputs (pulumi-eks's CoreData
    idea), never resources of its own stack besides the provider."""

    name: pulumi.Output[str]
    endpoint: pulumi.Output[str]
    vpc_id: pulumi.Output[str]
    models_bucket: pulumi.Output[str]
    serving_repository_url: pulumi.Output[str]
    provider: Any
    """The cluster's `kubernetes.Provider` (the only provider every Kubernetes object of the stack uses)."""
    spot_queue_url: pulumi.Output[str] | None = None
    amp_query_url: pulumi.Output[str] | None = None


KUBERNETES_PROVIDER_NAME = "cluster-k8s"
"""The cluster layer's Kubernetes provider (a top-level resource of the `<env>-cluster` stack)."""


def cluster_ref(reference: pulumi.StackReference, *, spot_queue: bool, amp: bool) -> ClusterRef:
    """The cluster layer's handles, from the AWS layer's outputs. `require_output` fails the preview with the key's
    name when the AWS layer has not exported it (not applied yet)."""
    import pulumi_kubernetes as k8s

    got: Mapping[str, Any] = {key: reference.require_output(key) for key in HANDOFF_KEYS}
    provider = k8s.Provider(KUBERNETES_PROVIDER_NAME, kubeconfig=got[out.KUBECONFIG])
    return ClusterRef(
        name=got[out.CLUSTER_NAME],
        endpoint=got[out.CLUSTER_ENDPOINT],
        vpc_id=got[out.VPC_ID],
        models_bucket=got[out.MODELS_BUCKET],
        serving_repository_url=got[out.SERVING_REPOSITORY_URL],
        provider=provider,
        spot_queue_url=reference.require_output(out.SPOT_INTERRUPTION_QUEUE_URL) if spot_queue else None,
        amp_query_url=reference.require_output(out.AMP_QUERY_URL) if amp else None,
    )
