"""Stack config validation: every rule fails before any resource exists, naming the key, the value and the fix."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import yaml

from infra.config import ConfigError, load_config, load_stack_file, schema
from ops.mocks import RecordingMocks, config_strings, run_program
from tests.helpers import REPO_ROOT

P = "llm-platform:"


def load(stack: str = "dev", **overrides: Any) -> Any:
    values, source = load_stack_file(stack)
    for key, value in overrides.items():
        if value is None:
            values.pop(P + key, None)
        else:
            values[P + key] = value
    return load_config(values, stack, source)


def problems(stack: str = "dev", **overrides: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        load(stack, **overrides)
    return str(exc.value)


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_shipped_stacks_are_valid(stack: str) -> None:
    cfg = load(stack)
    assert cfg.stack == stack and cfg.environment == stack


def test_environments_differ_only_by_config() -> None:
    dev, staging, prod = load("dev"), load("staging"), load("prod")
    assert (dev.network.nat_gateway_count, staging.network.nat_gateway_count, prod.network.nat_gateway_count) == (
        1,
        3,
        3,
    )
    assert dev.network.az_count == 2 and prod.network.az_count == 3
    assert {p.capacity_type for p in dev.cluster.gpu_pools} == {"SPOT"}
    assert {p.capacity_type for p in prod.cluster.gpu_pools} == {"ON_DEMAND"}
    assert all(p.min_size == 0 for p in dev.cluster.gpu_pools)
    assert dev.storage.force_destroy and not prod.storage.force_destroy
    assert prod.production and prod.storage.protect_data and not prod.cluster.public_api_endpoint
    assert dev.serving.on_eks and staging.serving.on_sagemaker and prod.serving.on_eks and prod.serving.on_sagemaker


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"vpcCidr": "10.0.0.0/33"}, "llm-platform:vpcCidr = '10.0.0.0/33': not a valid CIDR"),
        ({"vpcCidr": "10.0.0.1/16"}, "llm-platform:vpcCidr = '10.0.0.1/16': not a valid CIDR"),
        ({"vpcCidr": "8.8.0.0/16"}, "must be a private (RFC 1918) range"),
        ({"vpcCidr": "10.0.0.0/24"}, "must be an IPv4 CIDR between /16 and /20"),
        ({"publicApiCidrs": ["0.0.0.0/0"]}, "the whole internet is not an allowlist"),
        ({"publicApiCidrs": ["203.0.113.0/33"]}, "publicApiCidrs contains '203.0.113.0/33': not a valid CIDR"),
        ({"publicApiCidrs": ["203.0.113.0/24", "203.0.113.128/25"]}, "overlaps '203.0.113.0/24'"),
        ({"trainingMinSize": 3}, "llm-platform:trainingMinSize = 3: must not exceed llm-platform:trainingMaxSize (2)"),
        ({"inferenceMinSize": -1}, "llm-platform:inferenceMinSize = -1: must be 0 or more"),
        ({"trainingCapacityType": "PREEMPTIBLE"}, "llm-platform:trainingCapacityType = 'PREEMPTIBLE': must be one of"),
        ({"inferenceInstanceTypes": ["m5.large"]}, "m5.large not GPU instance types; allowed: g4dn.xlarge"),
        ({"inferenceInstanceTypes": ["g6.xlarge", "g6.12xlarge"]}, "must have the same GPU count"),
        ({"environment": None}, "llm-platform:environment: required key is missing"),
        ({"azCount": 1}, "llm-platform:azCount = 1: must be between 2 and 4"),
        ({"azCount": "two"}, "llm-platform:azCount = 'two': must be an integer"),
        ({"servingOnEks": "yes"}, "llm-platform:servingOnEks = 'yes': must be true or false"),
        ({"natGateways": "many"}, "llm-platform:natGateways = 'many': must be one of single, perAz"),
        ({"kubernetesVersion": "1.20"}, "llm-platform:kubernetesVersion = '1.20': must be one of"),
        ({"publicApiEndpoint": True, "publicApiCidrs": []}, "a public API endpoint needs publicApiCidrs"),
        ({"maxGpus": 2}, "the GPU pools can reach 4 GPUs at their maximum sizes"),
        ({"servingGpusPerReplica": 2}, "an inference node has only 1 GPU(s)"),
        ({"trainingEfa": True}, "EFA is not supported by g6e.xlarge, g6e.2xlarge"),
        ({"servingImageTag": "latest"}, "must be a valid, immutable image tag (not 'latest')"),
        ({"servingModelPrefix": "../etc"}, "must be a relative S3 key prefix"),
        ({"sagemakerMinInstances": 0}, "real-time endpoints cannot scale to zero"),
        ({"clusterAdminArns": ["admin"]}, "clusterAdminArns contains 'admin': not an IAM role or user ARN"),
        ({"flowLogRetentionDays": 10}, "must be one of CloudWatch's retention values"),
        ({"controlPlaneLogRetentionDays": 10}, "llm-platform:controlPlaneLogRetentionDays = 10: must be one of"),
        ({"serviceCidr": "10.0.128.0/17"}, "llm-platform:serviceCidr = '10.0.128.0/17': overlaps llm-platform:vpcCidr"),
        ({"serviceCidr": "172.20.0.0/8"}, "llm-platform:serviceCidr = '172.20.0.0/8': not a valid CIDR"),
        ({"serviceCidr": "100.64.0.0/16"}, "must be a private IPv4 CIDR between /12 and /24"),
    ],
)
def test_each_rule_names_key_value_and_fix(overrides: dict[str, Any], expected: str) -> None:
    assert expected in problems(**overrides)


def test_unknown_key_is_rejected_with_a_suggestion() -> None:
    message = problems(natgateways="single")
    assert "llm-platform:natgateways: unknown key (did you mean 'llm-platform:natGateways'?)" in message


def test_production_requires_protected_data() -> None:
    message = problems("prod", protectData=False, forceDestroyBuckets=True)
    assert "llm-platform:protectData = False: must be true when production is true" in message
    assert "llm-platform:forceDestroyBuckets = True: must be false when production is true" in message


def test_all_problems_are_reported_at_once() -> None:
    message = problems(trainingMinSize=5, natGateways="many", azCount=9)
    assert message.count("\n  - ") >= 3


def test_region_is_required() -> None:
    values, source = load_stack_file("dev")
    del values["aws:region"]
    with pytest.raises(ConfigError, match="aws:region: required key is missing"):
        load_config(values, "dev", source)


def test_engine_strings_are_accepted() -> None:
    """The Pulumi engine passes every value as a string; structured values as JSON."""
    values, source = load_stack_file("dev")
    values = config_strings(values)
    values[P + "trainingInstanceTypes"] = '["g6e.xlarge"]'
    cfg = load_config(values, "dev", source)
    assert cfg.cluster.pool("training").instance_types == ("g6e.xlarge",)
    assert cfg.network.az_count == 2 and cfg.storage.force_destroy is True


def test_bad_config_registers_no_resource() -> None:
    from infra.program import build

    values, _ = load_stack_file("dev")
    values[P + "trainingMinSize"] = 9
    mocks = RecordingMocks("us-east-1")
    with pytest.raises(ConfigError, match="trainingMinSize"):
        run_program(build, values, "dev", "llm-platform", "us-east-1", mocks=mocks)
    assert mocks.resources == {}


def test_preview_cli_exits_2_naming_the_key(tmp_path) -> None:
    values, _ = load_stack_file("dev")
    values[P + "inferenceCapacityType"] = "CHEAP"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"config": values}))
    proc = subprocess.run(
        [sys.executable, "-m", "ops.preview", "dev", "--config-file", str(bad)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "llm-platform:inferenceCapacityType = 'CHEAP': must be one of ON_DEMAND, SPOT" in proc.stderr
    assert proc.stdout == ""


def test_every_key_is_documented_and_typed() -> None:
    for key in schema().values():
        assert key.description.strip(), key.name
        assert key.type in ("string", "integer", "boolean", "array"), key.name
        if key.type == "array":
            assert key.items == "string", key.name


DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("servingImageDigest", "sha256:abc"),
        ("servingImageDigest", "sha256:" + "A" * 64),
        ("trainingImageDigest", "0123456789abcdef" * 4),
        ("trainingImageDigest", "sha512:" + "0" * 64),
    ],
)
def test_image_digests_must_be_sha256(key: str, value: str) -> None:
    message = problems("dev", **{key: value})
    assert f"{P}{key} = {value!r}: must be an image digest sha256:<64 lowercase hex digits>" in message


def test_image_digests_are_read() -> None:
    cfg = load("dev", servingImageDigest=DIGEST, trainingImageDigest=DIGEST)
    assert (cfg.images.serving_digest, cfg.images.training_digest) == (DIGEST, DIGEST)
    assert load("dev").images.serving_digest == ""


def test_production_serves_its_image_by_digest() -> None:
    assert f"{P}servingImageDigest is not set: a production stack references its serving image by digest" in problems(
        "prod", servingImageTag="1.0.0", servingImageDigest=None
    )
    # A production stack that serves nothing needs no serving digest.
    load("prod", servingImageTag="1.0.0", servingImageDigest=None, servingOnEks=False, servingOnSagemaker=False)
    # Non-production stacks may use tags.
    assert load("dev").images.serving_digest == ""
