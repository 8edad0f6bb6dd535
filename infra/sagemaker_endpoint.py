"""Serving on SageMaker: a real-time endpoint running the serving image on the exported model, inside the VPC,
autoscaled on invocations per instance.

SageMaker models and endpoint configurations are immutable: any change replaces them. The model's name is a digest of
everything that defines it and the endpoint configuration is name-prefixed, so a replacement is created before the
old one is deleted and the endpoint (stable name) switches over in place, without downtime.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from facts.instance_types import instance_gpu
from facts.serving import env_name
from infra.config import ServingConfig
from infra.preflight import RunningVariant, initial_instance_count
from infra.vllm_sizing import sizing_for

VARIANT_NAME = "primary"
MODEL_DIR = "/opt/ml/model"
"""Where SageMaker places the model data in the container; the serving image reads SERVING_MODEL from here."""
STARTUP_HEALTH_CHECK_TIMEOUT_S = 1800
"""Model download plus load can take many minutes for large models; SageMaker's default (a few minutes) fails them."""
MODEL_DOWNLOAD_TIMEOUT_S = 1800
SCALE_IN_COOLDOWN_S = 600
"""A new instance takes minutes to become InService: scale in slowly so a brief lull does not cost a cold start."""
SCALE_OUT_COOLDOWN_S = 120

_INSTANCE_STORAGE_FAMILIES = (
    "g4dn",
    "g5",
    "g6",
    "g6e",
    "p3dn",
    "p4d",
    "p4de",
    "p5",
    "p5e",
    "p5en",
    "m5d",
    "c5d",
    "r5d",
)
"""SageMaker instance families with local NVMe storage. Their storage is encrypted by the instance's hardware
module, and SageMaker rejects an endpoint configuration that names a KMS key for them."""


@dataclass
class SageMakerEndpointArgs:
    serving: ServingConfig
    """Instance type, scaling bounds, engine, model prefix and shape, quantization."""
    name_prefix: str
    """Prefix of the endpoint, model, configuration and security group names."""
    execution_role_arn: pulumi.Input[str]
    """Role SageMaker assumes to pull the image, read the model and write logs."""
    image: pulumi.Input[str]
    """Full serving image reference: `<serving repository url>:<servingImageTag>`."""
    models_bucket: pulumi.Input[str]
    """Bucket holding exported models; SageMaker copies `s3://<bucket>/<servingModelPrefix>/` to /opt/ml/model."""
    vpc_id: pulumi.Input[str]
    """VPC of the endpoint's security group."""
    private_subnet_ids: pulumi.Input[list[str]]
    """Subnets the endpoint's ENIs go into (private only)."""
    kms_key_arn: pulumi.Input[str]
    """Stack KMS key: encrypts the instances' EBS volumes where the instance type has EBS storage."""
    tags: dict[str, str]
    """Stack tags for every taggable resource."""
    execution_role_policies: Sequence[pulumi.Resource] = ()
    """The execution role's policies (`Identity.role_policies["sagemaker"]`). CreateModel checks that the role can
    pull the image: created in parallel with its RolePolicy, the Model races it and fails."""
    s3_prefix_list_id: pulumi.Input[str] | None = None
    """The region's S3 prefix list (`com.amazonaws.<region>.s3`), with endpoints_security_group_id."""
    endpoints_security_group_id: pulumi.Input[str] | None = None
    """The interface endpoints' security group (infra/network.py) when the stack has them: the endpoint then sends
    HTTPS only to S3 (its prefix list, through the gateway endpoint) and to those endpoints (ECR, STS, Logs), not to
    0.0.0.0/0. None: no interface endpoints, ECR and CloudWatch are reached through the NAT gateway."""
    running: RunningVariant | None = None
    """The endpoint's primary variant as it runs now (infra.preflight.running_variant); None before it exists. A
    rollout starts at its instance count instead of resetting to the minimum."""


class SageMakerEndpoint(pulumi.ComponentResource):
    """Serving on a SageMaker real-time endpoint: a model from the serving image and the exported model, an endpoint
    configuration in the private subnets, the endpoint, and invocation-based autoscaling when sagemakerAutoscaling
    is on."""

    endpoint_name: pulumi.Output[str]
    """The endpoint name: clients invoke it, the alarms watch it; exported."""
    security_group_id: pulumi.Output[str]
    """The endpoint's security group (no ingress, HTTPS egress only)."""
    model: aws.sagemaker.Model
    """The SageMaker model; its name changes with image, model and environment, so a change rolls out blue/green."""
    endpoint_config: aws.sagemaker.EndpointConfiguration
    """The endpoint configuration (instance type and count of the one variant)."""
    endpoint: aws.sagemaker.Endpoint
    """The endpoint resource."""

    def __init__(self, name: str, args: SageMakerEndpointArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:SageMakerEndpoint", name, None, opts)
        self._name = name
        self._args = args

        security_group = self._create_security_group()
        self.security_group_id = security_group.id
        self.model = self._create_model(security_group)
        self.endpoint_config = self._create_endpoint_config()
        self.endpoint = aws.sagemaker.Endpoint(
            f"{name}-endpoint",
            name=f"{args.name_prefix}-serving",
            endpoint_config_name=self.endpoint_config.name,
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.endpoint_name = self.endpoint.name
        if args.serving.sagemaker_autoscaling:
            self._create_autoscaling()

        self.register_outputs(
            {
                "endpoint_name": self.endpoint_name,
                "model_name": self.model.name,
                "endpoint_config_name": self.endpoint_config.name,
                "security_group_id": self.security_group_id,
            }
        )

    def _create_security_group(self) -> aws.ec2.SecurityGroup:
        """No ingress (invocations arrive through the SageMaker runtime API, not the VPC); egress HTTPS only, for
        the model download (S3), the image (ECR, its layers in S3) and CloudWatch. With interface endpoints, exactly
        the S3 prefix list and the endpoints' security group; without them, anywhere (through the NAT gateway).
        DNS to the VPC resolver is not subject to security groups (VPC user guide, "Security group rules": traffic
        to the Amazon DNS server is not filtered)."""
        a = self._args
        egress: list[aws.ec2.SecurityGroupEgressArgs]
        if a.endpoints_security_group_id is not None and a.s3_prefix_list_id is not None:
            egress = [
                aws.ec2.SecurityGroupEgressArgs(
                    protocol="tcp",
                    from_port=443,
                    to_port=443,
                    prefix_list_ids=[a.s3_prefix_list_id],
                    description="S3 (gateway endpoint)",
                ),
                aws.ec2.SecurityGroupEgressArgs(
                    protocol="tcp",
                    from_port=443,
                    to_port=443,
                    security_groups=[a.endpoints_security_group_id],
                    description="interface endpoints (ECR, STS, Logs)",
                ),
            ]
        else:
            egress = [
                aws.ec2.SecurityGroupEgressArgs(
                    protocol="tcp", from_port=443, to_port=443, cidr_blocks=["0.0.0.0/0"], description="HTTPS via NAT"
                )
            ]
        return aws.ec2.SecurityGroup(
            f"{self._name}-sg",
            name=f"{a.name_prefix}-sagemaker-endpoint",
            description="SageMaker endpoint: HTTPS egress only",
            vpc_id=self._args.vpc_id,
            ingress=[],
            egress=egress,
            tags={**self._args.tags, "Name": f"{a.name_prefix}-sagemaker-endpoint"},
            opts=pulumi.ResourceOptions(parent=self),
        )

    def _create_model(self, security_group: aws.ec2.SecurityGroup) -> aws.sagemaker.Model:
        a = self._args
        prefix = a.serving.model_prefix
        model_uri = pulumi.Output.from_input(self._args.models_bucket).apply(lambda b: f"s3://{b}/{prefix}/")
        # InvokeEndpoint is authenticated by IAM (SigV4) before a request reaches the container, and the serving
        # process refuses to start without API keys unless told explicitly (docs/serving.md "Authentication")
        environment = {
            env_name("model"): MODEL_DIR,
            env_name("allow_unauthenticated"): "true",
            **engine_environment(a.serving),
        }
        if a.serving.quantization != "none":  # only when set: an unchanged default keeps the model's name
            environment[env_name("quantization")] = a.serving.quantization
        # The name changes whenever anything that defines the model changes, so Pulumi's create-before-delete
        # replacement never collides with the model it replaces.
        name = pulumi.Output.all(
            self._args.image, model_uri, self._args.execution_role_arn, self._args.private_subnet_ids, security_group.id
        ).apply(lambda parts: f"{a.name_prefix}-serving-{_digest(parts, environment)}")
        return aws.sagemaker.Model(
            f"{self._name}-model",
            name=name,
            execution_role_arn=self._args.execution_role_arn,
            primary_container=aws.sagemaker.ModelPrimaryContainerArgs(
                image=self._args.image,
                mode="SingleModel",
                # An uncompressed prefix (the training export's directory as is): SageMaker copies it to
                # /opt/ml/model itself, no model.tar.gz to build and no download code in the container.
                model_data_source=aws.sagemaker.ModelPrimaryContainerModelDataSourceArgs(
                    s3_data_sources=[
                        aws.sagemaker.ModelPrimaryContainerModelDataSourceS3DataSourceArgs(
                            s3_uri=model_uri, s3_data_type="S3Prefix", compression_type="None"
                        )
                    ]
                ),
                environment=environment,
            ),
            vpc_config=aws.sagemaker.ModelVpcConfigArgs(
                subnets=self._args.private_subnet_ids, security_group_ids=[security_group.id]
            ),
            # The container gets no network at all. Compatible with S3 model data: SageMaker downloads it with the
            # execution role before the container starts; the container only reads /opt/ml/model.
            enable_network_isolation=True,
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(self._args.execution_role_policies)),
        )

    def _create_endpoint_config(self) -> aws.sagemaker.EndpointConfiguration:
        a = self._args
        instance_type = a.serving.sagemaker_instance_type
        return aws.sagemaker.EndpointConfiguration(
            f"{self._name}-config",
            name_prefix=f"{a.name_prefix}-serving-",
            production_variants=[
                aws.sagemaker.EndpointConfigurationProductionVariantArgs(
                    variant_name=VARIANT_NAME,
                    model_name=self.model.name,
                    instance_type=instance_type,
                    # The running count on a rollout, the minimum on create (infra.preflight.initial_instance_count).
                    initial_instance_count=self.model.name.apply(
                        lambda model: initial_instance_count(a.serving, model, self._args.running)
                    ),
                    initial_variant_weight=1.0,
                    container_startup_health_check_timeout_in_seconds=STARTUP_HEALTH_CHECK_TIMEOUT_S,
                    model_data_download_timeout_in_seconds=MODEL_DOWNLOAD_TIMEOUT_S,
                )
            ],
            kms_key_arn=None if has_instance_storage(instance_type) else self._args.kms_key_arn,
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )

    def _create_autoscaling(self) -> None:
        a = self._args
        target = aws.appautoscaling.Target(
            f"{self._name}-scaling-target",
            service_namespace="sagemaker",
            resource_id=self.endpoint.name.apply(lambda n: f"endpoint/{n}/variant/{VARIANT_NAME}"),
            scalable_dimension="sagemaker:variant:DesiredInstanceCount",
            min_capacity=a.serving.sagemaker_min_instances,
            max_capacity=a.serving.sagemaker_max_instances,
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        aws.appautoscaling.Policy(
            f"{self._name}-scaling-policy",
            name=f"{a.name_prefix}-serving-invocations",
            policy_type="TargetTrackingScaling",
            service_namespace=target.service_namespace,
            resource_id=target.resource_id,
            scalable_dimension=target.scalable_dimension,
            target_tracking_scaling_policy_configuration=aws.appautoscaling.PolicyTargetTrackingScalingPolicyConfigurationArgs(
                target_value=float(a.serving.sagemaker_invocations_per_instance),
                predefined_metric_specification=aws.appautoscaling.PolicyTargetTrackingScalingPolicyConfigurationPredefinedMetricSpecificationArgs(
                    predefined_metric_type="SageMakerVariantInvocationsPerInstance"
                ),
                scale_in_cooldown=SCALE_IN_COOLDOWN_S,
                scale_out_cooldown=SCALE_OUT_COOLDOWN_S,
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )


def engine_environment(serving: ServingConfig) -> dict[str, str]:
    """The engine, chosen explicitly: SageMaker passes no flags (only `serve`), so SERVING_* variables pick it, and a
    default baked into the image must not (the vLLM image bakes SERVING_ENGINE=vllm, the CPU default is cpu)."""
    instance_type = serving.sagemaker_instance_type
    gpu = instance_gpu(instance_type)
    if serving.engine == "vllm":
        # SageMaker hands the container every GPU of the instance: tensor parallel over all of them.
        sizing = sizing_for(serving.model_prefix, serving.model_shape, instance_type, gpu.gpus if gpu else 0)
        return {env_name("engine"): "vllm", env_name("vllm_args"): " ".join(sizing.args())}
    if gpu is None:
        return {env_name("engine"): "builtin", env_name("device"): "cpu"}
    # T4 (g4dn) has no bfloat16 tensor cores; every later GPU of the table does.
    return {
        env_name("engine"): "builtin",
        env_name("device"): "cuda",
        env_name("dtype"): "float16" if gpu.gpu == "T4" else "bfloat16",
    }


def has_instance_storage(instance_type: str) -> bool:
    """`ml.g5.xlarge` -> True: the family has local NVMe storage (no KMS key may be named for it)."""
    family = instance_type.removeprefix("ml.").split(".", 1)[0]
    return family in _INSTANCE_STORAGE_FAMILIES


def _digest(parts: list, environment: dict[str, str]) -> str:
    blob = json.dumps([parts, environment], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
