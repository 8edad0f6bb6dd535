"""Preview-time checks against what already exists in the account, so `pulumi preview` fails in seconds with the fix
instead of `pulumi up` failing after 40 minutes.

Each check is a provider invoke (answered by AWS under the real engine, by `ops.mocks.Account` under the mock
engine), or, where pulumi-aws has no data source (a running SageMaker variant), a boto3 read behind one seam:

- first-run lifecycle: the serving image is in ECR (`aws.ecr.get_image`), the model is in the models bucket
  (`aws.s3.get_objects`), the API keys are in Secrets Manager (`aws.secretsmanager.get_secret_version`); a failure
  names the command that pushes / uploads / creates it;
- version drift: a running cluster newer than `kubernetesVersion` (EKS upgrades a cluster itself at the end of
  standard support; the next `up` would ask for a downgrade, which EKS refuses) (`aws.eks.get_cluster`);
- GPU capacity: the zone of the EFA training pool offers its instance types (`aws.ec2.get_instance_type_offerings`);
- SageMaker: what the running variant carries (model, instance type, counts, autoscaling registration).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from types import SimpleNamespace
from typing import Any

import pulumi_aws as aws

from infra.config import ConfigError, ServingConfig, StackConfig

MODEL_MARKER = "config.json"
"""A model directory (Hugging Face layout, what training/export.py writes) always has one."""


class PreflightError(ConfigError):
    """Something the stack needs does not exist (yet) or the account has drifted; each problem names the fix."""


# -- placeholders: the example values the stack files ship with ------------------------------------------------------
PLACEHOLDERS = ("123456789012", "example-org", "@example.com")
"""Values of the shipped stack files that stand for the user's own: AWS's documentation account id, the example GitHub
organisation, alert addresses at example.com (RFC 2606 reserves it, so mail to it goes nowhere)."""


def placeholders(values: Mapping[str, Any]) -> list[str]:
    """`key = value` for every config value that still holds a placeholder."""
    found = []
    for key, value in sorted(values.items()):
        text = value if isinstance(value, str) else json.dumps(value)
        if any(marker in text for marker in PLACEHOLDERS):
            found.append(f"{key} = {text}")
    return found


def check_placeholders(cfg: StackConfig) -> None:
    """A preview warns about placeholder values; a deployment (`pulumi up`) refuses them: admin access granted to
    AWS's example account, a deployer trusting example-org's repository and alerts mailed to nowhere are not a
    working stack. Under the mock engine (ops.preview, tests) this only warns."""
    import pulumi
    from pulumi.runtime import config as runtime_config

    found = placeholders({**runtime_config.get_config_env(), **runtime_config.CONFIG.get()})
    if not found:
        return
    if not pulumi.runtime.is_dry_run() and _mock_account() is None:
        raise PreflightError(
            f"stack '{cfg.stack}' (placeholders: replace them with your own values in stacks/Pulumi.{cfg.stack}.yaml)",
            found,
        )
    pulumi.log.warn(f"placeholder values (`pulumi up` will refuse them): {'; '.join(found)}")


# -- names the program and the tools share ---------------------------------------------------------------------------
def serving_repository_name(cfg: StackConfig) -> str:
    """ECR repository of the serving image (infra/registry.py names repositories `<prefix>/<image>`)."""
    return f"{cfg.name_prefix}/serving"


def models_bucket_name(cfg: StackConfig, account_id: str) -> str:
    """The models bucket (infra/storage.py: `<prefix>-<kind>-<account>-<region>`)."""
    return f"{cfg.name_prefix}-models-{account_id}-{cfg.region}"


def api_keys_secret_name(cfg: StackConfig) -> str:
    """Secrets Manager secret holding the serving keys file (docs/serving.md format); one per stack, by convention."""
    return f"{cfg.name_prefix}/serving-api-keys"


# -- first-run lifecycle ---------------------------------------------------------------------------------------------
def check_serving_artifacts(cfg: StackConfig, account_id: str) -> str | None:
    """Fail unless the image, the model and (for EKS) the API keys exist. Returns the keys file content (for the
    Kubernetes Secret), or None when EKS serving is not declared."""
    if not (cfg.serving.eks_declared or cfg.serving.sagemaker_declared):
        return None
    problems: list[str] = []
    stack, p = cfg.stack, cfg.project
    repo, tag = serving_repository_name(cfg), cfg.serving.image_tag
    try:
        aws.ecr.get_image(repository_name=repo, image_tag=tag)
    except Exception as exc:  # the engine reports a missing repository/tag as a failed invoke
        problems.append(
            f"{p}:servingImageTag = {tag!r}: no image {repo}:{tag} in ECR ({_reason(exc)}). Push it with "
            f"`make push-image STACK={stack} IMAGE=serving` (prints the tag to set), or unset servingImageTag "
            "until then (docs/first-deploy.md, step 5)"
        )
    bucket, prefix = models_bucket_name(cfg, account_id), cfg.serving.model_prefix
    try:
        found = aws.s3.get_objects(bucket=bucket, prefix=f"{prefix}/", max_keys=1000).keys
    except Exception as exc:
        found, why = [], f" ({_reason(exc)})"
    else:
        why = ""
    if not any(k == f"{prefix}/{MODEL_MARKER}" for k in found):
        problems.append(
            f"{p}:servingModelPrefix = {prefix!r}: no model at s3://{bucket}/{prefix}/ (no {MODEL_MARKER}){why}. "
            f"Export one from training (docs/training.md) or upload a model directory with "
            f"`make upload-model STACK={stack} MODEL_DIR=<dir> MODEL={prefix}` (docs/first-deploy.md, step 6)"
        )
    keys = None
    if cfg.serving.eks_declared:
        name = api_keys_secret_name(cfg)
        try:
            keys = aws.secretsmanager.get_secret_version(secret_id=name).secret_string
        except Exception as exc:
            problems.append(
                f"serving API keys: no Secrets Manager secret {name!r} ({_reason(exc)}). Create it from a keys file "
                f"(docs/serving.md format) with `python -m ops.artifacts put-api-keys --stack {stack} "
                "--keys-file <file>` (docs/first-deploy.md, step 7)"
            )
    if problems:
        raise PreflightError(f"stack '{stack}' (preview-time checks)", problems)
    return keys


# -- version drift ---------------------------------------------------------------------------------------------------
EKS_STANDARD_SUPPORT_ENDS: dict[str, date] = {
    "1.31": date(2025, 11, 26),
    "1.32": date(2026, 3, 23),
    "1.33": date(2026, 7, 29),
    "1.34": date(2026, 12, 2),
    "1.35": date(2027, 3, 27),
}
"""End of standard support per EKS minor version: Amazon EKS User Guide, "Understand the Kubernetes version lifecycle
on EKS" (docs.aws.amazon.com/eks/latest/userguide/kubernetes-versions.html), release calendar as read 2026-12-07
(standard support is 14 months from the EKS release; extended support, billed per cluster hour, 12 more; then EKS
upgrades the cluster itself). Add a row with each new EKS release."""


def support_warning(version: str, today: date) -> str | None:
    """Why `kubernetesVersion` should be raised (None: it is in standard support, or newer than the table)."""
    ends = EKS_STANDARD_SUPPORT_ENDS.get(version)
    if ends is None:
        known = sorted(EKS_STANDARD_SUPPORT_ENDS, key=_minor)
        if _minor(version) > _minor(known[-1]):
            return None
        return f"kubernetesVersion {version} is older than every version in infra/preflight.py's EKS support table"
    if today <= ends:
        return None
    newer = [v for v in sorted(EKS_STANDARD_SUPPORT_ENDS, key=_minor) if EKS_STANDARD_SUPPORT_ENDS[v] >= today]
    return (
        f"kubernetesVersion {version} left EKS standard support on {ends.isoformat()}: the cluster runs in extended "
        "support (billed per cluster hour) and EKS upgrades it itself when that ends"
        + (f"; set kubernetesVersion to {newer[0]} or later" if newer else "")
        + " (docs/first-deploy.md, Later updates)"
    )


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def check_version_drift(cfg: StackConfig) -> str | None:
    """Fail when the running cluster is newer than `kubernetesVersion`. Returns its version (None: no cluster yet)."""
    try:
        running = aws.eks.get_cluster(name=cfg.name_prefix).version
    except Exception as exc:
        text = str(exc).lower()
        # terraform-provider-aws's data source reports a missing cluster as "couldn't find resource"; EKS's own error
        # is ResourceNotFoundException.
        if "couldn't find" in text or "resourcenotfound" in text or "not found" in text:
            return None  # first run: the stack creates it
        raise PreflightError(f"stack '{cfg.stack}'", [f"could not read EKS cluster {cfg.name_prefix}: {exc}"]) from exc
    configured = cfg.cluster.kubernetes_version
    if _minor(running) > _minor(configured):
        raise PreflightError(
            f"stack '{cfg.stack}' (preview-time checks)",
            [
                f"{cfg.project}:kubernetesVersion = {configured!r}: the running cluster {cfg.name_prefix} is already "
                f"on {running} (EKS upgrades a cluster itself when its version leaves standard support) and EKS cannot "
                f'downgrade. Set kubernetesVersion: "{running}" in stacks/Pulumi.{cfg.stack}.yaml; the Cluster '
                "Autoscaler follows it (infra/versions.py) unless clusterAutoscalerVersion pins one, which must then "
                f"be a {running}.x release"
            ],
        )
    return running


# -- GPU capacity ----------------------------------------------------------------------------------------------------
def training_zone_index(cfg: StackConfig, zones: list[str]) -> int:
    """Index in `zones` of the first zone offering every training instance type (the EFA pool lives in one zone).
    Instance types are not offered in every zone (EC2 DescribeInstanceTypeOfferings); a pool pinned to a zone without
    them never gets a node."""
    pool = cfg.cluster.pool("training")
    offered = aws.ec2.get_instance_type_offerings(
        location_type="availability-zone",
        filters=[aws.ec2.GetInstanceTypeOfferingsFilterArgs(name="instance-type", values=list(pool.instance_types))],
    )
    by_zone: dict[str, set[str]] = {}
    for instance_type, zone in zip(offered.instance_types, offered.locations, strict=True):
        by_zone.setdefault(zone, set()).add(instance_type)
    for i, zone in enumerate(zones):
        if by_zone.get(zone, set()) >= set(pool.instance_types):
            return i
    raise PreflightError(
        f"stack '{cfg.stack}' (preview-time checks)",
        [
            f"{cfg.project}:trainingInstanceTypes = {list(pool.instance_types)}: none of the stack's zones "
            f"{zones} offers all of them in {cfg.region} (zones offering them: {sorted(by_zone) or 'none'}). "
            "Pick another region or instance type, or raise azCount so an offering zone is included"
        ],
    )


def reservation_zone(cfg: StackConfig, zones: list[str]) -> int:
    """Index in `zones` of the training pool's capacity reservation's zone: instances launch into a reservation only
    in its own zone and with its instance type (EC2 User Guide, "Capacity Reservations"). pulumi-aws has no
    capacity-reservation data source, so this reads DescribeCapacityReservations (the mock account under mocks)."""
    pool = cfg.cluster.pool("training")
    rid = pool.capacity_reservation_id
    account = _mock_account()
    if account is not None:
        found = account.reservations.get(rid)
    else:
        import boto3

        try:
            [res] = boto3.client("ec2", region_name=cfg.region).describe_capacity_reservations(
                CapacityReservationIds=[rid]
            )["CapacityReservations"]
            found = {"zone": res["AvailabilityZone"], "instance_type": res["InstanceType"]}
        except Exception as exc:  # InvalidCapacityReservationId.NotFound, AccessDenied, ...
            raise PreflightError(
                f"stack '{cfg.stack}'", [f"{cfg.project}:trainingCapacityReservationId = {rid!r}: {exc}"]
            ) from exc
    problems = []
    if not found:
        problems.append(f"{cfg.project}:trainingCapacityReservationId = {rid!r}: no such reservation in {cfg.region}")
    elif found["instance_type"] not in pool.instance_types:
        problems.append(
            f"{cfg.project}:trainingCapacityReservationId = {rid!r}: reserves {found['instance_type']}, which is not "
            f"in trainingInstanceTypes {list(pool.instance_types)}"
        )
    elif found["zone"] not in zones:
        problems.append(
            f"{cfg.project}:trainingCapacityReservationId = {rid!r}: its zone {found['zone']} is not one of the "
            f"stack's zones {zones}; raise azCount or reserve in one of them"
        )
    if problems:
        raise PreflightError(f"stack '{cfg.stack}' (preview-time checks)", problems)
    return zones.index(found["zone"])


# -- SageMaker: the running variant ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunningVariant:
    """The primary variant of a running endpoint, as DescribeEndpoint / DescribeEndpointConfig report it."""

    model_name: str
    instance_type: str
    config_initial_count: int
    """InitialInstanceCount of the endpoint configuration in use (what Pulumi's state holds)."""
    desired_count: int
    """DesiredInstanceCount now (what autoscaling set)."""
    autoscaled: bool
    """The variant is registered with Application Auto Scaling."""


def describe_running_variant(
    sagemaker: Any, autoscaling: Any, endpoint_name: str, variant: str
) -> RunningVariant | None:
    """Read the running variant with boto3 clients (None when the endpoint does not exist)."""
    try:
        endpoint = sagemaker.describe_endpoint(EndpointName=endpoint_name)
    except sagemaker.exceptions.ClientError as exc:
        if "Could not find endpoint" in str(exc):  # SageMaker's not-found is a ValidationException with this text
            return None
        raise
    live = next(v for v in endpoint["ProductionVariants"] if v["VariantName"] == variant)
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    declared = next(v for v in config["ProductionVariants"] if v["VariantName"] == variant)
    targets = autoscaling.describe_scalable_targets(
        ServiceNamespace="sagemaker",
        ResourceIds=[f"endpoint/{endpoint_name}/variant/{variant}"],
        ScalableDimension="sagemaker:variant:DesiredInstanceCount",
    )["ScalableTargets"]
    return RunningVariant(
        model_name=declared["ModelName"],
        instance_type=declared["InstanceType"],
        config_initial_count=int(declared["InitialInstanceCount"]),
        desired_count=int(live.get("DesiredInstanceCount", live.get("CurrentInstanceCount", 0))),
        autoscaled=bool(targets),
    )


def running_variant(cfg: StackConfig, endpoint_name: str, variant: str) -> RunningVariant | None:
    """The running variant: from the mock account under the mock engine, from AWS otherwise."""
    account = _mock_account()
    if account is not None:
        found = account.endpoints.get(endpoint_name)
        return RunningVariant(**found) if found else None
    import boto3  # only under the real engine; the deployer's credentials

    return describe_running_variant(
        boto3.client("sagemaker", region_name=cfg.region),
        boto3.client("application-autoscaling", region_name=cfg.region),
        endpoint_name,
        variant,
    )


def initial_instance_count(serving: ServingConfig, model_name: str, running: RunningVariant | None) -> int:
    """InitialInstanceCount of the endpoint configuration to declare.

    UpdateEndpoint deploys a new configuration's InitialInstanceCount unless RetainAllVariantProperties is set
    (SageMaker API reference, UpdateEndpoint), and pulumi-aws's Endpoint does not set it: a rollout at the configured
    minimum would drop the capacity autoscaling added. So a rollout (new model or instance type) starts at the count
    running now, within [min, max]; while nothing else changes the configuration keeps the count it was created with,
    so a count the autoscaler moved never shows as a diff.
    """
    low, high = serving.sagemaker_min_instances, serving.sagemaker_max_instances
    if running is None:
        return low
    if running.model_name == model_name and running.instance_type == serving.sagemaker_instance_type:
        return running.config_initial_count
    return max(low, min(high, running.desired_count))


def check_instance_type_change(cfg: StackConfig, running: RunningVariant | None) -> None:
    """Refuse an instance-type change while the variant is registered with Application Auto Scaling: AWS fails that
    UpdateEndpoint ("Update endpoints that use auto scaling", SageMaker developer guide); give the procedure."""
    new = cfg.serving.sagemaker_instance_type
    if running is None or running.instance_type == new or not running.autoscaled:
        return
    first = (
        "(1) set sagemakerAutoscaling: false, keep sagemakerInstanceType at the running type, `pulumi up` "
        "(deregisters the variant); "
        if cfg.serving.sagemaker_autoscaling
        else "(1) `pulumi up` once more with sagemakerInstanceType at the running type (sagemakerAutoscaling is "
        "already false, but the variant is still registered); "
    )
    raise PreflightError(
        f"stack '{cfg.stack}' (preview-time checks)",
        [
            f"{cfg.project}:sagemakerInstanceType = {new!r}: the endpoint runs {running.instance_type} and is "
            "registered with Application Auto Scaling, and AWS refuses to change the instance type of an autoscaled "
            f"variant. Procedure: {first}(2) set sagemakerInstanceType: {new} and `pulumi up` (blue/green rollout at "
            "the running count); (3) set sagemakerAutoscaling: true and `pulumi up`"
        ],
    )


# -- helpers ---------------------------------------------------------------------------------------------------------
def _reason(exc: Exception) -> str:
    text = str(exc)
    return text.removeprefix("invoke of ").split(" failed: ", 1)[-1].strip().removesuffix("()").strip()


def _mock_account() -> Any:
    """Under the mock engine, its modelled account (`ops.mocks.Account`; an empty one for mocks without it), else
    None: under mocks nothing may reach AWS. Duck-typed, so the deployed program never imports the operator tools."""
    from pulumi.runtime import settings
    from pulumi.runtime.mocks import MockMonitor

    monitor = settings.get_monitor()
    if isinstance(monitor, MockMonitor):
        return getattr(monitor.mocks, "account", None) or SimpleNamespace(reservations={}, endpoints={})
    return None
