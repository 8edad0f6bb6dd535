"""Stack output keys: the one list shared by the program, the tests and every tool that reads outputs.

Tools (the training launcher, teardown, the end-to-end run) read a stack's outputs either from
`pulumi stack output --json` or, offline, from the `outputs` object of `python -m ops.preview <stack> --json`.
They must use these constants, never string literals, so a rename breaks loudly in the tests.
"""

from __future__ import annotations

STACK = "stack"
"""Stack name (str)."""
ENVIRONMENT = "environment"
"""Environment label from config: dev, staging, prod (str)."""
REGION = "region"
"""AWS region (str)."""
PRODUCTION = "production"
"""True when the stack is marked production in config (bool)."""
TAGS = "tags"
"""The tags every taggable resource of the stack carries (dict[str, str]); teardown sweeps by them."""

VPC_ID = "vpc_id"
PRIVATE_SUBNET_IDS = "private_subnet_ids"
PUBLIC_SUBNET_IDS = "public_subnet_ids"

KMS_KEY_ARN = "kms_key_arn"
DATASETS_BUCKET = "datasets_bucket"
CHECKPOINTS_BUCKET = "checkpoints_bucket"
MODELS_BUCKET = "models_bucket"

MODELS_REPLICA_BUCKET = "models_replica_bucket"
"""The models bucket's cross-region replica (absent without backupReplicaRegion); ops.restore reads it."""
CHECKPOINTS_REPLICA_BUCKET = "checkpoints_replica_bucket"
BACKUP_REPLICA_REGION = "backup_replica_region"
AUDIT_TRAIL_BUCKET = "audit_trail_bucket"
"""The CloudTrail trail's Object Lock bucket (absent without auditTrail)."""

TRAINING_REPOSITORY_URL = "training_repository_url"
SERVING_REPOSITORY_URL = "serving_repository_url"
TRAINING_IMAGE = "training_image"
"""`<training repository>@<trainingImageDigest>`: the exact image training jobs of this stack are to run (absent
when no digest is configured)."""

TRAINING_ROLE_ARN = "training_role_arn"
"""Pod Identity role of the training service account."""
SERVING_ROLE_ARN = "serving_role_arn"
"""Pod Identity role of the serving service account."""
SAGEMAKER_EXECUTION_ROLE_ARN = "sagemaker_execution_role_arn"
PREPARE_ROLE_ARN = "prepare_role_arn"
"""Pod Identity role of the data-preparation service account: datasets and models read, `prepared/` of the datasets
bucket write (infra/identity.py PREPARE_ACCESS, PREPARE_WRITES)."""
SAGEMAKER_PREPARE_ROLE_ARN = "sagemaker_prepare_role_arn"
"""Execution role of SageMaker Processing jobs that prepare data (the same S3 access)."""

CLUSTER_NAME = "cluster_name"
CLUSTER_ENDPOINT = "cluster_endpoint"
KUBECONFIG = "kubeconfig"
"""Secret output."""
KUBERNETES_VERSION = "kubernetes_version"

TRAINING_NAMESPACE = "training_namespace"
SERVING_NAMESPACE = "serving_namespace"
TRAINING_SERVICE_ACCOUNT = "training_service_account"
SERVING_SERVICE_ACCOUNT = "serving_service_account"
PREPARE_SERVICE_ACCOUNT = "prepare_service_account"
"""Service account (training namespace) data-preparation pods run as: the prepare role through Pod Identity."""

GPU_POOLS = "gpu_pools"
"""dict[pool_name, {"purpose": "training"|"inference", "instance_types": [...], "capacity_type": "ON_DEMAND"|"SPOT",
"min_size", "max_size", "gpus_per_node", "efa": bool, "labels": {...},
"taints": [{"key", "value", "effect"}]}]: what workloads must tolerate and select to land on a pool."""

BATCH_POOL = "batch_pool"
"""The CPU pool for batch work, scaling from zero: {"name", "instance_types": [...], "capacity_type", "min_size",
"max_size", "labels": {...}, "taints": [{"key", "value", "effect"}]}: what batch pods select and tolerate."""

SERVING_SERVICE_NAME = "serving_service_name"
"""Kubernetes Service of the EKS serving Deployment (absent when EKS serving is off)."""
SAGEMAKER_ENDPOINT_NAME = "sagemaker_endpoint_name"
"""Absent when SageMaker serving is off."""

LAYER = "layer"
"""Which layer of the environment a stack is: "aws" (stack `<env>`) or "cluster" (stack `<env>-cluster`;
infra/layers.py)."""
ALERT_TOPIC_ARN = "alert_topic_arn"
"""The SNS topic every alarm publishes to (AWS layer)."""
SPOT_INTERRUPTION_QUEUE_URL = "spot_interruption_queue_url"
"""The SQS queue aws-node-termination-handler polls (AWS layer; absent without a SPOT pool)."""
AMP_QUERY_URL = "amp_query_url"
"""The Amazon Managed Prometheus workspace's Prometheus endpoint (AWS layer; absent unless `metrics: amp`)."""
PROMETHEUS_URL = "prometheus_url"
"""Where PromQL is answered (cluster layer; absent with `metrics: none`)."""
