"""The teardown sweep against a real moto server, and the teardown command's guards.

The moto account is seeded (tests/ops/conftest.py) with this stack's leftovers, tagged by Pulumi and by the
in-cluster controllers, plus another stack's and untagged resources. The sweep must report exactly the first
group, `--force` must delete them, and the others must survive untouched.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from facts.tags import STACK_TAG, stack_tags
from infra import outputs as keys
from ops import automation, teardown
from ops.sweep import Ownership, arn_parts
from tests.helpers import REPO_ROOT
from tests.ops.conftest import CLUSTER, OTHER_STACK, REGION, STACK, FakeCluster, Seeded


def _by_kind(findings: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in findings:
        out.setdefault(f["kind"], set()).add(f["id"])
    return out


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = teardown.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _sweep_json(*extra: str) -> tuple[int, dict]:
    code, out, _ = _run(STACK, "--sweep-only", "--region", REGION, "--cluster-name", CLUSTER, "--json", *extra)
    return code, json.loads(out)


def _existing(kind: str) -> set[str]:
    """What still exists in moto, straight from the service APIs (not through the code under test)."""
    ec2 = boto3.client("ec2", region_name=REGION)
    if kind == "instance":
        return {
            i["InstanceId"]
            for r in ec2.describe_instances()["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        }
    if kind == "security-group":
        return {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    if kind == "volume":
        return {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    if kind == "network-interface":
        return {n["NetworkInterfaceId"] for n in ec2.describe_network_interfaces()["NetworkInterfaces"]}
    if kind == "elastic-ip":
        return {a["AllocationId"] for a in ec2.describe_addresses()["Addresses"]}
    if kind == "vpc":
        return {v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"]}
    if kind == "bucket":
        return {b["Name"] for b in boto3.client("s3", region_name=REGION).list_buckets()["Buckets"]}
    if kind == "repository":
        return {
            r["repositoryName"] for r in boto3.client("ecr", region_name=REGION).describe_repositories()["repositories"]
        }
    if kind == "load-balancer":
        return {
            lb["LoadBalancerName"]
            for lb in boto3.client("elbv2", region_name=REGION).describe_load_balancers()["LoadBalancers"]
        }
    if kind == "target-group":
        return {
            t["TargetGroupName"]
            for t in boto3.client("elbv2", region_name=REGION).describe_target_groups()["TargetGroups"]
        }
    if kind == "classic-load-balancer":
        return {
            lb["LoadBalancerName"]
            for lb in boto3.client("elb", region_name=REGION).describe_load_balancers()["LoadBalancerDescriptions"]
        }
    sm = boto3.client("sagemaker", region_name=REGION)
    if kind == "endpoint":
        return {e["EndpointName"] for e in sm.list_endpoints()["Endpoints"]}
    if kind == "endpoint-config":
        return {e["EndpointConfigName"] for e in sm.list_endpoint_configs()["EndpointConfigs"]}
    if kind == "model":
        return {m["ModelName"] for m in sm.list_models()["Models"]}
    raise AssertionError(f"no lister for {kind}")


def test_sweep_reports_exactly_this_stacks_leftovers(seeded: Seeded) -> None:
    code, doc = _sweep_json()
    assert code == teardown.EXIT_LEFTOVERS
    assert doc["clean"] is False
    found = _by_kind(doc["leftovers"])
    for kind, ids in (seeded.ours | seeded.ours_not_deletable).items():
        assert ids <= found.get(kind, set()), f"{kind}: missed {ids - found.get(kind, set())}"
    for kind, ids in seeded.survivors.items():
        assert not ids & found.get(kind, set()), f"{kind}: reported another owner's {ids & found.get(kind, set())}"
    # Nothing reported twice (the tagging API catch-all must not repeat what a describe call found).
    ids = [(f["kind"], f["id"]) for f in doc["leftovers"]]
    assert len(ids) == len(set(ids))
    by_id = {f["id"]: f for f in doc["leftovers"]}
    assert by_id["k8s-serving-gateway"]["matched_by"] == f"elbv2.k8s.aws/cluster={CLUSTER}"
    assert by_id["dev-checkpoints-0001"]["extra"] == {"object_versions": 3, "delete_markers": 1}
    assert by_id["dev/serving"]["extra"] == {"images": 2}
    (vpc,) = seeded.ours_not_deletable["vpc"]
    assert by_id[vpc]["deletable"] is False


def test_force_deletes_ours_in_order_and_spares_everyone_else(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    # Both layers' states are empty (destroyed): everything the sweep finds is a leftover.
    monkeypatch.setattr(teardown, "_held_by_state", lambda env, log: set())
    code, out, err = _run(STACK, "--sweep-only", "--force", "--region", REGION, "--cluster-name", CLUSTER)
    # The tagged VPC is reported but left to `pulumi destroy`, so the stack is still not clean.
    assert code == teardown.EXIT_LEFTOVERS, out + err
    for kind, ids in seeded.ours.items():
        assert not ids & _existing(kind), f"{kind}: {ids & _existing(kind)} survived --force"
    for kind, ids in seeded.survivors.items():
        assert ids <= _existing(kind), f"{kind}: {ids - _existing(kind)} of another owner was deleted"
    assert seeded.ours_not_deletable["vpc"] <= _existing("vpc")
    # Dependants went before what they depend on: the deletion log is in DELETE_ORDER.
    deleted = [line.split()[1:3] for line in out.splitlines() if line.strip().startswith("deleted ")]
    kinds = [k for _, k in deleted]
    assert kinds.index("instance") < kinds.index("load-balancer") < kinds.index("target-group")
    assert kinds.index("target-group") < kinds.index("network-interface") < kinds.index("security-group")
    assert kinds.index("endpoint") < kinds.index("endpoint-config") < kinds.index("model")
    code, doc = _sweep_json()
    assert [f["kind"] for f in doc["leftovers"]] == ["vpc"]


def test_scope_narrows_without_a_cluster_name_and_per_stack(seeded: Seeded) -> None:
    # Without the cluster name only Pulumi's stack tag can match: controller-created resources are not claimed.
    _, out, _ = _run(STACK, "--sweep-only", "--region", REGION, "--json")
    found = _by_kind(json.loads(out)["leftovers"])
    assert "k8s-serving-gateway" not in found.get("load-balancer", set())
    assert found["bucket"] == {"dev-checkpoints-0001"}
    # The other stack's sweep sees only its own tag, never ours.
    code, out, _ = _run(OTHER_STACK, "--sweep-only", "--region", REGION, "--json")
    assert code == teardown.EXIT_LEFTOVERS
    leftovers = json.loads(out)["leftovers"]
    assert leftovers and {f["matched_by"] for f in leftovers} == {f"{STACK_TAG}={OTHER_STACK}"}
    # The human report: grouped by service, with ARNs and the tag that made each resource ours.
    code, out, _ = _run(STACK, "--sweep-only", "--region", REGION, "--cluster-name", CLUSTER)
    assert code == teardown.EXIT_LEFTOVERS
    for header in ("[ec2]", "[elb]", "[elbv2]", "[sagemaker]", "[ecr]", "[s3]"):
        assert header in out
    assert "arn:aws:elasticloadbalancing:" in out and "matched by elbv2.k8s.aws/cluster=" in out


def test_clean_account_exits_zero_with_a_readable_report(aws_env: str, moto_reset: None) -> None:
    code, out, _ = _run(STACK, "--sweep-only", "--region", REGION, "--cluster-name", CLUSTER)
    assert code == teardown.EXIT_CLEAN
    assert "nothing left" in out


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (stack_tags("dev", "dev"), f"{STACK_TAG}=dev"),
        (stack_tags("staging", "staging") | {"elbv2.k8s.aws/cluster": CLUSTER}, None),  # another stack's tag wins
        ({"elbv2.k8s.aws/cluster": CLUSTER}, f"elbv2.k8s.aws/cluster={CLUSTER}"),
        ({f"kubernetes.io/cluster/{CLUSTER}": "owned"}, f"kubernetes.io/cluster/{CLUSTER}=owned"),
        ({f"kubernetes.io/cluster/{CLUSTER}": "shared"}, None),
        ({"ebs.csi.aws.com/cluster": "true"}, None),  # names no cluster: could be anyone's
        ({"cluster.k8s.amazonaws.com/name": CLUSTER + "-2"}, None),
        ({}, None),
    ],
)
def test_ownership_rules(tags: dict[str, str], expected: str | None) -> None:
    assert Ownership("dev", CLUSTER).owns(tags) == expected


def test_ownership_rejects_empty_names() -> None:
    with pytest.raises(ValueError):
        Ownership("")
    with pytest.raises(ValueError):
        Ownership("dev", "")


# ---- the command's guards (no AWS call happens before these) -----------------------------------------------


def _stack_file(tmp_path: Path, name: str, production: bool) -> Path:
    d = tmp_path / "stacks"
    d.mkdir(exist_ok=True)
    (d / f"Pulumi.{name}.yaml").write_text(
        f"config:\n  aws:region: {REGION}\n  llm-platform:production: {str(production).lower()}\n"
    )
    return d


def test_production_stack_is_refused_without_confirmation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seeded: Seeded
) -> None:
    monkeypatch.setattr(automation, "STACKS_DIR", _stack_file(tmp_path, "prod", production=True))
    code, _, err = _run("prod", "--sweep-only", "--force")
    assert code == teardown.EXIT_REFUSED and "marked production" in err
    code, _, err = _run("prod", "--sweep-only", "--force", "--confirm-production", "dev")
    assert code == teardown.EXIT_REFUSED and "must repeat the stack name" in err
    # Report-only sweeps of production are harmless and allowed; confirmed destructive runs proceed.
    assert _run("prod", "--sweep-only")[0] == teardown.EXIT_CLEAN
    assert _run("prod", "--sweep-only", "--force", "--confirm-production", "prod")[0] == teardown.EXIT_CLEAN
    # Seeded "dev" leftovers were not touched by the prod runs.
    for kind, ids in seeded.ours.items():
        assert ids <= _existing(kind)


def test_production_output_alone_is_enough_to_refuse(tmp_path: Path, aws_env: str) -> None:
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({keys.PRODUCTION: True, keys.REGION: REGION, keys.CLUSTER_NAME: CLUSTER}))
    code, _, err = _run("ephemeral-x", "--outputs", str(outputs), "--skip-kubernetes")
    assert code == teardown.EXIT_REFUSED and "marked production" in err


def test_missing_cli_says_what_to_do(monkeypatch: pytest.MonkeyPatch, aws_env: str) -> None:
    monkeypatch.setattr(automation, "pulumi_cli", lambda: None)
    code, _, err = _run(STACK)
    assert code == teardown.EXIT_REFUSED
    assert "Pulumi CLI is not on PATH" in err and "--sweep-only" in err


def test_bad_usage_exits_2() -> None:
    assert _run()[0] == teardown.EXIT_REFUSED
    assert _run("dev", "--expired")[0] == teardown.EXIT_REFUSED
    assert _run("dev", "--no-such-flag")[0] == teardown.EXIT_REFUSED


def test_module_entry_point_runs(aws_env: str, moto_reset: None) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ops.teardown", STACK, "--sweep-only", "--region", REGION, "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == teardown.EXIT_CLEAN, proc.stderr
    assert json.loads(proc.stdout)["clean"] is True
    assert "== sweep us-east-1 for leftovers" in proc.stderr


@pytest.mark.parametrize(
    ("arn", "parts"),
    [
        ("arn:aws:ec2:us-east-1:123456789012:instance/i-0abc", ("ec2", "instance", "i-0abc")),
        ("arn:aws:s3:::dev-models", ("s3", "bucket", "dev-models")),
        (
            "arn:aws:elasticloadbalancing:us-east-1:1:loadbalancer/app/gw/0f1e",
            ("elasticloadbalancing", "loadbalancer", "app/gw/0f1e"),
        ),
        ("arn:aws:logs:us-east-1:1:log-group:/aws/eks/dev/cluster", ("logs", "log-group", "/aws/eks/dev/cluster")),
        ("arn:aws:kms:us-east-1:1:key/1234-abcd", ("kms", "key", "1234-abcd")),
    ],
)
def test_arn_parts(arn: str, parts: tuple[str, str, str]) -> None:
    assert arn_parts(arn) == parts


def test_full_teardown_runs_phases_in_order(
    monkeypatch: pytest.MonkeyPatch, aws_env: str, moto_reset: None, kube_cluster: FakeCluster
) -> None:
    """Kubernetes cleanup, then destroy, then sweep; the CLI-backed steps are replaced, the sweep is real."""
    events: list[str] = []
    cluster = kube_cluster
    monkeypatch.setattr(automation, "pulumi_cli", lambda: "/usr/local/bin/pulumi")
    monkeypatch.setattr(
        automation,
        "stack_outputs",
        lambda stack: {
            keys.REGION: REGION,
            keys.CLUSTER_NAME: CLUSTER,
            keys.KUBECONFIG: "{}",
            keys.TAGS: stack_tags(stack, "dev"),
        },
    )
    monkeypatch.setattr(teardown, "kube_clients", lambda kubeconfig: (events.append("kube") or cluster, cluster))
    monkeypatch.setattr(
        automation, "destroy", lambda stack, on_output, env=None: events.append(f"destroy {stack} {env}") or {}
    )
    code, out, err = _run(STACK, "--wait-timeout", "5", "--poll", "0.01")
    assert code == teardown.EXIT_CLEAN, out + err
    # The cluster layer (objects owning AWS resources first, then its stack), then the AWS layer, then the sweep.
    assert events == ["kube", f"destroy {STACK}-cluster None", f"destroy {STACK} None"]
    assert cluster.calls and all(
        ("Service" in c or "Ingress" in c or "Claim" in c or "Pod" in c) for c in cluster.calls
    )
    phases = [line.split(" ")[1] for line in out.splitlines() if line.startswith("== ")]
    assert phases == ["resolve", "delete", "pulumi", "pulumi", "sweep"]
    assert "nothing left" in out


def test_failed_destroy_is_not_reported_clean(monkeypatch: pytest.MonkeyPatch, aws_env: str, moto_reset: None) -> None:
    monkeypatch.setattr(automation, "pulumi_cli", lambda: "/usr/local/bin/pulumi")
    monkeypatch.setattr(automation, "stack_outputs", lambda stack: {keys.REGION: REGION})

    destroys: list[str] = []

    def boom(stack: str, on_output: object, env: object = None) -> dict:
        destroys.append(stack)
        raise RuntimeError("error: the stack is currently locked by 1 lock(s)")

    monkeypatch.setattr(automation, "destroy", boom)
    code, out, _ = _run(STACK)
    assert code == teardown.EXIT_LEFTOVERS
    assert f"problem: pulumi destroy {STACK}-cluster" in out and "locked" in out
    # The AWS layer is never taken from under objects the cluster layer's state still holds.
    assert destroys == [f"{STACK}-cluster"]


def test_destroy_blocked_by_leftovers_is_retried_after_force(
    monkeypatch: pytest.MonkeyPatch, aws_env: str, moto_reset: None
) -> None:
    """Unreachable cluster -> its load balancer survives -> destroy fails on the VPC -> --force removes the LB
    (found by its controller tag) -> the second destroy succeeds -> clean."""
    elbv2, ec2 = boto3.client("elbv2", region_name=REGION), boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.7.{i}.0/24", AvailabilityZone=f"{REGION}{az}")["Subnet"]["SubnetId"]
        for i, az in enumerate("ab")
    ]
    elbv2.create_load_balancer(
        Name="k8s-left-behind", Subnets=subnets, Tags=[{"Key": "elbv2.k8s.aws/cluster", "Value": CLUSTER}]
    )
    destroys: list[str] = []

    def destroy(stack: str, on_output: object, env: object = None) -> dict:
        destroys.append(stack)
        if stack == STACK and elbv2.describe_load_balancers()["LoadBalancers"]:
            raise RuntimeError("deleting subnet: DependencyViolation: has dependencies and cannot be deleted")
        return {"delete": 42}

    def unreachable(kubeconfig: object) -> tuple[object, object]:
        raise ConnectionError("https://private.eks.example: connection timed out")

    monkeypatch.setattr(automation, "pulumi_cli", lambda: "/usr/local/bin/pulumi")
    monkeypatch.setattr(
        automation,
        "stack_outputs",
        lambda stack: {keys.REGION: REGION, keys.CLUSTER_NAME: CLUSTER, keys.KUBECONFIG: "{}"},
    )
    monkeypatch.setattr(teardown, "kube_clients", unreachable)
    monkeypatch.setattr(automation, "destroy", destroy)
    monkeypatch.setattr(automation, "state_resources", lambda stack: [])
    code, out, err = _run(STACK, "--poll", "0.01")  # default 900 s wait: must be skipped, nothing deletes the LB
    assert code == teardown.EXIT_LEFTOVERS, "without --force the blocked destroy and the LB are reported"
    assert "Kubernetes cleanup FAILED" in out and "k8s-left-behind" in out and destroys == [f"{STACK}-cluster", STACK]
    destroys.clear()
    code, out, err = _run(STACK, "--force", "--poll", "0.01")
    assert code == teardown.EXIT_CLEAN, out + err
    assert destroys == [f"{STACK}-cluster", STACK, STACK] and "again, now that the leftovers are gone" in out
    assert elbv2.describe_load_balancers()["LoadBalancers"] == []


def test_expired_mode_tears_down_only_expired_non_production_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    ages = [
        automation.StackAge("dev", now - timedelta(hours=20)),
        automation.StackAge("dev-prodlike", now - timedelta(days=2)),
        automation.StackAge("dev-fresh", now - timedelta(hours=1)),
        automation.StackAge("staging", now - timedelta(days=9)),
    ]
    ages.append(automation.StackAge("dev-cluster", now - timedelta(hours=30)))  # the cluster layer of dev
    torn: list[tuple[str, str, bool, object]] = []
    monkeypatch.setattr(automation, "pulumi_cli", lambda: "/usr/local/bin/pulumi")
    monkeypatch.setattr(automation, "list_stack_ages", lambda: ages)
    monkeypatch.setattr(automation, "read_stack_config", lambda s: {automation.PRODUCTION_KEY: s == "dev-prodlike"})

    def fake(opts: teardown.TeardownOptions, log: object) -> teardown.TeardownResult:
        torn.append((opts.stack, opts.layer, opts.force, opts.confirm_production))
        return teardown.TeardownResult(stack=opts.stack, exit_code=teardown.EXIT_CLEAN)

    monkeypatch.setattr(teardown, "teardown", fake)
    code, out, _ = _run("--expired", "--ttl-hours", "12", "--force", "--layer", "aws")
    assert code == teardown.EXIT_CLEAN
    # The same path as a manual teardown, per environment (both layers' stacks count once), production never.
    assert torn == [("dev", "aws", True, None)]
    assert "skipping 'dev-prodlike': production-marked" in out
    # The TTL workflow lists them first, to run the cluster layer of each on its in-VPC runner.
    code, out, _ = _run("--expired", "--list")
    assert code == teardown.EXIT_CLEAN and json.loads(out.splitlines()[-1]) == ["dev"]
    monkeypatch.setattr(automation, "pulumi_cli", lambda: None)
    assert _run("--expired")[0] == teardown.EXIT_REFUSED


def test_security_group_deletion_waits_for_enis_but_not_for_references(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto lets a referenced group go, so the two DependencyViolation cases are stubbed on a real botocore client."""
    from botocore.stub import Stubber

    from ops import sweep

    sweeper = sweep.Sweeper(
        Ownership(STACK, CLUSTER), REGION, session=boto3.Session(aws_access_key_id="x", aws_secret_access_key="x")
    )
    ec2 = sweeper.client("ec2")
    sleeps: list[float] = []
    monkeypatch.setattr(sweep.time, "sleep", sleeps.append)
    group = {"GroupId": "sg-1", "GroupName": "k8s-traffic", "IpPermissions": [], "IpPermissionsEgress": []}
    busy_eni = {"NetworkInterfaces": [{"NetworkInterfaceId": "eni-1"}]}
    with Stubber(ec2) as stub:
        # An ENI of a just-deleted load balancer still holds it: retried until it lets go.
        stub.add_response("describe_security_groups", {"SecurityGroups": [group]})
        stub.add_client_error("delete_security_group", "DependencyViolation")
        stub.add_response("describe_network_interfaces", busy_eni)
        stub.add_response("delete_security_group", {})
        sweeper._delete_security_group("sg-1", wait_s=600)
        assert sleeps == [10]
        # Only another group's rule references it: fail at once, that group is not ours to edit.
        stub.add_response("describe_security_groups", {"SecurityGroups": [group]})
        stub.add_client_error("delete_security_group", "DependencyViolation")
        stub.add_response("describe_network_interfaces", {"NetworkInterfaces": []})
        with pytest.raises(sweep.ClientError):
            sweeper._delete_security_group("sg-1", wait_s=600)
        assert sleeps == [10]
        stub.assert_no_pending_responses()


# ---- layers, state and refusals (issue 19) ---------------------------------------------------------------------


def test_force_never_deletes_what_a_pulumi_state_still_holds(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AWS layer's state still lists the bucket and the repository (a failed destroy): the sweep reports them but
    leaves them to `pulumi destroy`; the controller's load balancer (no state ever holds one) is deleted."""
    repo_arn = boto3.client("ecr", region_name=REGION).describe_repositories(repositoryNames=["dev/serving"])[
        "repositories"
    ][0]["repositoryArn"]
    states = {
        STACK: [
            {"urn": "urn:pulumi:dev::llm-platform::aws:s3/bucket:Bucket::b", "id": "dev-checkpoints-0001"},
            {"urn": "urn:pulumi:dev::llm-platform::aws:ecr/repository:Repository::r", "outputs": {"arn": repo_arn}},
        ],
        f"{STACK}-cluster": [],
    }
    monkeypatch.setattr(automation, "pulumi_cli", lambda: "/usr/local/bin/pulumi")
    monkeypatch.setattr(
        automation, "stack_outputs", lambda stack: {keys.REGION: REGION, keys.TAGS: stack_tags(STACK, "dev")}
    )
    monkeypatch.setattr(automation, "state_resources", lambda stack: states[stack])
    code, out, err = _run(STACK, "--sweep-only", "--force", "--cluster-name", CLUSTER, "--json")
    doc = json.loads(out)
    assert code == teardown.EXIT_LEFTOVERS, err
    assert {(f["kind"], f["id"]) for f in doc["held_by_state"]} == {
        ("bucket", "dev-checkpoints-0001"),
        ("repository", "dev/serving"),
    }
    assert "dev-checkpoints-0001" in _existing("bucket") and "dev/serving" in _existing("repository")
    assert "k8s-serving-gateway" not in _existing("load-balancer")
    assert seeded.ours["instance"].isdisjoint(_existing("instance"))  # in no state: deleted


def test_force_without_readable_states_deletes_only_what_controllers_created(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No Pulumi CLI: the states cannot be read, so nothing carrying the stack tag (which Pulumi may still hold) goes.
    monkeypatch.setattr(automation, "pulumi_cli", lambda: None)
    code, out, _ = _run(STACK, "--sweep-only", "--force", "--region", REGION, "--cluster-name", CLUSTER, "--json")
    doc = json.loads(out)
    assert code == teardown.EXIT_LEFTOVERS
    assert doc["held_by_state"] and all(f["matched_by"].startswith(STACK_TAG) for f in doc["held_by_state"])
    assert seeded.ours["bucket"] <= _existing("bucket") and seeded.ours["repository"] <= _existing("repository")
    assert "k8s-serving-gateway" not in _existing("load-balancer")


def test_outputs_of_another_stack_are_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs = tmp_path / "dev-outputs.json"
    outputs.write_text(json.dumps({"outputs": {keys.STACK: "dev", keys.TAGS: stack_tags("dev", "dev")}}))
    monkeypatch.setattr(teardown, "Sweeper", lambda *a: pytest.fail("no sweep may run"))
    code, out, err = _run("staging", "--sweep-only", "--force", "--outputs", str(outputs))
    assert code == teardown.EXIT_REFUSED
    assert "holds the outputs of stack 'dev', not 'staging'" in err and "sweep" not in out.lower().split("resolve")[-1]
    # Either layer's name is the same environment.
    assert teardown.read_outputs_file(outputs, "dev-cluster")[keys.STACK] == "dev"


def test_sweep_only_dry_run_without_aws_credentials_exits_2_with_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    outputs = tmp_path / "outputs.json"
    outputs.write_text(
        json.dumps(
            {
                keys.STACK: "dev",
                keys.REGION: REGION,
                keys.CLUSTER_NAME: CLUSTER,
                keys.TRAINING_ROLE_ARN: "arn:aws:iam::210987654321:role/llmp-dev-training",
                keys.TAGS: stack_tags("dev", "dev"),
            }
        )
    )
    code, out, err = _run("dev", "--sweep-only", "--outputs", str(outputs))
    assert code == teardown.EXIT_REFUSED, out + err
    assert "account 210987654321" in out and f"cluster {CLUSTER}" in out
    assert "no AWS credentials" in err and "Traceback" not in err + out
    code, out, err = _run("dev", "--sweep-only", "--outputs", str(outputs), "--account-id", "111122223333")
    assert code == teardown.EXIT_REFUSED and "account 111122223333" in out


def test_the_aws_layer_waits_for_the_cluster_layer_unless_the_cluster_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, aws_env: str, moto_reset: None
) -> None:
    destroys: list[tuple[str, object]] = []
    held = {f"{STACK}-cluster": [{"urn": "urn:pulumi:dev-cluster::llm-platform::kubernetes:core/v1:Namespace::x"}]}
    monkeypatch.setattr(automation, "pulumi_cli", lambda: "/usr/local/bin/pulumi")
    monkeypatch.setattr(automation, "stack_outputs", lambda stack: {keys.REGION: REGION, keys.CLUSTER_NAME: CLUSTER})
    monkeypatch.setattr(automation, "state_resources", lambda stack: held.get(stack, []))
    monkeypatch.setattr(
        automation, "destroy", lambda stack, on_output, env=None: destroys.append((stack, env)) or {"delete": 1}
    )
    code, out, _ = _run(STACK, "--layer", "aws")
    assert code == teardown.EXIT_LEFTOVERS and destroys == []
    assert f"the cluster layer {STACK}-cluster still holds 1 resource(s)" in out
    # The in-VPC runner is gone: the AWS layer first (deleting the cluster; moto has no cluster of that name), then
    # the cluster layer's state is dropped with PULUMI_K8S_DELETE_UNREACHABLE.
    code, out, err = _run(STACK, "--layer", "aws", "--cluster-unreachable")
    assert code == teardown.EXIT_CLEAN, out + err
    assert destroys == [(STACK, None), (f"{STACK}-cluster", {"PULUMI_K8S_DELETE_UNREACHABLE": "true"})]
    assert _run(STACK, "--cluster-unreachable")[0] == teardown.EXIT_REFUSED  # only with --layer aws


def test_the_cluster_layer_alone_destroys_only_the_cluster_layer(
    monkeypatch: pytest.MonkeyPatch, aws_env: str, moto_reset: None
) -> None:
    destroys: list[str] = []
    monkeypatch.setattr(automation, "pulumi_cli", lambda: "/usr/local/bin/pulumi")
    monkeypatch.setattr(automation, "stack_outputs", lambda stack: {keys.REGION: REGION})
    monkeypatch.setattr(automation, "destroy", lambda stack, on_output, env=None: destroys.append(stack) or {})
    monkeypatch.setattr(teardown.Sweeper, "find", lambda self: pytest.fail("the cluster layer's job does not sweep"))
    code, out, err = _run(STACK, "--layer", "cluster")
    assert code == teardown.EXIT_CLEAN, out + err
    assert destroys == [f"{STACK}-cluster"]


def test_every_tool_taking_a_stack_and_an_outputs_file_refuses_another_stacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ops import launch_training

    outputs = tmp_path / "dev-outputs.json"
    outputs.write_text(json.dumps({keys.STACK: "dev", keys.REGION: REGION}))
    argv = ["--stack", "staging", "--outputs", str(outputs), "--target", "eks", "--name", "r", "--data", "s3://b/d"]
    assert launch_training.main([*argv, "--image-tag", "git-0"]) == 2
    assert "holds the outputs of stack 'dev', not 'staging'" in capsys.readouterr().err


def test_each_sweep_kind_is_declared_once_with_everything_it_needs(seeded: Seeded) -> None:
    """The registry (ops.sweep.KINDS) is the one place a kind lives: its ARN type, collector, delete and "freed" check;
    the deletion order and the tagging API's exclusions derive from it. Every kind the collectors report is in it."""
    from ops import sweep

    assert tuple((k.service, k.kind) for k in sweep.KINDS) == sweep.DELETE_ORDER
    assert {k.arn_type for k in sweep.KINDS} == sweep._COVERED
    assert len(sweep.KINDS_BY_KEY) == len(sweep.KINDS)
    assert all(callable(k.collect) and callable(k.delete) for k in sweep.KINDS)
    assert {k.kind for k in sweep.KINDS if k.freed} == {"network-interface", "elastic-ip", "volume"}
    findings = sweep.Sweeper(Ownership(STACK, CLUSTER), REGION).find()
    described = {(f.service, f.kind) for f in findings if not f.note.startswith("not deleted by the sweep")}
    assert described and described <= set(sweep.KINDS_BY_KEY)
    # What only the tagging API found (the VPC) is reported, never deleted.
    assert {(f.service, f.kind) for f in findings} - described == {("ec2", "vpc")}
