"""Network: a VPC over N zones with public and private subnets, NAT, VPC endpoints and flow logs."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.config import NetworkConfig
from infra.identity import service_trust

INTERFACE_ENDPOINT_SERVICES = ("ecr.api", "ecr.dkr", "eks-auth", "sts", "logs")
"""What nodes and pods need without NAT: image pulls (ECR api + dkr; layers come from S3 via the gateway endpoint),
workload credentials (the Pod Identity agent calls `eks-auth:AssumeRoleForPodIdentity`, not STS; EKS user guide,
"Pod Identity": private clusters need the `com.amazonaws.<region>.eks-auth` endpoint), STS (listed for private
clusters by the EKS user guide, "Deploy private clusters"; regional STS for SDKs and tools resolving identities) and
log shipping (CloudWatch Logs)."""

S3_ACTIONS_ON_STACK_BUCKETS = sorted(
    {
        "s3:GetObject",
        "s3:GetObjectVersion",
        "s3:PutObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
        "s3:DeleteObject",
        "s3:ListBucket",
        "s3:GetBucketLocation",
    }
)
"""Every S3 action a role of this stack is granted (infra.identity READ/WRITE/DELETE/LIST; a test keeps them equal).
The endpoint policy only narrows: the caller's IAM policy still decides who may do which of these."""


def read_only_buckets(region: str) -> list[str]:
    """Buckets nodes read image layers and packages from, anonymously or through presigned URLs (not with the
    stack's credentials). S3 traffic to the region goes through the gateway endpoint, so its policy must admit them.

    - ECR image layers: `prod-<region>-starport-layer-bucket` (ECR user guide, "Interface VPC endpoints": minimum
      Amazon S3 bucket permissions for Amazon ECR). Every EKS add-on image comes from ECR too.
    - registry.k8s.io redirects pulls from AWS regions to its per-region bucket `prod-registry-k8s-io-<region>`
      (kubernetes/registry.k8s.io; an endpoint policy without it fails the pull with 403,
      prometheus-community/helm-charts#2421): cluster-autoscaler and other upstream images.
    - Docker Hub and quay.io can hand out presigned URLs of their us-east-1 buckets `docker-images-prod`
      (docker/hub-feedback#1318) and `quayio-production-s3` (Prometheus' image registry); in other regions that traffic
      does not use the endpoint and the entries are inert.
    - Amazon Linux 2023 package repositories, `al2023-repos-<region>-de612dc2` (AL2023 user guide): `dnf` on a
      node (debugging, AMI tooling).
    """
    return [
        f"prod-{region}-starport-layer-bucket",
        f"prod-registry-k8s-io-{region}",
        "docker-images-prod",
        "quayio-production-s3",
        f"al2023-repos-{region}-de612dc2",
    ]


STATE_BACKEND_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket", "s3:GetBucketLocation"]
"""What a Pulumi DIY backend does with its bucket (read and write stack checkpoints, locks and history; list stacks)."""


def s3_endpoint_policy(bucket_arns: list[str], region: str, state_bucket: str = "") -> dict:
    """The S3 gateway endpoint's policy: the stack's own buckets (the actions its roles are granted) and read-only
    access to the buckets image pulls need (`read_only_buckets`). Everything else is denied through this endpoint:
    a workload cannot copy data to a bucket outside the stack (its IAM policy could not grant that anyway, but a
    stolen credential from elsewhere could)."""
    partition = bucket_arns[0].split(":")[1] if bucket_arns else "aws"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "StackBuckets",
                "Effect": "Allow",
                "Principal": "*",
                "Action": S3_ACTIONS_ON_STACK_BUCKETS,
                "Resource": [r for arn in bucket_arns for r in (arn, f"{arn}/*")],
            },
            {
                "Sid": "ImageLayersAndPackagesRead",
                "Effect": "Allow",
                "Principal": "*",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:{partition}:s3:::{b}/*" for b in read_only_buckets(region)],
            },
            *(
                [
                    {
                        # The deployers' state backend (stateBucket): the in-VPC runner reaches S3 of its region only
                        # through this endpoint.
                        "Sid": "PulumiStateBackend",
                        "Effect": "Allow",
                        "Principal": "*",
                        "Action": STATE_BACKEND_ACTIONS,
                        "Resource": [f"arn:{partition}:s3:::{state_bucket}", f"arn:{partition}:s3:::{state_bucket}/*"],
                    }
                ]
                if state_bucket
                else []
            ),
        ],
    }


@dataclass
class NetworkArgs:
    network: NetworkConfig
    """CIDR, zone count, NAT mode, interface endpoints, flow-log retention."""
    name_prefix: str
    """Prefix of the Name tags (StackConfig.name_prefix)."""
    stack: str
    region: str
    collector_subnets: bool
    """Carve subnets for the managed Prometheus collector (metrics: amp; infra/observability.py)."""
    availability_zones: list[str]
    """Zones to spread over, already cut to `network.az_count`."""
    kms_key_arn: pulumi.Input[str]
    """Key that encrypts the flow-log group."""
    tags: dict[str, str]
    bucket_arns: dict[str, pulumi.Input[str]]
    """The stack's buckets (datasets, checkpoints, models): the only buckets of this account the S3 gateway endpoint
    admits."""


def plan_subnets(vpc_cidr: str, az_count: int) -> tuple[list[str], list[str]]:
    """Carve (private, public) subnet CIDRs, one of each per zone.

    Private subnets get an eighth of the VPC each: with the VPC CNI every pod takes a VPC address, so GPU nodes
    with many pods need room. Public subnets only hold NAT gateways and load balancers: small slices of the last
    eighth, which no private subnet uses (az_count <= 4 < 8).
    """
    vpc = ipaddress.ip_network(vpc_cidr)
    eighths = list(vpc.subnets(new_prefix=vpc.prefixlen + 3))
    private = [str(n) for n in eighths[:az_count]]
    public = [str(n) for n in list(eighths[-1].subnets(new_prefix=vpc.prefixlen + 6))[:az_count]]
    return private, public


def plan_collector_subnets(vpc_cidr: str, az_count: int) -> list[str]:
    """Subnet CIDRs for the Amazon Managed Prometheus collector's ENIs, one per zone: the slices of the last eighth
    after the public ones (same size). No node group uses them, so no pod ever takes an address there (VPC CNI), and
    a NetworkPolicy `ipBlock` on exactly these CIDRs admits the managed collector and nothing else. The collector
    connects from ENIs in the subnets given to CreateScraper (AMP user guide, "Set up managed collectors for Amazon
    EKS"), which no pod or namespace selector can match."""
    vpc = ipaddress.ip_network(vpc_cidr)
    eighths = list(vpc.subnets(new_prefix=vpc.prefixlen + 3))
    return [str(n) for n in list(eighths[-1].subnets(new_prefix=vpc.prefixlen + 6))[4 : 4 + az_count]]


class Network(pulumi.ComponentResource):
    """The stack's VPC over `azCount` zones: private subnets for every node and endpoint, small public subnets for NAT
    and load balancers, S3 gateway and interface endpoints, flow logs."""

    vpc_id: pulumi.Output[str]
    """The VPC: the cluster, the SageMaker endpoint and the deployer runner put their security groups here."""
    private_subnet_ids: pulumi.Output[list[str]]
    """Private subnets, one per zone (same order as the zones): nodes, endpoints, the runner; exported."""
    public_subnet_ids: pulumi.Output[list[str]]
    """Public subnets, one per zone: NAT gateways and internet-facing load balancers; exported."""
    private_route_table_ids: pulumi.Output[list[str]]
    """Route tables of the private subnets (NAT default route, S3 gateway endpoint)."""
    collector_subnet_ids: pulumi.Output[list[str]]
    """Subnets for the managed Prometheus collector's ENIs (metrics: amp); empty otherwise."""

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:Network", name, None, opts)
        self._base = name
        self._spec = args
        a = args
        self._child = pulumi.ResourceOptions(parent=self)

        self.vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=a.network.vpc_cidr,
            enable_dns_support=True,
            enable_dns_hostnames=True,  # required for private DNS of interface endpoints and for EKS
            tags=self._tags(f"{a.name_prefix}-vpc"),
            opts=self._child,
        )
        private_cidrs, public_cidrs = plan_subnets(a.network.vpc_cidr, a.network.az_count)
        self.public_subnets = [
            aws.ec2.Subnet(
                f"{name}-public-{i}",
                vpc_id=self.vpc.id,
                cidr_block=cidr,
                availability_zone=az,
                map_public_ip_on_launch=False,  # nothing in a public subnet gets an address unless it asks
                tags={**self._tags(f"{a.name_prefix}-public-{az}"), "kubernetes.io/role/elb": "1"},
                opts=self._child,
            )
            for i, (az, cidr) in enumerate(zip(args.availability_zones, public_cidrs, strict=True))
        ]
        self.private_subnets = [
            aws.ec2.Subnet(
                f"{name}-private-{i}",
                vpc_id=self.vpc.id,
                cidr_block=cidr,
                availability_zone=az,
                tags={**self._tags(f"{a.name_prefix}-private-{az}"), "kubernetes.io/role/internal-elb": "1"},
                opts=self._child,
            )
            for i, (az, cidr) in enumerate(zip(args.availability_zones, private_cidrs, strict=True))
        ]
        self._create_public_routes()
        self._create_nat_and_private_routes()
        self._create_collector_subnets(args.availability_zones)
        self._create_endpoints()
        self._create_flow_logs()

        self.vpc_id = self.vpc.id
        self.private_subnet_ids = pulumi.Output.all(*[s.id for s in self.private_subnets])
        self.public_subnet_ids = pulumi.Output.all(*[s.id for s in self.public_subnets])
        self.private_route_table_ids = pulumi.Output.all(*[rt.id for rt in self.private_route_tables])
        self.collector_subnet_ids = pulumi.Output.all(*[s.id for s in self.collector_subnets])
        self.register_outputs(
            {
                "vpc_id": self.vpc_id,
                "private_subnet_ids": self.private_subnet_ids,
                "public_subnet_ids": self.public_subnet_ids,
            }
        )

    def _tags(self, name: str) -> dict[str, str]:
        return {**self._spec.tags, "Name": name}

    def _create_public_routes(self) -> None:
        name, a = self._base, self._spec
        self.internet_gateway = aws.ec2.InternetGateway(
            f"{name}-igw", vpc_id=self.vpc.id, tags=self._tags(f"{a.name_prefix}-igw"), opts=self._child
        )
        self.public_route_table = aws.ec2.RouteTable(
            f"{name}-public-rt",
            vpc_id=self.vpc.id,
            routes=[{"cidr_block": "0.0.0.0/0", "gateway_id": self.internet_gateway.id}],
            tags=self._tags(f"{a.name_prefix}-public"),
            opts=self._child,
        )
        for i, subnet in enumerate(self.public_subnets):
            aws.ec2.RouteTableAssociation(
                f"{name}-public-rta-{i}",
                subnet_id=subnet.id,
                route_table_id=self.public_route_table.id,
                opts=self._child,
            )

    def _create_nat_and_private_routes(self) -> None:
        """One NAT gateway (cheap; egress of every zone fails with its zone) or one per zone (zone-independent)."""
        name, a = self._base, self._spec
        self.nat_gateways = []
        for i in range(a.network.nat_gateway_count):
            eip = aws.ec2.Eip(
                f"{name}-nat-eip-{i}", domain="vpc", tags=self._tags(f"{a.name_prefix}-nat-{i}"), opts=self._child
            )
            self.nat_gateways.append(
                aws.ec2.NatGateway(
                    f"{name}-nat-{i}",
                    allocation_id=eip.id,
                    subnet_id=self.public_subnets[i].id,
                    tags=self._tags(f"{a.name_prefix}-nat-{i}"),
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[self.internet_gateway]),
                )
            )
        self.private_route_tables = []
        for i, subnet in enumerate(self.private_subnets):
            nat = self.nat_gateways[i % len(self.nat_gateways)]
            rt = aws.ec2.RouteTable(
                f"{name}-private-rt-{i}",
                vpc_id=self.vpc.id,
                routes=[{"cidr_block": "0.0.0.0/0", "nat_gateway_id": nat.id}],
                tags=self._tags(f"{a.name_prefix}-private-{i}"),
                opts=self._child,
            )
            aws.ec2.RouteTableAssociation(
                f"{name}-private-rta-{i}", subnet_id=subnet.id, route_table_id=rt.id, opts=self._child
            )
            self.private_route_tables.append(rt)

    def _create_collector_subnets(self, zones: list[str]) -> None:
        """Dedicated subnets for the AMP managed collector, routed like the private subnets of their zone."""
        name, a = self._base, self._spec
        self.collector_subnets: list[aws.ec2.Subnet] = []
        if not a.collector_subnets:
            return
        cidrs = plan_collector_subnets(a.network.vpc_cidr, a.network.az_count)
        for i, (az, cidr) in enumerate(zip(zones, cidrs, strict=True)):
            subnet = aws.ec2.Subnet(
                f"{name}-collector-{i}",
                vpc_id=self.vpc.id,
                cidr_block=cidr,
                availability_zone=az,
                # No kubernetes.io/role/* tag: load balancers and nodes never land here.
                tags=self._tags(f"{a.name_prefix}-collector-{az}"),
                opts=self._child,
            )
            aws.ec2.RouteTableAssociation(
                f"{name}-collector-rta-{i}",
                subnet_id=subnet.id,
                route_table_id=self.private_route_tables[i].id,
                opts=self._child,
            )
            self.collector_subnets.append(subnet)

    def _create_endpoints(self) -> None:
        name, a = self._base, self._spec
        region = a.region
        # S3 traffic (datasets, checkpoints, image layers) is the bulk of egress: keep it off NAT, which bills per GB.
        self.s3_endpoint = aws.ec2.VpcEndpoint(
            f"{name}-s3",
            vpc_id=self.vpc.id,
            service_name=f"com.amazonaws.{region}.s3",
            vpc_endpoint_type="Gateway",
            route_table_ids=[rt.id for rt in self.private_route_tables],
            policy=pulumi.Output.all(*self._spec.bucket_arns.values()).apply(
                lambda arns: json.dumps(s3_endpoint_policy(sorted(arns), region, a.network.state_bucket))
            ),
            tags=self._tags(f"{a.name_prefix}-s3"),
            opts=self._child,
        )
        self.interface_endpoints: list[aws.ec2.VpcEndpoint] = []
        if not a.network.interface_endpoints:
            return
        self.endpoint_security_group = aws.ec2.SecurityGroup(
            f"{name}-endpoints-sg",
            vpc_id=self.vpc.id,
            description="HTTPS from inside the VPC to interface endpoints",
            ingress=[
                {
                    "protocol": "tcp",
                    "from_port": 443,
                    "to_port": 443,
                    "cidr_blocks": [a.network.vpc_cidr],
                    "description": "HTTPS from the VPC",
                }
            ],
            tags=self._tags(f"{a.name_prefix}-endpoints"),
            opts=self._child,
        )
        for service in INTERFACE_ENDPOINT_SERVICES:
            self.interface_endpoints.append(
                aws.ec2.VpcEndpoint(
                    f"{name}-{service.replace('.', '-')}",
                    vpc_id=self.vpc.id,
                    service_name=f"com.amazonaws.{region}.{service}",
                    vpc_endpoint_type="Interface",
                    private_dns_enabled=True,
                    subnet_ids=[s.id for s in self.private_subnets],
                    security_group_ids=[self.endpoint_security_group.id],
                    tags=self._tags(f"{a.name_prefix}-{service}"),
                    opts=self._child,
                )
            )

    def _create_flow_logs(self) -> None:
        name, a = self._base, self._spec
        self.flow_log_group = aws.cloudwatch.LogGroup(
            f"{name}-flow-logs",
            name=f"/llm-platform/{a.stack}/vpc-flow-logs",
            retention_in_days=a.network.flow_log_retention_days,
            kms_key_id=self._spec.kms_key_arn,
            tags=self._spec.tags,
            opts=self._child,
        )
        role = aws.iam.Role(
            f"{name}-flow-logs-role",
            name=f"{a.name_prefix}-vpc-flow-logs",
            assume_role_policy=service_trust("vpc-flow-logs.amazonaws.com"),
            tags=self._spec.tags,
            opts=self._child,
        )
        aws.iam.RolePolicy(
            f"{name}-flow-logs-policy",
            role=role.id,
            policy=pulumi.Output.json_dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Action": [
                                "logs:CreateLogStream",
                                "logs:PutLogEvents",
                                "logs:DescribeLogStreams",
                            ],
                            "Resource": [
                                self.flow_log_group.arn,
                                self.flow_log_group.arn.apply(lambda a: f"{a}:log-stream:*"),
                            ],
                        }
                    ],
                }
            ),
            opts=self._child,
        )
        self.flow_log = aws.ec2.FlowLog(
            f"{name}-flow-log",
            vpc_id=self.vpc.id,
            traffic_type="ALL",
            log_destination_type="cloud-watch-logs",
            log_destination=self.flow_log_group.arn,
            iam_role_arn=role.arn,
            max_aggregation_interval=60,
            tags=self._spec.tags,
            opts=self._child,
        )
