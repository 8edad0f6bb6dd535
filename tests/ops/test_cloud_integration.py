"""Real-cloud integration: an ephemeral stack from the dev config goes up, is checked with boto3, is torn down with
ops.teardown, and the sweep must find nothing.

The test marked `cloud` needs the Pulumi CLI and AWS credentials and skips with the reason when either is missing
(nightly.yml runs it). Its pure parts (skip detection, stack naming, config copying, the boto3 checks) are tested
below without a cloud: the checks against a moto server, so they are known to fail on a bad resource.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import pytest

from infra import outputs as keys
from infra.layers import cluster_stack
from ops import automation, teardown
from ops.net import free_port
from tests.helpers import REPO_ROOT

RUN_ID_ENV = "LLM_PLATFORM_ITEST_RUN_ID"
CLIENT_CIDR_ENV = "LLM_PLATFORM_ITEST_CLIENT_CIDR"
# Kubernetes taint effects as the EKS API spells them.
EKS_EFFECTS = {"NoSchedule": "NO_SCHEDULE", "NoExecute": "NO_EXECUTE", "PreferNoSchedule": "PREFER_NO_SCHEDULE"}


# ---- when to skip ----------------------------------------------------------------------------------------------


def skip_reason(
    which: Callable[[str], str | None] = shutil.which,
    session_factory: Callable[[], Any] = botocore.session.get_session,
    environ: Mapping[str, str] = os.environ,
) -> str | None:
    """Why the real-cloud test cannot run here, or None. Makes no network call.

    Credentials are looked up with botocore's own resolution chain (env, profiles, SSO cache, web identity ...)
    minus the EC2 instance-metadata provider, whose lookup is an HTTP call that hangs for seconds off EC2.
    """
    if which("pulumi") is None:
        return "the Pulumi CLI is not on PATH (install it, or use the pulumi/actions step as nightly.yml does)"
    if environ.get("AWS_ENDPOINT_URL"):
        return f"AWS_ENDPOINT_URL points at an emulator ({environ['AWS_ENDPOINT_URL']}); this test needs real AWS"
    session = session_factory()
    resolver = session.get_component("credential_provider")
    if environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "false":
        resolver.remove("iam-role")
    try:
        credentials = resolver.load_credentials()
    except Exception as exc:  # a broken profile is a reason to skip, not to crash the suite
        return f"AWS credentials could not be resolved: {exc}"
    if credentials is None:
        return "no AWS credentials (none in the environment, shared config/credentials files, SSO or web identity)"
    return None


# ---- the checks on real resources (each returns problems; [] means good) ---------------------------------------


def bucket_problems(s3: Any, bucket: str) -> list[str]:
    """Encrypted with KMS by default, and every public access path blocked."""
    problems = []
    try:
        rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
        algos = {r["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] for r in rules}
        if not algos & {"aws:kms", "aws:kms:dsse"}:
            problems.append(f"s3://{bucket}: default encryption is {sorted(algos)}, not KMS")
    except s3.exceptions.ClientError as err:
        problems.append(f"s3://{bucket}: no default encryption ({err.response['Error']['Code']})")
    try:
        block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        off = sorted(k for k, v in block.items() if not v)
        if off:
            problems.append(f"s3://{bucket}: public access block off for {off}")
    except s3.exceptions.ClientError:
        problems.append(f"s3://{bucket}: no public access block")
    return problems


def cluster_problems(eks: Any, cluster: str, gpu_pools: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Secrets envelope-encrypted with KMS; each GPU pool's node group carries the labels and taints the stack
    exports for it (what workloads select and tolerate)."""
    problems = []
    desc = eks.describe_cluster(name=cluster)["cluster"]
    if not any(
        "secrets" in c.get("resources", []) and c.get("provider", {}).get("keyArn")
        for c in desc.get("encryptionConfig", [])
    ):
        problems.append(f"cluster {cluster}: Secrets are not envelope-encrypted with a KMS key")
    groups = [
        eks.describe_nodegroup(clusterName=cluster, nodegroupName=n)["nodegroup"]
        for n in eks.list_nodegroups(clusterName=cluster)["nodegroups"]
    ]
    for pool, spec in gpu_pools.items():
        wanted_labels = dict(spec.get("labels") or {})
        matches = [g for g in groups if wanted_labels.items() <= (g.get("labels") or {}).items()]
        if not matches:
            problems.append(f"GPU pool {pool}: no node group carries labels {wanted_labels}")
            continue
        wanted = {(t["key"], t.get("value"), EKS_EFFECTS.get(t["effect"], t["effect"])) for t in spec["taints"]}
        for g in matches:
            have = {(t["key"], t.get("value"), t["effect"]) for t in g.get("taints") or []}
            if not wanted <= have:
                problems.append(f"node group {g['nodegroupName']}: taints {sorted(have)} lack {sorted(wanted - have)}")
    return problems


def endpoint_problems(url: str, ca_pem: bytes | None = None, timeout: float = 10) -> list[str]:
    """The endpoint answers HTTP(S) at all. An auth error is fine (reachable); a refused connection is not."""
    context = ssl.create_default_context(cadata=ca_pem.decode()) if ca_pem else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            status = resp.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError) as err:
        return [f"{url}: unreachable ({err})"]
    return [] if status < 500 else [f"{url}: answered HTTP {status}"]


def check_stack(outputs: Mapping[str, Any], session: Any) -> list[str]:
    """Every check of the deployed stack, from its outputs."""
    s3, eks = session.client("s3"), session.client("eks")
    problems: list[str] = []
    for key in (keys.DATASETS_BUCKET, keys.CHECKPOINTS_BUCKET, keys.MODELS_BUCKET):
        problems += bucket_problems(s3, outputs[key])
    cluster = outputs[keys.CLUSTER_NAME]
    problems += cluster_problems(eks, cluster, outputs.get(keys.GPU_POOLS) or {})
    ca = eks.describe_cluster(name=cluster)["cluster"]["certificateAuthority"]["data"]
    problems += endpoint_problems(outputs[keys.CLUSTER_ENDPOINT].rstrip("/") + "/version", base64.b64decode(ca))
    return problems


def itest_overrides(client_cidr: str) -> dict[str, Any]:
    """What the ephemeral copy of dev changes: the API endpoint must admit this runner to be checked at all. The
    runner's egress address holds for the job's lifetime, and the stack lives no longer than the job, so the
    public-allowlist path fits here (infra/access.py); no in-VPC runner is created for it."""
    return {
        f"{automation.PROJECT}:kubernetesDeployer": "public-allowlist",
        f"{automation.PROJECT}:publicApiEndpoint": True,
        f"{automation.PROJECT}:publicApiCidrs": [client_cidr],
    }


def _client_cidr() -> str:
    if os.environ.get(CLIENT_CIDR_ENV):
        return os.environ[CLIENT_CIDR_ENV]
    with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=10) as resp:
        return resp.read().decode().strip() + "/32"


# ---- the real-cloud test ---------------------------------------------------------------------------------------


@pytest.mark.cloud
def test_ephemeral_dev_stack_up_check_teardown_sweep() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    import pulumi.automation as auto

    name = automation.ephemeral_stack_name("itest", os.environ.get(RUN_ID_ENV) or f"local-{int(time.time())}")
    copied = automation.copy_stack_config(automation.read_stack_config("dev"), itest_overrides(_client_cidr()))
    assert not copied.skipped_secrets, f"dev holds secrets the copy cannot carry: {copied.skipped_secrets}"
    # Both layers (infra/layers.py): the AWS layer `<name>`, then the cluster layer `<name>-cluster`, which reads it
    # through a StackReference. This job reaches the public endpoint (itest_overrides), so it may apply both.
    layers = [name, cluster_stack(name)]
    stacks = {}
    problems: list[str] = []
    try:
        for layer in layers:
            stacks[layer] = auto.create_stack(stack_name=layer, work_dir=str(REPO_ROOT))
            automation.write_stack_config(layer, copied.plain)  # after create_stack, which may have added a salt
        result = stacks[name].up(on_output=print, color="never")
        outputs = {k: v.value for k, v in result.outputs.items()}
        stacks[cluster_stack(name)].up(on_output=print, color="never")
        problems = check_stack(outputs, boto3.Session(region_name=outputs[keys.REGION]))
    finally:
        # Teardown runs whatever happened above (cluster layer, AWS layer, sweep): an ephemeral environment must never
        # outlive its test.
        out, err = io.StringIO(), io.StringIO()
        code = teardown.main([name, "--force", "--json"], out=out, err=err)
        print(err.getvalue())
        report = json.loads(out.getvalue() or "{}")
        for layer, stack in reversed(stacks.items()):
            if code == teardown.EXIT_CLEAN:
                stack.workspace.remove_stack(layer)
            automation.stack_file(layer).unlink(missing_ok=True)
    assert problems == [], "\n".join(problems)
    assert code == teardown.EXIT_CLEAN and report.get("clean"), json.dumps(report, indent=2)


# ---- unit tests of the pure parts (run everywhere) -------------------------------------------------------------


class _Session:
    def __init__(self, creds: object) -> None:
        self.resolver = _Resolver(creds)

    def get_component(self, name: str) -> Any:
        assert name == "credential_provider"
        return self.resolver


class _Resolver:
    def __init__(self, creds: object) -> None:
        self.creds, self.removed = creds, []

    def remove(self, name: str) -> None:
        self.removed.append(name)

    def load_credentials(self) -> object:
        if isinstance(self.creds, Exception):
            raise self.creds
        return self.creds


def test_skip_reasons_are_specific() -> None:
    on_path = lambda _: "/usr/bin/pulumi"  # noqa: E731
    assert "Pulumi CLI is not on PATH" in skip_reason(lambda _: None, lambda: _Session(object()), {})
    assert "no AWS credentials" in skip_reason(on_path, lambda: _Session(None), {})
    assert "emulator" in skip_reason(on_path, lambda: _Session(object()), {"AWS_ENDPOINT_URL": "http://127.0.0.1:5000"})
    assert "could not be resolved" in skip_reason(on_path, lambda: _Session(ValueError("bad profile")), {})
    session = _Session(object())
    assert skip_reason(on_path, lambda: session, {}) is None
    assert session.resolver.removed == ["iam-role"]  # no instance-metadata HTTP call


def test_skip_detection_uses_botocore_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_ENDPOINT_URL",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    started = time.monotonic()
    assert "no AWS credentials" in (skip_reason(lambda _: "/usr/bin/pulumi") or "")
    assert time.monotonic() - started < 2, "credential detection must not wait on the network"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    assert skip_reason(lambda _: "/usr/bin/pulumi") is None


def test_the_real_test_skips_here_with_a_reason() -> None:
    if shutil.which("pulumi"):
        pytest.skip("the Pulumi CLI is installed here: the real test may run")
    assert "Pulumi CLI" in (skip_reason() or "")


@pytest.mark.parametrize(
    ("prefix", "run_id", "expected"),
    [
        ("itest", "123456-1", "itest-123456-1"),
        ("itest", "Local_Run.7", "itest-local-run-7"),
        ("itest", "--weird//id--", "itest-weird-id"),
        ("itest", "9" * 80, "itest-" + "9" * 34),
    ],
)
def test_ephemeral_stack_names(prefix: str, run_id: str, expected: str) -> None:
    name = automation.ephemeral_stack_name(prefix, run_id)
    assert name == expected and len(name) <= 40


def test_ephemeral_stack_name_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        automation.ephemeral_stack_name("9", "!!!")


def test_config_copy_drops_secrets_and_production_and_applies_overrides() -> None:
    source = {
        "aws:region": "us-east-1",
        "llm-platform:production": True,
        "llm-platform:publicApiCidrs": ["203.0.113.0/24"],
        "llm-platform:apiKey": {"secure": "v1:abc"},
    }
    copied = automation.copy_stack_config(source, itest_overrides("1.2.3.4/32"))
    assert copied.skipped_secrets == ("llm-platform:apiKey",)
    assert copied.plain["llm-platform:production"] is False
    assert copied.plain["llm-platform:publicApiCidrs"] == ["1.2.3.4/32"]
    assert "llm-platform:apiKey" not in copied.plain


def test_written_stack_config_keeps_types_and_the_clis_keys(tmp_path: Path) -> None:
    (tmp_path / "Pulumi.itest-1.yaml").write_text("encryptionsalt: v1:abc\nconfig:\n  aws:region: eu-west-1\n")
    copied = automation.copy_stack_config(automation.read_stack_config("dev"), itest_overrides("1.2.3.4/32"))
    path = automation.write_stack_config("itest-1", copied.plain, stacks_dir=tmp_path)
    import yaml

    doc = yaml.safe_load(path.read_text())
    assert doc["encryptionsalt"] == "v1:abc"
    assert doc["config"]["llm-platform:publicApiCidrs"] == ["1.2.3.4/32"]  # a list, not a JSON string
    assert doc["config"]["llm-platform:production"] is False
    assert automation.read_stack_config("itest-1", stacks_dir=tmp_path) == copied.plain


def test_dev_config_copies_cleanly() -> None:
    copied = automation.copy_stack_config(automation.read_stack_config("dev"), itest_overrides("1.2.3.4/32"))
    assert copied.skipped_secrets == ()
    assert copied.plain["aws:region"] and copied.plain["llm-platform:production"] is False
    # The program's own validation accepts the copy, so `up` will not fail on config after resources were paid for.
    from infra.config import load_config

    cfg = load_config(copied.plain, stack=automation.ephemeral_stack_name("itest", "1-1"))
    assert cfg.production is False and cfg.cluster.public_api_cidrs == ("1.2.3.4/32",)
    assert cfg.cluster.deployer == "public-allowlist" and cfg.cluster.public_api_endpoint


def test_ttl_selection() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    ages = [
        automation.StackAge("dev", now - timedelta(hours=13)),
        automation.StackAge("org/llm-platform/dev-alice", now - timedelta(hours=30)),
        automation.StackAge("dev-bob", now - timedelta(hours=2)),
        automation.StackAge("itest-1-1", now - timedelta(hours=13), update_in_progress=True),
        automation.StackAge("itest-2-1", None),
        automation.StackAge("staging", now - timedelta(days=30)),
        automation.StackAge("prod", now - timedelta(days=30)),
        automation.StackAge("devtools", datetime(2026, 11, 1)),  # naive: read as UTC; "dev*" is not a pattern
    ]
    assert automation.expired_stacks(ages, now, timedelta(hours=12)) == ["dev", "dev-alice"]
    assert automation.expired_stacks(ages, now, timedelta(hours=12), ["staging"]) == ["staging"]


# ---- the boto3 checks, against moto: they pass on good resources and name what is wrong on bad ones ------------


def test_bucket_checks(aws_env: str) -> None:
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="itest-good")
    s3.put_bucket_encryption(
        Bucket="itest-good",
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": "alias/x"}}]
        },
    )
    s3.put_public_access_block(
        Bucket="itest-good",
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    assert bucket_problems(s3, "itest-good") == []
    s3.create_bucket(Bucket="itest-bad")
    s3.put_bucket_encryption(
        Bucket="itest-bad",
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )
    s3.put_public_access_block(
        Bucket="itest-bad",
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": False,
            "RestrictPublicBuckets": True,
        },
    )
    problems = bucket_problems(s3, "itest-bad")
    assert len(problems) == 2 and "not KMS" in problems[0] and "BlockPublicPolicy" in problems[1]


def test_cluster_checks(aws_env: str) -> None:
    eks = boto3.client("eks", region_name="us-east-1")
    role = "arn:aws:iam::123456789012:role/eks"
    vpc_config = {"subnetIds": ["subnet-1", "subnet-2"]}
    eks.create_cluster(
        name="itest-good",
        roleArn=role,
        resourcesVpcConfig=vpc_config,
        encryptionConfig=[
            {"resources": ["secrets"], "provider": {"keyArn": "arn:aws:kms:us-east-1:123456789012:key/k"}}
        ],
    )
    eks.create_cluster(name="itest-bad", roleArn=role, resourcesVpcConfig=vpc_config)
    pools = {
        "inference": {
            "labels": {"llm-platform/pool": "inference"},
            "taints": [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}],
        }
    }
    for cluster, taints in (
        ("itest-good", [{"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}]),
        ("itest-bad", []),
    ):
        eks.create_nodegroup(
            clusterName=cluster,
            nodegroupName="gpu",
            nodeRole=role,
            subnets=["subnet-1"],
            labels={"llm-platform/pool": "inference"},
            taints=taints,
        )
    assert cluster_problems(eks, "itest-good", pools) == []
    problems = cluster_problems(eks, "itest-bad", pools)
    assert any("not envelope-encrypted" in p for p in problems)
    assert any("lack" in p and "nvidia.com/gpu" in p for p in problems)
    assert (
        "no node group carries labels"
        in cluster_problems(
            eks, "itest-good", {"training": {"labels": {"llm-platform/pool": "training"}, "taints": []}}
        )[0]
    )


@pytest.fixture
def local_http() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401 if self.path == "/version" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_endpoint_checks(local_http: str) -> None:
    assert endpoint_problems(local_http + "/version") == []  # 401: reachable, just not anonymous
    assert "HTTP 503" in endpoint_problems(local_http + "/other")[0]
    nothing_listening = free_port()
    assert "unreachable" in endpoint_problems(f"http://127.0.0.1:{nothing_listening}/version", timeout=2)[0]
