"""The first real `pulumi up` of every stack, offline: the deployer reaches the Kubernetes API (config + the deploy
workflow, proven together), serving waits for its artifacts and says how to make them, break-glass admins, version
drift, GPU capacity (zones, reservations, quotas) and SageMaker rollouts that keep their capacity.

"The account" is modelled by ops.mocks.Account: what already exists when the program's preview-time look-ups run.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from moto import mock_aws

from facts import pulumi_types as tok
from infra import outputs as out
from infra.access import deployer_path_problems, kubernetes_provider_urn, runner_label, runner_project_name
from infra.capacity import required_quotas
from infra.config import EGRESS_HINT, ConfigError, load_stack, load_stack_file, project_name
from infra.preflight import (
    PreflightError,
    RunningVariant,
    describe_running_variant,
    initial_instance_count,
    models_bucket_name,
    serving_repository_name,
)
from ops.mocks import Account, Recorded, RecordingMocks, Run, run_program
from ops.preview import preview
from tests.helpers import WORKFLOWS_DIR
from tests.infra.conftest import PROD_SERVING

PROD = {k.removeprefix("llm-platform:"): v for k, v in PROD_SERVING.items()}

P = "llm-platform:"
DEPLOY = WORKFLOWS_DIR / "deploy.yml"
ACCOUNT = "123456789012"


def workflow() -> dict[str, Any]:
    return yaml.safe_load(DEPLOY.read_text())


def run_with(stack: str, tmp_path: Path, account: Account | None = None, **overrides: Any) -> Run:
    values, _ = load_stack_file(stack)
    values.update({P + k: v for k, v in overrides.items()})
    path = tmp_path / f"Pulumi.{stack}.{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump({"config": values}))
    return preview(stack, path, account)[1]


def build_fails(stack: str, account: Account, **overrides: Any) -> tuple[str, RecordingMocks]:
    """Run the program expecting a preview-time failure; return its message and what got registered."""
    from infra.program import build

    values, _ = load_stack_file(stack)
    values.update({P + k: v for k, v in overrides.items()})
    cfg = load_stack(stack, **overrides)
    mocks = RecordingMocks(cfg.region, account=account)
    with pytest.raises(PreflightError) as exc:
        run_program(build, values, stack, project_name(), cfg.region, mocks=mocks)
    return str(exc.value), mocks


# -- 1. deployer -> Kubernetes API ----------------------------------------------------------------------------------
def test_every_shipped_stack_applies_its_kubernetes_layer_from_where_the_endpoint_is_reachable(shipped) -> None:
    cfg, run = shipped
    aws_layer, cluster_layer = run.layers["aws"].resources, run.layers["cluster"].resources
    assert deployer_path_problems(cfg, aws_layer, workflow(), cluster_layer) == []
    # The runner the workflow names is the one this stack declares, in its private subnets.
    project = run.one(tok.CODEBUILD_PROJECT)
    assert project.inputs["name"] == runner_project_name(cfg.name_prefix)
    assert workflow()["jobs"][cfg.stack]["runs-on"] == runner_label(project.inputs["name"])
    assert project.inputs["vpcConfig"]["subnets"] == run.outputs[out.PRIVATE_SUBNET_IDS]


def test_the_reachability_check_fails_on_each_way_to_break_the_path(run_stack) -> None:
    cfg, run = load_stack("staging"), run_stack("staging")
    aws_layer, cluster_layer = run.layers["aws"].resources, run.layers["cluster"].resources
    wf = workflow()

    def problems(w: dict[str, Any], cluster: list[Recorded] = cluster_layer) -> list[str]:
        return deployer_path_problems(cfg, aws_layer, w, cluster)

    hosted = copy.deepcopy(wf)
    hosted["jobs"]["staging"]["runs-on"] = "ubuntu-latest"
    assert any("from a GitHub-hosted runner" in p for p in problems(hosted))

    unordered = copy.deepcopy(wf)
    unordered["jobs"]["staging"]["needs"] = "dev"
    assert any("without needing the AWS layer's job first" in p for p in problems(unordered))

    other_runner = copy.deepcopy(wf)
    other_runner["jobs"]["staging"]["runs-on"] = runner_label("llmp-dev-deployer")
    assert any("no CodeBuild runner project this stack" in p for p in problems(other_runner))

    nothing = copy.deepcopy(wf)
    del nothing["jobs"]["staging"]
    assert problems(nothing) == ["no job of the deploy workflow applies the cluster layer staging-cluster"]

    # A Kubernetes object on the default provider would go to whatever kubeconfig the runner has.
    stray = Recorded(type=tok.K8S_CONFIG_MAP, name="stray", custom=True, inputs={}, provider=None)
    assert any("stray is not applied through" in p for p in problems(wf, [*cluster_layer, stray]))

    # Without its runner (public-allowlist), the workflow's in-VPC job has nothing to run on.
    public = load_stack(
        "staging", kubernetesDeployer="public-allowlist", publicApiEndpoint=True, publicApiCidrs=["1.2.3.4/32"]
    )
    no_runner = [r for r in aws_layer if "codebuild" not in r.type]
    assert any(
        "kubernetesDeployer is public-allowlist" in p
        for p in deployer_path_problems(public, no_runner, wf, cluster_layer)
    )


def test_the_aws_layer_has_no_kubernetes_provider_and_the_cluster_layer_exactly_one(run_stack) -> None:
    run = run_stack("dev")
    assert not [r for r in run.layers["aws"].resources if r.type.startswith(("kubernetes:", "pulumi:providers:k"))]
    providers = {
        r.provider.rsplit("::", 1)[0] for r in run.layers["cluster"].resources if r.type.startswith("kubernetes:")
    }
    assert providers == {kubernetes_provider_urn("dev-cluster", "llm-platform")}
    # The AWS-layer job applies the whole AWS-layer stack: no --exclude/--target (the engine would ignore them for
    # providers and charts anyway: tests/infra/test_engine_rules.py).
    up = next(s for s in workflow()["jobs"]["dev-aws"]["steps"] if "pulumi/actions" in s.get("uses", ""))["with"]
    assert (up["command"], up["stack-name"]) == ("up", "dev")
    assert not {"exclude", "target", "exclude-dependents", "target-dependents"} & set(up)


@pytest.mark.parametrize(
    ("cidr", "why"),
    [
        ("203.0.113.0/24", "a documentation range (RFC 5737 TEST-NET-3)"),
        ("198.51.100.7/32", "a documentation range (RFC 5737 TEST-NET-2)"),
        ("2001:db8::/48", "a documentation range (RFC 3849)"),
        ("10.1.0.0/16", "a private range"),
        ("100.64.1.0/24", "carrier-grade NAT space (RFC 6598)"),
        ("127.0.0.1/32", "a private range"),
    ],
)
def test_allowlist_refuses_addresses_no_deployer_connects_from(cidr: str, why: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_stack("dev", kubernetesDeployer="public-allowlist", publicApiEndpoint=True, publicApiCidrs=[cidr])
    message = str(exc.value)
    assert f"publicApiCidrs contains '{cidr}': {why}" in message
    assert "curl -s https://checkip.amazonaws.com" in message and EGRESS_HINT in message


def test_allowlist_accepts_a_routable_egress_address_and_the_path_needs_its_pieces() -> None:
    cfg = load_stack(
        "dev", kubernetesDeployer="public-allowlist", publicApiEndpoint=True, publicApiCidrs=["1.2.3.4/32"]
    )
    assert cfg.cluster.deployer == "public-allowlist" and cfg.cluster.public_api_cidrs == ("1.2.3.4/32",)
    with pytest.raises(ConfigError, match="public-allowlist needs llm-platform:publicApiEndpoint = true"):
        load_stack("dev", kubernetesDeployer="public-allowlist")
    with pytest.raises(ConfigError, match="deployerRepository = '': the in-VPC runner needs the GitHub repository"):
        load_stack("dev", deployerRepository="")
    with pytest.raises(ConfigError, match="kubernetesDeployer = 'ssh': must be one of"):
        load_stack("dev", kubernetesDeployer="ssh")


def test_a_public_allowlist_stack_declares_no_runner(tmp_path: Path) -> None:
    run = run_with(
        "dev", tmp_path, kubernetesDeployer="public-allowlist", publicApiEndpoint=True, publicApiCidrs=["1.2.3.4/32"]
    )
    assert run.of_type(tok.CODEBUILD_PROJECT) == []
    vpc = run.one(tok.EKS_CLUSTER).inputs["vpcConfig"]
    assert vpc["endpointPublicAccess"] is True and vpc["publicAccessCidrs"] == ["1.2.3.4/32"]


def test_runner_role_can_only_run_the_build(run_stack) -> None:
    run = run_stack("prod")
    role = run.one(tok.IAM_ROLE, "deployer-role").inputs
    assert "codebuild.amazonaws.com" in role["assumeRolePolicy"] and "aws:SourceAccount" in role["assumeRolePolicy"]
    policy = run.one(tok.IAM_ROLE_POLICY, "deployer-policy").inputs["policy"]
    actions = {
        a
        for s in yaml.safe_load(policy)["Statement"]
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert all(a.startswith(("logs:", "ec2:")) for a in actions), actions
    webhook = run.one(tok.CODEBUILD_WEBHOOK).inputs
    assert webhook["filterGroups"] == [{"filters": [{"type": "EVENT", "pattern": "WORKFLOW_JOB_QUEUED"}]}]


# -- 2. first-run lifecycle -----------------------------------------------------------------------------------------
def test_shipped_first_run_stacks_declare_no_serving_until_configured(run_stack) -> None:
    for stack in ("dev", "staging"):
        cfg, run = load_stack(stack), run_stack(stack)
        assert not cfg.serving.image_tag and not cfg.serving.artifacts_configured
        assert run.of_type(tok.K8S_DEPLOYMENT) == [] or all(
            r.parent != "serving-eks" for r in run.of_type(tok.K8S_DEPLOYMENT)
        )
        assert run.of_type(tok.SAGEMAKER_MODEL) == []
        assert tok.ECR_GET_IMAGE not in run.mocks.invokes


def test_an_image_not_pushed_yet_fails_the_preview_naming_the_push_command() -> None:
    message, mocks = build_fails("dev", Account(images=set()), servingImageTag="0.1.0")
    assert "llm-platform:servingImageTag = '0.1.0': no image llmp-dev/serving:0.1.0 in ECR" in message
    assert "ImageNotFoundException" in message
    assert "`make push-image STACK=dev IMAGE=serving`" in message
    # It fails before anything is created.
    assert not [r for r in mocks.resources.values() if r.custom and r.type.startswith("aws:")]


def test_a_model_not_uploaded_yet_and_missing_api_keys_fail_naming_their_commands() -> None:
    cfg = load_stack("dev", servingImageTag="0.1.0")
    account = Account(
        images={(serving_repository_name(cfg), "0.1.0")},
        objects={(models_bucket_name(cfg, ACCOUNT), "debug-llama/README.md")},  # a prefix without a model
        secrets={},
    )
    message, _ = build_fails("dev", account, servingImageTag="0.1.0")
    assert f"no model at s3://{models_bucket_name(cfg, ACCOUNT)}/debug-llama/ (no config.json)" in message
    assert "`make upload-model STACK=dev MODEL_DIR=<dir> MODEL=debug-llama`" in message
    assert "no Secrets Manager secret 'llmp-dev/serving-api-keys'" in message
    assert "`python -m ops.artifacts put-api-keys --stack dev --keys-file <file>`" in message
    assert "no image" not in message


def test_sagemaker_checks_the_same_artifacts_but_needs_no_keys_secret() -> None:
    cfg = load_stack("staging", servingImageTag="0.1.0")
    message, _ = build_fails("staging", Account(images=set(), objects=set(), secrets={}), servingImageTag="0.1.0")
    assert "no image llmp-staging/serving:0.1.0" in message and "no model at s3://" in message
    assert "Secrets Manager" not in message
    assert cfg.serving.sagemaker_declared and not cfg.serving.eks_declared


def test_api_keys_secret_comes_from_secrets_manager_before_the_deployment(tmp_path: Path) -> None:
    cfg = load_stack("dev", servingImageTag="0.1.0")
    keys = "team-a sk-team-a-0123456789abcdef rpm=60\n"
    account = Account(secrets={"llmp-dev/serving-api-keys": keys})
    run = run_with("dev", tmp_path, account, servingImageTag="0.1.0")
    secret = run.one(tok.K8S_SECRET, "serving-api-keys")
    assert secret.inputs["metadata"] == {"name": "serving-api-keys", "namespace": "llm-serving"}
    wrapped = secret.inputs["stringData"]
    assert wrapped["4dabf18193072939515e22adb298388d"] and wrapped["value"] == {"keys": keys}  # a Pulumi secret
    assert "kubernetes:core/v1:Secret::serving-api-keys" in run.one("llm-platform:infra:ServingOnEks").depends_on
    assert cfg.serving.eks_declared


# -- 5. break-glass -------------------------------------------------------------------------------------------------
def test_every_shipped_stack_has_a_break_glass_admin_role_with_an_access_entry(shipped) -> None:
    cfg, run = shipped
    roles = [a for a in cfg.cluster.admin_arns if ":role/" in a]
    assert roles
    entries = {r.inputs["principalArn"] for r in run.of_type(tok.EKS_ACCESS_ENTRY)}
    assert set(roles) <= entries


# -- 6. version drift -----------------------------------------------------------------------------------------------
def test_a_cluster_eks_upgraded_on_its_own_fails_the_preview_with_what_to_change() -> None:
    message, mocks = build_fails("dev", Account(clusters={"llmp-dev": "1.34"}))
    assert "llm-platform:kubernetesVersion = '1.33': the running cluster llmp-dev is already on 1.34" in message
    assert 'Set kubernetesVersion: "1.34" in stacks/Pulumi.dev.yaml' in message
    assert not [r for r in mocks.resources.values() if r.custom and r.type.startswith("aws:")]


@pytest.mark.parametrize("running", ["1.33", "1.32"])
def test_same_or_older_running_version_is_an_ordinary_update(tmp_path: Path, running: str) -> None:
    run = run_with("dev", tmp_path, Account(clusters={"llmp-dev": running}))
    assert run.one(tok.EKS_CLUSTER).inputs["version"] == "1.33"


def test_the_autoscaler_follows_the_kubernetes_version_from_one_table() -> None:
    for version, autoscaler in (("1.33", "1.33.5"), ("1.34", "1.34.4"), ("1.35", "1.35.1")):
        assert load_stack("dev", kubernetesVersion=version).autoscaling.cluster_autoscaler_version == autoscaler
    assert (
        load_stack(
            "dev", kubernetesVersion="1.34", clusterAutoscalerVersion="1.34.0"
        ).autoscaling.cluster_autoscaler_version
        == "1.34.0"
    )
    with pytest.raises(
        ConfigError, match=re.escape("clusterAutoscalerVersion = '1.33.5': its minor version must equal")
    ):
        load_stack("dev", kubernetesVersion="1.34", clusterAutoscalerVersion="1.33.5")


# -- 8. GPU capacity ------------------------------------------------------------------------------------------------
def test_efa_training_pool_goes_to_a_zone_that_offers_its_type(tmp_path: Path) -> None:
    run = run_with("staging", tmp_path, Account(offerings={"g6e.12xlarge": ["us-west-2c", "us-west-2d"]}))
    subnets = run.outputs[out.PRIVATE_SUBNET_IDS]
    group = run.one(tok.EKS_NODE_GROUP, "cluster-training").inputs
    assert group["subnetIds"] == [subnets[2]]  # us-west-2c is the third of the stack's zones
    offering = [i for i in run.mocks.invokes if "getInstanceTypeOfferings" in i]
    assert offering


def test_no_zone_offering_the_training_type_fails_the_preview() -> None:
    message, _ = build_fails("staging", Account(offerings={"g6e.12xlarge": ["us-west-2d"]}))
    assert "none of the stack's zones ['us-west-2a', 'us-west-2b', 'us-west-2c'] offers all of them" in message


def test_training_pool_launches_into_its_capacity_block(tmp_path: Path) -> None:
    reservation = "cr-0123456789abcdef0"
    account = Account(reservations={reservation: {"zone": "us-east-1b", "instance_type": "p5.48xlarge"}})
    run = run_with("prod", tmp_path, account, trainingCapacityReservationId=reservation, trainingCapacityBlock=True)
    group = run.one(tok.EKS_NODE_GROUP, "cluster-training").inputs
    assert group["capacityType"] == "CAPACITY_BLOCK"
    assert group["subnetIds"] == [run.outputs[out.PRIVATE_SUBNET_IDS][1]]
    template = run.one(tok.EC2_LAUNCH_TEMPLATE, "cluster-training-lt").inputs
    assert template["capacityReservationSpecification"] == {
        "capacityReservationTarget": {"capacityReservationId": reservation}
    }
    assert template["instanceMarketOptions"] == {"marketType": "capacity-block"}
    assert "placement" not in template  # the reservation places the instances


def test_a_reservation_elsewhere_is_refused() -> None:
    reservation = "cr-0123456789abcdef0"
    account = Account(reservations={reservation: {"zone": "us-east-1f", "instance_type": "p5.48xlarge"}})
    message, _ = build_fails("prod", account, trainingCapacityReservationId=reservation)
    assert "its zone us-east-1f is not one of the stack's zones" in message
    with pytest.raises(ConfigError, match="a Capacity Block is used through its reservation"):
        load_stack("prod", trainingCapacityBlock=True)
    with pytest.raises(ConfigError, match="trainingCapacityReservationId = 'r-1': not a capacity reservation ID"):
        load_stack("prod", trainingCapacityReservationId="r-1")


def test_preview_lists_the_quotas_the_stack_needs(run_stack) -> None:
    report, _ = preview("prod")
    quotas = {q["code"] or q["name"]: q for q in report["quotas"]}
    assert quotas["L-417A185B"]["needed"] == 4 * 192  # P on demand: training max 4 x p5.48xlarge
    assert quotas["L-DB2E81BA"]["needed"] == 8 * 8  # G on demand: inference max 8 x g6e.2xlarge
    assert quotas["L-1216C47A"]["needed"] == 3 * 4 + 4 * 4  # system pool 3 x m7i.xlarge, batch pool max 4 x 4
    assert quotas["ml.g5.2xlarge for endpoint usage"]["needed"] == 6
    assert "request-service-quota-increase" in quotas["L-417A185B"]["request"]
    dev = {q.code: q for q in required_quotas(load_stack("dev"))}
    assert dev["L-3819A6DF"].needed == 2 * 8 + 2 * 8  # G spot: both pools at max of their largest type
    assert dev["L-34B43A08"].needed == 4 * 4  # standard spot: the batch pool at its max (4 x m7i.xlarge)


# -- 7. SageMaker updates keep their capacity -----------------------------------------------------------------------
def test_initial_count_on_create_rollout_and_steady_state() -> None:
    cfg = load_stack("prod")  # min 2, max 6, ml.g5.2xlarge
    same = RunningVariant("m1", "ml.g5.2xlarge", config_initial_count=2, desired_count=5, autoscaled=True)
    assert initial_instance_count(cfg.serving, "m1", None) == 2  # create: the minimum
    assert (
        initial_instance_count(cfg.serving, "m1", same) == 2
    )  # nothing changed: no diff although autoscaling moved it
    assert initial_instance_count(cfg.serving, "m2", same) == 5  # new model: roll out at the running count
    big = RunningVariant("m1", "ml.g5.2xlarge", 2, desired_count=9, autoscaled=True)
    assert initial_instance_count(cfg.serving, "m2", big) == 6  # within [min, max]


def _endpoint_config(run: Run) -> dict[str, Any]:
    return run.one(tok.SAGEMAKER_ENDPOINT_CONFIGURATION).inputs["productionVariants"][0]


def test_a_new_image_rolls_out_at_the_running_count_on_recorded_inputs(tmp_path: Path) -> None:
    steady = run_with("prod", tmp_path, **PROD)
    model = steady.one(tok.SAGEMAKER_MODEL).inputs["name"]
    assert _endpoint_config(steady)["initialInstanceCount"] == 2
    running = {"instance_type": "ml.g5.2xlarge", "config_initial_count": 2, "desired_count": 5, "autoscaled": True}
    unchanged = run_with(
        "prod", tmp_path, Account(endpoints={"llmp-prod-serving": {**running, "model_name": model}}), **PROD
    )
    assert _endpoint_config(unchanged)["initialInstanceCount"] == 2
    new_image = run_with(
        "prod",
        tmp_path,
        Account(endpoints={"llmp-prod-serving": {**running, "model_name": model}}),
        # prod pins its serving image by digest (issue 10): a new image is a new tag *and* its digest.
        **{**PROD, "servingImageTag": "1.1.0", "servingImageDigest": "sha256:" + "1" * 64},
    )
    assert new_image.one(tok.SAGEMAKER_MODEL).inputs["name"] != model
    assert _endpoint_config(new_image)["initialInstanceCount"] == 5


def test_instance_type_change_with_autoscaling_is_refused_with_the_procedure(tmp_path: Path) -> None:
    running = {"model_name": "x", "instance_type": "ml.g5.xlarge", "config_initial_count": 2, "desired_count": 3}
    message, _ = build_fails("prod", Account(endpoints={"llmp-prod-serving": {**running, "autoscaled": True}}), **PROD)
    assert "the endpoint runs ml.g5.xlarge and is registered with Application Auto Scaling" in message
    assert "(1) set sagemakerAutoscaling: false" in message and "(3) set sagemakerAutoscaling: true" in message
    # Step 2 of the procedure: deregistered, autoscaling off -> the change goes through at the running count.
    run = run_with(
        "prod",
        tmp_path,
        Account(endpoints={"llmp-prod-serving": {**running, "autoscaled": False}}),
        **PROD,
        sagemakerAutoscaling=False,
    )
    assert run.of_type(tok.APPAUTOSCALING_TARGET) == []
    variant = _endpoint_config(run)
    assert (variant["instanceType"], variant["initialInstanceCount"]) == ("ml.g5.2xlarge", 3)


def test_running_variant_is_read_at_the_request_level_against_moto() -> None:
    with mock_aws():
        sm = boto3.client("sagemaker", region_name="us-east-1")
        aas = boto3.client("application-autoscaling", region_name="us-east-1")
        assert describe_running_variant(sm, aas, "llmp-prod-serving", "primary") is None
        sm.create_model(
            ModelName="m1",
            ExecutionRoleArn=f"arn:aws:iam::{ACCOUNT}:role/sm",
            PrimaryContainer={"Image": f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/llmp-prod/serving:1.0.0"},
        )
        sm.create_endpoint_config(
            EndpointConfigName="c1",
            ProductionVariants=[
                {"VariantName": "primary", "ModelName": "m1", "InitialInstanceCount": 2, "InstanceType": "ml.m5.large"}
            ],
        )
        sm.create_endpoint(EndpointName="llmp-prod-serving", EndpointConfigName="c1")
        sm.update_endpoint_weights_and_capacities(
            EndpointName="llmp-prod-serving",
            DesiredWeightsAndCapacities=[{"VariantName": "primary", "DesiredInstanceCount": 4}],
        )
        assert describe_running_variant(sm, aas, "llmp-prod-serving", "primary") == RunningVariant(
            "m1", "ml.m5.large", config_initial_count=2, desired_count=4, autoscaled=False
        )
        aas.register_scalable_target(
            ServiceNamespace="sagemaker",
            ResourceId="endpoint/llmp-prod-serving/variant/primary",
            ScalableDimension="sagemaker:variant:DesiredInstanceCount",
            MinCapacity=2,
            MaxCapacity=6,
        )
        assert describe_running_variant(sm, aas, "llmp-prod-serving", "primary").autoscaled is True


def test_the_pr_preview_of_the_real_engine_previews_the_aws_layer_and_the_offline_one_both() -> None:
    """`pulumi preview` of Kubernetes objects talks to the API server too; from a GitHub-hosted runner it cannot. So
    the real preview is of the AWS layer only (its program has neither provider nor chart), and the offline preview
    (ops.preview, mock engine) shows both layers."""
    wf = yaml.safe_load((DEPLOY.parent / "pr-preview.yml").read_text())
    job = wf["jobs"]["pulumi-preview"]
    assert not str(job["runs-on"]).startswith("codebuild-")
    [step] = [s for s in job["steps"] if s.get("uses", "").split("@")[0] == "pulumi/actions"]
    assert step["with"]["command"] == "preview" and step["with"]["stack-name"] == "${{ matrix.stack }}"
    assert not {"exclude", "target"} & set(step["with"])
    assert all(not s.endswith("-cluster") for s in job["strategy"]["matrix"]["stack"])
    offline = wf["jobs"]["offline-preview"]
    script = next(s["run"] for s in offline["steps"] if "ops.preview" in s.get("run", ""))
    assert '-m ops.preview "$stack" --json' in script
    report, _ = preview("dev")
    assert set(report["layers"]) == {"aws", "cluster"} and all(report["layers"].values())


def test_a_kubernetes_version_out_of_standard_support_is_warned_at_preview(caplog: pytest.LogCaptureFixture) -> None:
    from datetime import date

    from infra.preflight import EKS_STANDARD_SUPPORT_ENDS, support_warning

    assert support_warning("1.33", date(2026, 7, 29)) is None
    late = support_warning("1.33", date(2026, 7, 30))
    assert late and "left EKS standard support on 2026-07-29" in late and "set kubernetesVersion to 1.34" in late
    assert support_warning("1.99", date(2030, 1, 1)) is None  # newer than the table: nothing known against it
    assert "older than every version" in (support_warning("1.20", date(2020, 1, 1)) or "")
    assert all(isinstance(d, date) for d in EKS_STANDARD_SUPPORT_ENDS.values())
    # The preview of a stack on a version past its date says so (warning, not failure).
    cfg = load_stack("dev")
    expected = support_warning(cfg.cluster.kubernetes_version, date.today())
    with caplog.at_level("WARNING"):
        preview("dev")
    assert (expected in caplog.text) if expected else ("left EKS standard support" not in caplog.text)
