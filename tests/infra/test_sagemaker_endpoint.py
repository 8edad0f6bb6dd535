"""The SageMaker endpoint under the mock engine: model -> endpoint configuration -> endpoint -> scaling target ->
policy are wired together, the model reads the uncompressed export prefix inside the VPC, and scaling follows config."""

from __future__ import annotations

from typing import Any

import pytest

from facts import pulumi_types as tok
from facts.tags import stack_tags
from infra.config import StackConfig
from infra.config import load_stack as stack_config
from infra.sagemaker_endpoint import (
    STARTUP_HEALTH_CHECK_TIMEOUT_S,
    VARIANT_NAME,
    SageMakerEndpoint,
    SageMakerEndpointArgs,
    has_instance_storage,
)
from ops.mocks import Run
from tests.helpers import run_component

ROLE = "arn:aws:iam::123456789012:role/llmp-dev-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llmp-dev-serving:0.1.0"
BUCKET = "llmp-dev-models-123456789012"
KMS_ARN = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-4333-a444-555555555555"
SUBNETS = ["subnet-aaa", "subnet-bbb"]

MODEL = tok.SAGEMAKER_MODEL
CONFIG = tok.SAGEMAKER_ENDPOINT_CONFIGURATION
ENDPOINT = tok.SAGEMAKER_ENDPOINT
TARGET = tok.APPAUTOSCALING_TARGET
POLICY = tok.APPAUTOSCALING_POLICY


def run_endpoint(cfg: StackConfig, image: str = IMAGE) -> Run:
    def program() -> dict[str, Any]:
        endpoint = SageMakerEndpoint(
            "sagemaker",
            SageMakerEndpointArgs(
                serving=cfg.serving,
                name_prefix=cfg.name_prefix,
                execution_role_arn=ROLE,
                image=image,
                models_bucket=BUCKET,
                vpc_id="vpc-123",
                private_subnet_ids=SUBNETS,
                kms_key_arn=KMS_ARN,
                tags=stack_tags(cfg.stack, cfg.environment),
            ),
        )
        return {"endpoint_name": endpoint.endpoint_name}

    return run_component(cfg, program)


@pytest.fixture
def dev() -> tuple[StackConfig, Run]:
    cfg = stack_config("dev", sagemakerMinInstances=1, sagemakerMaxInstances=3, sagemakerInvocationsPerInstance=40)
    return cfg, run_endpoint(cfg)


def test_resources_and_tags(dev: tuple[StackConfig, Run]) -> None:
    _, run = dev
    counts = {t: len(run.of_type(t)) for t in (MODEL, CONFIG, ENDPOINT, TARGET, POLICY)}
    assert counts == dict.fromkeys(counts, 1)
    assert len(run.of_type(tok.EC2_SECURITY_GROUP)) == 1
    assert run.duplicate_names() == []
    for r in run.resources:
        if r.type.startswith("aws:"):
            assert r.parent == "sagemaker" and r.name.startswith("sagemaker-"), r.name
            if r.type != POLICY:  # scaling policies take no tags
                assert r.inputs["tags"].items() >= stack_tags("dev", "dev").items(), r.name


def test_security_group_allows_https_egress_only(dev: tuple[StackConfig, Run]) -> None:
    _, run = dev
    sg = run.one(tok.EC2_SECURITY_GROUP).inputs
    assert sg["vpcId"] == "vpc-123"
    assert sg["ingress"] == []
    assert [(e["protocol"], e["fromPort"], e["toPort"]) for e in sg["egress"]] == [("tcp", 443, 443)]


def test_model_reads_the_uncompressed_export_inside_the_vpc(dev: tuple[StackConfig, Run]) -> None:
    cfg, run = dev
    model = run.one(MODEL).inputs
    assert model["name"].startswith("llmp-dev-serving-") and len(model["name"]) <= 63
    assert model["executionRoleArn"] == ROLE
    container = model["primaryContainer"]
    assert container["image"] == IMAGE
    [source] = container["modelDataSource"]["s3DataSources"]
    assert source == {
        "s3Uri": f"s3://{BUCKET}/{cfg.serving.model_prefix}/",
        "s3DataType": "S3Prefix",
        "compressionType": "None",
    }
    # dev: the built-in engine on ml.g5.xlarge's A10G, chosen explicitly
    assert container["environment"] == {
        "SERVING_MODEL": "/opt/ml/model",
        "SERVING_ALLOW_UNAUTHENTICATED": "true",
        "SERVING_ENGINE": "builtin",
        "SERVING_DEVICE": "cuda",
        "SERVING_DTYPE": "bfloat16",
    }
    assert model["vpcConfig"]["subnets"] == SUBNETS
    assert model["vpcConfig"]["securityGroupIds"][0].startswith("sg-")
    assert model["enableNetworkIsolation"] is True


def test_model_name_changes_with_the_image() -> None:
    cfg = stack_config("dev")
    first = run_endpoint(cfg).one(MODEL).inputs["name"]
    again = run_endpoint(cfg).one(MODEL).inputs["name"]
    other = run_endpoint(cfg, image=IMAGE.replace("0.1.0", "0.2.0")).one(MODEL).inputs["name"]
    assert first == again != other


def test_endpoint_configuration_and_endpoint_are_wired(dev: tuple[StackConfig, Run]) -> None:
    cfg, run = dev
    model = run.one(MODEL).inputs
    config = run.one(CONFIG)
    [variant] = config.inputs["productionVariants"]
    assert variant["modelName"] == model["name"]
    assert variant["variantName"] == VARIANT_NAME
    assert variant["instanceType"] == cfg.serving.sagemaker_instance_type
    assert variant["initialInstanceCount"] == cfg.serving.sagemaker_min_instances
    assert variant["containerStartupHealthCheckTimeoutInSeconds"] == STARTUP_HEALTH_CHECK_TIMEOUT_S
    assert config.inputs["namePrefix"] == "llmp-dev-serving-"
    endpoint = run.one(ENDPOINT).inputs
    assert endpoint["name"] == "llmp-dev-serving" == run.outputs["endpoint_name"]
    # the mock engine names a name-prefixed resource after its logical name; what matters is that it is the config's
    assert endpoint["endpointConfigName"] == config.state.get("name")


def test_kms_key_only_for_instance_types_with_ebs_storage() -> None:
    assert has_instance_storage("ml.g5.xlarge") and has_instance_storage("ml.p4d.24xlarge")
    assert not has_instance_storage("ml.m5.large") and not has_instance_storage("ml.inf2.xlarge")
    gpu = run_endpoint(stack_config("dev", sagemakerInstanceType="ml.g5.xlarge")).one(CONFIG).inputs
    assert "kmsKeyArn" not in gpu
    ebs = run_endpoint(stack_config("dev", sagemakerInstanceType="ml.m5.large")).one(CONFIG).inputs
    assert ebs["kmsKeyArn"] == KMS_ARN


def test_autoscaling_target_and_policy(dev: tuple[StackConfig, Run]) -> None:
    _, run = dev
    target = run.one(TARGET).inputs
    assert target["serviceNamespace"] == "sagemaker"
    assert target["resourceId"] == f"endpoint/llmp-dev-serving/variant/{VARIANT_NAME}"
    assert target["scalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    assert (target["minCapacity"], target["maxCapacity"]) == (1, 3)
    policy = run.one(POLICY).inputs
    assert policy["policyType"] == "TargetTrackingScaling"
    for key in ("serviceNamespace", "resourceId", "scalableDimension"):
        assert policy[key] == target[key]
    tracking = policy["targetTrackingScalingPolicyConfiguration"]
    assert tracking["targetValue"] == 40
    assert tracking["predefinedMetricSpecification"]["predefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"


@pytest.mark.parametrize(
    ("instance_type", "vllm_args"),
    [
        # prod's pair: Llama-3.1-8B on one A10G: 3.3 GiB of KV cache after the weights, not the 16 GiB that the
        # model's 131072-token context would need
        ("ml.g5.2xlarge", "--tensor-parallel-size 1 --max-model-len 13312 --gpu-memory-utilization 0.90"),
        # four A10Gs: tensor parallel over all of them, the weights split four ways
        ("ml.g5.12xlarge", "--tensor-parallel-size 4 --max-model-len 131072 --gpu-memory-utilization 0.90"),
    ],
)
def test_vllm_engine_is_sized_for_the_instance(instance_type: str, vllm_args: str) -> None:
    cfg = stack_config("prod", sagemakerInstanceType=instance_type)
    env = run_endpoint(cfg).one(MODEL).inputs["primaryContainer"]["environment"]
    assert env["SERVING_ENGINE"] == "vllm"
    assert env["SERVING_VLLM_ARGS"] == vllm_args


@pytest.mark.parametrize(
    ("instance_type", "dtype"), [("ml.g4dn.xlarge", "float16"), ("ml.g6e.xlarge", "bfloat16"), ("ml.m5.large", None)]
)
def test_builtin_engine_device_follows_the_instance(instance_type: str, dtype: str | None) -> None:
    env = (
        run_endpoint(stack_config("dev", sagemakerInstanceType=instance_type))
        .one(MODEL)
        .inputs["primaryContainer"]["environment"]
    )
    assert env["SERVING_ENGINE"] == "builtin"
    assert env["SERVING_DEVICE"] == ("cuda" if dtype else "cpu")
    assert env.get("SERVING_DTYPE") == dtype
