"""Data preparation's own identity (infra/identity.py): on EKS a Pod Identity role bound to the `data-prepare`
service account, on SageMaker a Processing execution role. Both read the datasets and the models' tokenizer files
and write only under `prepared/` of the datasets bucket; the statements are asserted exactly, on the documents the
program produces for every shipped stack."""

from __future__ import annotations

import json

from facts import pulumi_types as tok
from facts.cluster import PREPARE_SERVICE_ACCOUNT, PREPARED_PREFIX, TRAINING_NAMESPACE
from infra import outputs as out
from infra.identity import PROCESSING_LOG_GROUP
from policy.rules import iam_document_violations

ACCOUNT = "123456789012"
READ = ["s3:GetObject", "s3:GetObjectVersion"]
LIST = ["s3:ListBucket", "s3:GetBucketLocation"]
WRITE_DELETE = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts", "s3:DeleteObject"]


def _policy(run, suffix: str) -> dict:
    return json.loads(run.one(tok.IAM_ROLE_POLICY, f"identity-{suffix}-policy").inputs["policy"])


def _s3_statements(o: dict) -> list[dict]:
    datasets = f"arn:aws:s3:::{o[out.DATASETS_BUCKET]}"
    models = f"arn:aws:s3:::{o[out.MODELS_BUCKET]}"
    return [
        {"Sid": "ListDatasets", "Effect": "Allow", "Action": LIST, "Resource": datasets},
        {"Sid": "ObjectsDatasets", "Effect": "Allow", "Action": READ, "Resource": f"{datasets}/*"},
        {"Sid": "ListModels", "Effect": "Allow", "Action": LIST, "Resource": models},
        {"Sid": "ObjectsModels", "Effect": "Allow", "Action": READ, "Resource": f"{models}/*"},
        {
            "Sid": "ObjectsDatasetsPreparedPrefix",
            "Effect": "Allow",
            "Action": WRITE_DELETE,
            "Resource": f"{datasets}/{PREPARED_PREFIX}/*",
        },
        {
            "Sid": "UseProjectKeyViaS3",
            "Effect": "Allow",
            "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
            "Resource": o[out.KMS_KEY_ARN],
            "Condition": {"StringEquals": {"kms:ViaService": f"s3.{o[out.REGION]}.amazonaws.com"}},
        },
    ]


def test_eks_prepare_role_reads_data_and_tokenizers_and_writes_only_the_prepared_prefix(shipped) -> None:
    _, run = shipped
    o = run.outputs
    doc = _policy(run, "data-prepare")
    assert doc == {"Version": "2012-10-17", "Statement": _s3_statements(o)}
    assert iam_document_violations(doc) == []
    # What it must not do, said plainly: no write to models, none to checkpoints, no access to checkpoints at all.
    resources = [r for st in doc["Statement"] for r in ([st["Resource"]] if isinstance(st["Resource"], str) else [])]
    assert not any(o[out.CHECKPOINTS_BUCKET] in r for r in resources)
    writes = [st for st in doc["Statement"] if "s3:PutObject" in st["Action"]]
    assert [st["Resource"] for st in writes] == [f"arn:aws:s3:::{o[out.DATASETS_BUCKET]}/{PREPARED_PREFIX}/*"]


def test_eks_prepare_role_is_assumed_through_pod_identity_by_its_service_account_only(shipped) -> None:
    _, run = shipped
    role = run.one(tok.IAM_ROLE, "identity-data-prepare").inputs
    (st,) = json.loads(role["assumeRolePolicy"])["Statement"]
    assert st["Principal"] == {"Service": "pods.eks.amazonaws.com"}
    assert st["Condition"] == {"StringEquals": {"aws:SourceAccount": ACCOUNT}}
    (assoc,) = [
        r.inputs
        for r in run.of_type(tok.EKS_POD_IDENTITY_ASSOCIATION)
        if r.inputs["serviceAccount"] == PREPARE_SERVICE_ACCOUNT
    ]
    assert assoc["namespace"] == TRAINING_NAMESPACE
    assert assoc["roleArn"] == run.outputs[out.PREPARE_ROLE_ARN]
    assert run.outputs[out.PREPARE_SERVICE_ACCOUNT] == PREPARE_SERVICE_ACCOUNT
    # The trainer's association still names the trainer's role: the two identities are distinct.
    roles = {r.inputs["serviceAccount"]: r.inputs["roleArn"] for r in run.of_type(tok.EKS_POD_IDENTITY_ASSOCIATION)}
    assert len(set(roles.values())) == len(roles)


def test_sagemaker_prepare_role_has_the_processing_minimum(shipped) -> None:
    """SageMaker Developer Guide, sagemaker-roles "CreateProcessingJob API: Execution Role Permissions": S3 (scoped),
    ECR pull (the training repository), logs, metrics, and kms:CreateGrant for the volume key the request names."""
    _, run = shipped
    o = run.outputs
    region = o[out.REGION]
    training_repo = next(
        r.state["arn"] for r in run.of_type(tok.ECR_REPOSITORY) if r.inputs["name"].endswith("/training")
    )
    group = f"arn:aws:logs:{region}:{ACCOUNT}:log-group:{PROCESSING_LOG_GROUP}"
    doc = _policy(run, "sagemaker-prepare")
    assert doc["Statement"] == [
        *_s3_statements(o),
        {"Sid": "EcrLogin", "Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
        {
            "Sid": "EcrPullTrainingImage",
            "Effect": "Allow",
            "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
            "Resource": training_repo,
        },
        {
            "Sid": "UseProjectKeyViaEcr",
            "Effect": "Allow",
            "Action": ["kms:Decrypt"],
            "Resource": o[out.KMS_KEY_ARN],
            "Condition": {"StringEquals": {"kms:ViaService": f"ecr.{region}.amazonaws.com"}},
        },
        {
            "Sid": "ProcessingVolumeKey",
            "Effect": "Allow",
            "Action": ["kms:CreateGrant"],
            "Resource": o[out.KMS_KEY_ARN],
            "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}},
        },
        {
            "Sid": "ProcessingLogs",
            "Effect": "Allow",
            "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            "Resource": [group, f"{group}:*"],
        },
        {
            "Sid": "ProcessingMetrics",
            "Effect": "Allow",
            "Action": "cloudwatch:PutMetricData",
            "Resource": "*",
            "Condition": {"StringLike": {"cloudwatch:namespace": ["/aws/sagemaker/*", "aws/sagemaker/*"]}},
        },
    ]
    assert iam_document_violations(doc) == []
    role = run.one(tok.IAM_ROLE, "identity-sagemaker-prepare").inputs
    (st,) = json.loads(role["assumeRolePolicy"])["Statement"]
    assert st["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    assert st["Condition"] == {"StringEquals": {"aws:SourceAccount": ACCOUNT}}
    assert o[out.SAGEMAKER_PREPARE_ROLE_ARN] == run.one(tok.IAM_ROLE, "identity-sagemaker-prepare").state["arn"]
    assert o[out.SAGEMAKER_PREPARE_ROLE_ARN] != o[out.SAGEMAKER_EXECUTION_ROLE_ARN]


def test_the_launcher_renders_its_jobs_from_what_the_program_exports(shipped) -> None:
    """Both ends: the outputs the program produces are enough for `--job prepare`, and the rendered Job and
    Processing request name this stack's preparation identity, batch pool and datasets bucket."""
    import kubernetes_validate

    from ops.prepare_job import PrepareJobSpec, build_processing_job_request, render_prepare_job

    cfg, run = shipped
    o = run.outputs
    spec = PrepareJobSpec(name="c4", data="corpora/c4", tokenizer="base/m", seq_len=4096, workers=2)
    job = render_prepare_job(spec, o)
    kubernetes_validate.validate(job, cfg.cluster.kubernetes_version, strict=True)
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == PREPARE_SERVICE_ACCOUNT
    assert pod["nodeSelector"] == cfg.cluster.batch_pool.labels
    assert [{k: t[k] for k in ("key", "value", "effect")} for t in pod["tolerations"]] == cfg.cluster.batch_pool.taints
    assert f"s3://{o[out.DATASETS_BUCKET]}/{PREPARED_PREFIX}/c4" in pod["containers"][0]["command"]
    request = build_processing_job_request(spec, o)
    assert request["RoleArn"] == o[out.SAGEMAKER_PREPARE_ROLE_ARN]
