"""Build (and submit with boto3) a SageMaker training job that runs the training image on the stack's resources.

The job reads data from the stack's datasets bucket through the `train` channel, checkpoints to the checkpoints
bucket with the trainer's own marker protocol (so multi-instance jobs never resume from a half-synced
checkpoint), and exports the Hugging Face model to the models bucket, where the serving container reads it.
Hyperparameters are the trainer's CLI flags; dotted keys (`optim.lr`) become `--set` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infra import outputs as out
from ops.stack_outputs import require
from ops.training_k8s_job import run_locations


@dataclass
class SageMakerJobSpec:
    name: str
    image_tag: str = "latest"
    instance_type: str = "ml.p4d.24xlarge"
    instance_count: int = 1
    preset: str = "debug"
    data: str = ""
    max_steps: int | None = None
    save_every: int | None = None
    overrides: list[str] = field(default_factory=list)
    spot: bool = False
    """Managed spot training: cheaper; interruptions cost at most one checkpoint interval."""
    max_runtime_s: int = 24 * 3600
    max_wait_s: int = 48 * 3600
    """Spot only: runtime plus time spent waiting for capacity."""
    volume_gb: int = 200

    def __post_init__(self) -> None:
        if not (1 <= len(self.name) <= 63):
            raise ValueError("SageMaker job names are 1-63 characters")
        if self.instance_count < 1:
            raise ValueError("instance_count must be >= 1")
        if self.spot and self.max_wait_s < self.max_runtime_s:
            raise ValueError("max_wait_s must be >= max_runtime_s for spot training")


def hyperparameters(spec: SageMakerJobSpec, locations: dict[str, str]) -> dict[str, str]:
    # SageMaker passes hyperparameters as strings; the entry point maps them back to CLI flags.
    hp = {"output": locations["output"], "export": locations["export"]}
    if spec.preset:  # none: the trainer picks (finetune for a real model, debug otherwise)
        hp["preset"] = spec.preset
    if spec.max_steps is not None:
        hp["max-steps"] = str(spec.max_steps)
    if spec.save_every is not None:
        hp["save-every"] = str(spec.save_every)
    for item in spec.overrides:
        key, _, value = item.partition("=")
        hp[key] = value
    return hp


def build_training_job_request(spec: SageMakerJobSpec, outputs: dict[str, Any]) -> dict[str, Any]:
    """The `create_training_job` request, as a plain dict (printed by --dry-run, asserted on by tests)."""
    locations = run_locations(outputs, spec.name, spec.data)
    request: dict[str, Any] = {
        "TrainingJobName": spec.name,
        "RoleArn": require(outputs, out.SAGEMAKER_EXECUTION_ROLE_ARN),
        "AlgorithmSpecification": {
            "TrainingImage": f"{require(outputs, out.TRAINING_REPOSITORY_URL)}:{spec.image_tag}",
            "TrainingInputMode": "File",
        },
        "HyperParameters": hyperparameters(spec, locations),
        "InputDataConfig": [
            {
                "ChannelName": "train",
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": locations["data"],
                        # Every instance gets all data; the trainer shards by rank deterministically.
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            }
        ],
        "OutputDataConfig": {"S3OutputPath": f"s3://{require(outputs, out.MODELS_BUCKET)}/sagemaker-output/"},
        "ResourceConfig": {
            "InstanceType": spec.instance_type,
            "InstanceCount": spec.instance_count,
            "VolumeSizeInGB": spec.volume_gb,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": spec.max_runtime_s},
        "EnableManagedSpotTraining": spec.spot,
        "Environment": {"PYTHONUNBUFFERED": "1"},
        "Tags": [{"Key": k, "Value": str(v)} for k, v in sorted((outputs.get(out.TAGS) or {}).items())],
    }
    if spec.spot:
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = spec.max_wait_s
    kms = outputs.get(out.KMS_KEY_ARN)
    if kms:
        request["OutputDataConfig"]["KmsKeyId"] = kms
        request["ResourceConfig"]["VolumeKmsKeyId"] = kms
    if spec.instance_count > 1:
        # Inter-node traffic (NCCL) stays encrypted in transit between training instances.
        request["EnableInterContainerTrafficEncryption"] = True
    return request


def submit(request: dict[str, Any], region: str | None) -> str:
    import boto3

    client = boto3.client("sagemaker", region_name=region)
    return client.create_training_job(**request)["TrainingJobArn"]


def model_trainer_view(request: dict[str, Any]) -> str:
    """The same job in SageMaker Python SDK terms (`sagemaker` 3.x `ModelTrainer`, sagemaker-train 1.27 /
    sagemaker-core 2.27: `Compute` is the API's ResourceConfig plus `enable_managed_spot_training`), so that SDK users
    can read what the launcher submits. The launcher itself calls CreateTrainingJob with boto3 (docs/training.md,
    "SageMaker Python SDK")."""
    r, stop, output = request["ResourceConfig"], request["StoppingCondition"], request["OutputDataConfig"]
    channel = request["InputDataConfig"][0]
    compute = [
        f"instance_type={r['InstanceType']!r}",
        f"instance_count={r['InstanceCount']}",
        f"volume_size_in_gb={r['VolumeSizeInGB']}",
        f"enable_managed_spot_training={request['EnableManagedSpotTraining']}",
    ]
    if "VolumeKmsKeyId" in r:
        compute.append(f"volume_kms_key_id={r['VolumeKmsKeyId']!r}")
    stopping = [f"max_runtime_in_seconds={stop['MaxRuntimeInSeconds']}"]
    if "MaxWaitTimeInSeconds" in stop:
        stopping.append(f"max_wait_time_in_seconds={stop['MaxWaitTimeInSeconds']}")
    out = [f"s3_output_path={output['S3OutputPath']!r}"]
    if "KmsKeyId" in output:
        out.append(f"kms_key_id={output['KmsKeyId']!r}")
    lines = [
        "ModelTrainer(",
        f"    training_image={request['AlgorithmSpecification']['TrainingImage']!r},",
        f"    role={request['RoleArn']!r},",
        f"    base_job_name={request['TrainingJobName']!r},  # the launcher uses the name as given, no timestamp",
        f"    compute=Compute({', '.join(compute)}),",
        f"    stopping_condition=StoppingCondition({', '.join(stopping)}),",
        f"    output_data_config=OutputDataConfig({', '.join(out)}),",
        f"    hyperparameters={request['HyperParameters']!r},",
        f"    environment={request['Environment']!r},",
        f"    training_input_mode={request['AlgorithmSpecification']['TrainingInputMode']!r},",
        ").train(input_data_config=[InputData(channel_name="
        f"{channel['ChannelName']!r}, data_source={channel['DataSource']['S3DataSource']['S3Uri']!r})])",
    ]
    if request.get("EnableInterContainerTrafficEncryption"):
        lines.insert(-1, "    # + networking=Networking(enable_inter_container_traffic_encryption=True)")
    return "\n".join(lines)
