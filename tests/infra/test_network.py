"""Network component: zones, subnets, NAT per environment, endpoints, flow logs."""

from __future__ import annotations

import ipaddress

import pytest

from infra.network import INTERFACE_ENDPOINT_SERVICES, plan_subnets


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
    subnets = run.of_type("aws:ec2/subnet:Subnet")
    public = [s for s in subnets if "public" in s.name]
    private = [s for s in subnets if "private" in s.name]
    assert len(public) == len(private) == cfg.network.az_count
    assert len({s.inputs["availabilityZone"] for s in private}) == cfg.network.az_count
    assert all(s.inputs["tags"]["kubernetes.io/role/elb"] == "1" for s in public)
    assert all(s.inputs["tags"]["kubernetes.io/role/internal-elb"] == "1" for s in private)
    assert not any(s.inputs.get("mapPublicIpOnLaunch") for s in subnets)


def test_nat_gateways_follow_config(shipped) -> None:
    cfg, run = shipped
    nats = run.of_type("aws:ec2/natGateway:NatGateway")
    assert len(nats) == cfg.network.nat_gateway_count
    assert len(run.of_type("aws:ec2/eip:Eip")) == len(nats)
    routes = run.of_type("aws:ec2/routeTable:RouteTable")
    private_routes = [r for r in routes if "private" in r.name]
    assert len(private_routes) == cfg.network.az_count
    used = {r.inputs["routes"][0]["natGatewayId"] for r in private_routes}
    assert len(used) == cfg.network.nat_gateway_count


def test_nat_mode_is_visible_between_dev_and_prod(run_stack) -> None:
    assert len(run_stack("dev").of_type("aws:ec2/natGateway:NatGateway")) == 1
    assert len(run_stack("prod").of_type("aws:ec2/natGateway:NatGateway")) == 3


def test_endpoints(shipped) -> None:
    cfg, run = shipped
    endpoints = run.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")
    gateway = [e for e in endpoints if e.inputs["vpcEndpointType"] == "Gateway"]
    interface = [e for e in endpoints if e.inputs["vpcEndpointType"] == "Interface"]
    assert [e.inputs["serviceName"] for e in gateway] == [f"com.amazonaws.{cfg.region}.s3"]
    assert len(gateway[0].inputs["routeTableIds"]) == cfg.network.az_count
    expected = {f"com.amazonaws.{cfg.region}.{s}" for s in INTERFACE_ENDPOINT_SERVICES}
    assert {e.inputs["serviceName"] for e in interface} == (expected if cfg.network.interface_endpoints else set())
    assert all(e.inputs["privateDnsEnabled"] for e in interface)


def test_interface_endpoints_switch(run_stack) -> None:
    run = run_stack("dev", {"llm-platform:interfaceEndpoints": False})
    types = [e.inputs["vpcEndpointType"] for e in run.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")]
    assert types == ["Gateway"]


def test_flow_logs_encrypted_with_retention(shipped) -> None:
    cfg, run = shipped
    flow = run.one("aws:ec2/flowLog:FlowLog")
    group = run.one("aws:cloudwatch/logGroup:LogGroup", "network-flow-logs")
    assert flow.inputs["trafficType"] == "ALL"
    assert flow.inputs["logDestination"].startswith("arn:aws:logs:")
    assert group.inputs["retentionInDays"] == cfg.network.flow_log_retention_days
    assert group.inputs["kmsKeyId"] == run.outputs["kms_key_arn"]


def test_endpoint_security_group_admits_only_https_from_the_vpc(shipped) -> None:
    cfg, run = shipped
    sg = run.one("aws:ec2/securityGroup:SecurityGroup", "network-endpoints-sg")
    (rule,) = sg.inputs["ingress"]
    assert (rule["fromPort"], rule["toPort"], rule["protocol"]) == (443, 443, "tcp")
    assert rule["cidrBlocks"] == [cfg.network.vpc_cidr]
