"""Network component: zones, subnets, NAT per environment, endpoints, flow logs."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from facts import pulumi_types as tok
from infra.config import ConfigError, load_stack
from infra.identity import DELETE, LIST, READ, WRITE
from infra.network import INTERFACE_ENDPOINT_SERVICES, plan_collector_subnets, plan_subnets, read_only_buckets
from policy.rules import iam_document_violations


@pytest.mark.parametrize("az_count", [2, 3, 4])
@pytest.mark.parametrize("cidr", ["10.0.0.0/16", "172.16.0.0/18", "192.168.0.0/20"])
def test_subnet_plan_is_disjoint_and_inside_the_vpc(cidr: str, az_count: int) -> None:
    private, public = plan_subnets(cidr, az_count)
    nets = [ipaddress.ip_network(c) for c in private + public]
    assert len(private) == len(public) == az_count
    vpc = ipaddress.ip_network(cidr)
    assert all(n.subnet_of(vpc) for n in nets)
    assert not any(a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1 :])
    # Pods take VPC addresses (VPC CNI): private subnets must be much larger than public ones.
    assert ipaddress.ip_network(private[0]).num_addresses >= 8 * ipaddress.ip_network(public[0]).num_addresses


def test_subnets_per_zone_with_load_balancer_tags(shipped) -> None:
    cfg, run = shipped
    subnets = run.of_type(tok.EC2_SUBNET)
    public = [s for s in subnets if "public" in s.name]
    private = [s for s in subnets if "private" in s.name]
    assert len(public) == len(private) == cfg.network.az_count
    assert len({s.inputs["availabilityZone"] for s in private}) == cfg.network.az_count
    assert all(s.inputs["tags"]["kubernetes.io/role/elb"] == "1" for s in public)
    assert all(s.inputs["tags"]["kubernetes.io/role/internal-elb"] == "1" for s in private)
    assert not any(s.inputs.get("mapPublicIpOnLaunch") for s in subnets)


def test_nat_gateways_follow_config(shipped) -> None:
    cfg, run = shipped
    nats = run.of_type(tok.EC2_NAT_GATEWAY)
    assert len(nats) == cfg.network.nat_gateway_count
    assert len(run.of_type(tok.EC2_EIP)) == len(nats)
    routes = run.of_type(tok.EC2_ROUTE_TABLE)
    private_routes = [r for r in routes if "private" in r.name]
    assert len(private_routes) == cfg.network.az_count
    used = {r.inputs["routes"][0]["natGatewayId"] for r in private_routes}
    assert len(used) == cfg.network.nat_gateway_count


def test_nat_mode_is_visible_between_dev_and_prod(run_stack) -> None:
    assert len(run_stack("dev").of_type(tok.EC2_NAT_GATEWAY)) == 1
    assert len(run_stack("prod").of_type(tok.EC2_NAT_GATEWAY)) == 3


def test_endpoints(shipped) -> None:
    cfg, run = shipped
    endpoints = run.of_type(tok.EC2_VPC_ENDPOINT)
    gateway = [e for e in endpoints if e.inputs["vpcEndpointType"] == "Gateway"]
    interface = [e for e in endpoints if e.inputs["vpcEndpointType"] == "Interface"]
    assert [e.inputs["serviceName"] for e in gateway] == [f"com.amazonaws.{cfg.region}.s3"]
    assert len(gateway[0].inputs["routeTableIds"]) == cfg.network.az_count
    expected = {f"com.amazonaws.{cfg.region}.{s}" for s in INTERFACE_ENDPOINT_SERVICES}
    assert {e.inputs["serviceName"] for e in interface} == (expected if cfg.network.interface_endpoints else set())
    assert all(e.inputs["privateDnsEnabled"] for e in interface)


def test_interface_endpoints_switch(run_stack) -> None:
    run = run_stack("dev", {"llm-platform:interfaceEndpoints": False})
    types = [e.inputs["vpcEndpointType"] for e in run.of_type(tok.EC2_VPC_ENDPOINT)]
    assert types == ["Gateway"]


def test_flow_logs_encrypted_with_retention(shipped) -> None:
    cfg, run = shipped
    flow = run.one(tok.EC2_FLOW_LOG)
    group = run.one(tok.CLOUDWATCH_LOG_GROUP, "network-flow-logs")
    assert flow.inputs["trafficType"] == "ALL"
    assert flow.inputs["logDestination"].startswith("arn:aws:logs:")
    assert group.inputs["retentionInDays"] == cfg.network.flow_log_retention_days
    assert group.inputs["kmsKeyId"] == run.outputs["kms_key_arn"]


def test_endpoint_security_group_admits_only_https_from_the_vpc(shipped) -> None:
    cfg, run = shipped
    if not cfg.network.interface_endpoints:  # dev: none (its NAT carries that traffic)
        assert not [r for r in run.of_type(tok.EC2_SECURITY_GROUP) if r.name == "network-endpoints-sg"]
        return
    sg = run.one(tok.EC2_SECURITY_GROUP, "network-endpoints-sg")
    (rule,) = sg.inputs["ingress"]
    assert (rule["fromPort"], rule["toPort"], rule["protocol"]) == (443, 443, "tcp")
    assert rule["cidrBlocks"] == [cfg.network.vpc_cidr]


def test_pod_identity_has_its_eks_auth_endpoint(run_stack) -> None:
    # The Pod Identity agent gets workload credentials from eks-auth (AssumeRoleForPodIdentity), not from STS: with
    # interface endpoints on (no path to AWS but through them), a missing eks-auth endpoint leaves pods credential-less.
    run = run_stack("dev", {"llm-platform:interfaceEndpoints": True})
    names = {e.inputs["serviceName"] for e in run.of_type(tok.EC2_VPC_ENDPOINT)}
    assert "com.amazonaws.us-east-1.eks-auth" in names
    assert "eks-auth" in INTERFACE_ENDPOINT_SERVICES


def _endpoint_policy(run) -> dict:
    (gateway,) = [e for e in run.of_type(tok.EC2_VPC_ENDPOINT) if e.inputs["vpcEndpointType"] == "Gateway"]
    return json.loads(gateway.inputs["policy"])


def test_s3_gateway_endpoint_admits_only_the_stack_buckets_and_image_layers(shipped) -> None:
    cfg, run = shipped
    doc = _endpoint_policy(run)
    assert iam_document_violations(doc) == []
    assert all(st["Effect"] == "Allow" and st["Principal"] == "*" for st in doc["Statement"])
    stack = next(st for st in doc["Statement"] if st["Sid"] == "StackBuckets")
    arns = sorted(f"arn:aws:s3:::{run.outputs[k + '_bucket']}" for k in ("datasets", "checkpoints", "models"))
    assert stack["Resource"] == [r for a in arns for r in (a, f"{a}/*")]
    aws_owned = next(st for st in doc["Statement"] if st["Sid"] == "ImageLayersAndPackagesRead")
    assert aws_owned["Action"] == ["s3:GetObject"]
    # ECR serves image layers from this AWS-owned bucket (ECR user guide); without it no node pulls any image.
    assert f"arn:aws:s3:::prod-{cfg.region}-starport-layer-bucket/*" in aws_owned["Resource"]
    assert f"arn:aws:s3:::prod-registry-k8s-io-{cfg.region}/*" in aws_owned["Resource"]
    assert aws_owned["Resource"] == [f"arn:aws:s3:::{b}/*" for b in read_only_buckets(cfg.region)]
    # Nothing else: every resource is one of these buckets' ARNs, never a wildcard bucket.
    assert {r for st in doc["Statement"] for r in st["Resource"]} == set(stack["Resource"]) | set(aws_owned["Resource"])


def test_s3_endpoint_allows_every_s3_action_the_stack_roles_are_granted(shipped) -> None:
    # The endpoint policy must not silently break a workload: whatever S3 action a role of this stack may perform on
    # a stack bucket, the endpoint admits it.
    _, run = shipped
    allowed = set(next(st for st in _endpoint_policy(run)["Statement"] if st["Sid"] == "StackBuckets")["Action"])
    granted = set()
    # The replication role is assumed by S3 itself, whose replication traffic never passes the VPC's endpoint.
    for policy in (p for p in run.of_type(tok.IAM_ROLE_POLICY) if p.name != "backup-replication-policy"):
        for st in json.loads(policy.inputs["policy"])["Statement"]:
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            granted |= {a for a in actions if a.startswith("s3:")}
    assert granted and granted <= allowed
    assert allowed == set(READ + WRITE + DELETE + LIST)


@pytest.mark.parametrize("az_count", [2, 3, 4])
@pytest.mark.parametrize("cidr", ["10.0.0.0/16", "172.16.0.0/18", "192.168.0.0/20"])
def test_collector_subnets_hold_no_node(cidr: str, az_count: int) -> None:
    # The managed collector's subnets must not overlap any subnet a node (and so a pod, with the VPC CNI) lives in:
    # the network policies admit these CIDRs as "the collector".
    private, public = plan_subnets(cidr, az_count)
    collectors = [ipaddress.ip_network(c) for c in plan_collector_subnets(cidr, az_count)]
    assert len(collectors) == az_count
    others = [ipaddress.ip_network(c) for c in private + public]
    assert all(c.subnet_of(ipaddress.ip_network(cidr)) for c in collectors)
    assert not any(c.overlaps(o) for c in collectors for o in others + [x for x in collectors if x != c])


def test_amp_scraper_sits_in_its_own_subnets_and_has_no_second_access_entry(run_stack) -> None:
    run = run_stack("prod")
    cidr_of = {s.state["arn"].rsplit("/", 1)[1]: s.inputs["cidrBlock"] for s in run.of_type(tok.EC2_SUBNET)}
    scraper = run.one(tok.AMP_SCRAPER).inputs["source"]["eks"]
    assert sorted(cidr_of[i] for i in scraper["subnetIds"]) == sorted(plan_collector_subnets("10.30.0.0/16", 3))
    # No node group (so no pod) uses them.
    used = {i for g in run.of_type(tok.EKS_NODE_GROUP) for i in g.inputs["subnetIds"]}
    assert used and not used & set(scraper["subnetIds"])
    # The cluster authenticates through access entries only, so AMP creates the collector's entry itself; a second
    # one of ours for the same principal fails with ResourceInUseException.
    assert run.one(tok.EKS_CLUSTER).inputs["accessConfig"]["authenticationMode"] == "API"
    assert run.of_type(tok.EKS_ACCESS_ENTRY) == [] or all(
        "scraper" not in e.inputs["principalArn"] for e in run.of_type(tok.EKS_ACCESS_ENTRY)
    )
    # The serving port admits the collector's subnets, not the VPC.
    serving = next(
        p for p in run.of_type(tok.K8S_NETWORK_POLICY) if p.inputs["metadata"]["name"] == "allow-http-ingress"
    )
    peers = serving.inputs["spec"]["ingress"][0]["from"]
    assert {"ipBlock": {"cidr": "10.30.0.0/16"}} not in peers
    assert [p["ipBlock"]["cidr"] for p in peers if "ipBlock" in p] == plan_collector_subnets("10.30.0.0/16", 3)


def test_collector_subnets_only_with_amp(run_stack) -> None:
    assert not [s for s in run_stack("dev").of_type(tok.EC2_SUBNET) if "collector" in s.name]


def test_the_state_bucket_is_reachable_through_the_s3_endpoint_only_when_named(run_stack) -> None:
    """The in-VPC runner reaches S3 of its region only through the gateway endpoint: an S3 state backend there must be
    admitted by its policy (docs/first-deploy.md), and nothing else is."""

    def statements(run: Any) -> dict[str, dict[str, Any]]:
        (gateway,) = [e for e in run.of_type(tok.EC2_VPC_ENDPOINT) if e.inputs["vpcEndpointType"] == "Gateway"]
        return {s["Sid"]: s for s in json.loads(gateway.inputs["policy"])["Statement"]}

    assert "PulumiStateBackend" not in statements(run_stack("dev"))
    named = statements(run_stack("dev", {"llm-platform:stateBucket": "acme-pulumi-state"}))["PulumiStateBackend"]
    assert named["Resource"] == ["arn:aws:s3:::acme-pulumi-state", "arn:aws:s3:::acme-pulumi-state/*"]
    assert "s3:PutObject" in named["Action"] and "s3:ListBucket" in named["Action"]
    with pytest.raises(ConfigError, match="stateBucket"):
        load_stack("dev", stateBucket="s3://acme-pulumi-state")
