"""The SageMaker endpoint's security group sends HTTPS only to S3 (its prefix list) and to the interface endpoints'
security group where the stack has interface endpoints; through the NAT gateway (0.0.0.0/0 on 443) only where not."""

from __future__ import annotations

from facts import pulumi_types as tok
from tests.infra.conftest import PROD_SERVING


def _egress(run) -> list[dict]:
    return run.one(tok.EC2_SECURITY_GROUP, "serving-sagemaker-sg").inputs["egress"]


def test_with_interface_endpoints_no_open_egress(run_stack) -> None:
    run = run_stack("prod", PROD_SERVING)  # interfaceEndpoints defaults to true; prod serves on SageMaker
    egress = _egress(run)
    assert all((e["protocol"], e["fromPort"], e["toPort"]) == ("tcp", 443, 443) for e in egress)
    assert not any(e.get("cidrBlocks") for e in egress)
    (s3,) = [e for e in egress if e.get("prefixListIds")]
    assert tok.EC2_GET_PREFIX_LIST in run.mocks.invokes and s3["prefixListIds"][0].startswith("pl-")
    (endpoints,) = [e for e in egress if e.get("securityGroups")]
    interface = [r for r in run.of_type(tok.EC2_VPC_ENDPOINT) if r.inputs.get("vpcEndpointType") == "Interface"]
    assert interface and all(r.inputs["securityGroupIds"] == endpoints["securityGroups"] for r in interface)


def test_without_interface_endpoints_https_goes_through_nat(run_stack) -> None:
    run = run_stack("prod", {**PROD_SERVING, "llm-platform:interfaceEndpoints": False})
    assert [(e["cidrBlocks"], e["fromPort"]) for e in _egress(run)] == [(["0.0.0.0/0"], 443)]
