"""The SageMaker training-container contract: `train` (the image's entry point) runs this module.

SageMaker starts the image with `train` on every instance and describes the job through files and variables:
    /opt/ml/input/config/hyperparameters.json   string-valued hyperparameters (our CLI flags);
                                                the directory is SM_INPUT_CONFIG_DIR when set
    SM_CHANNEL_TRAIN (or any SM_CHANNEL_*)       the local directory holding the `train` channel's data
    SM_MODEL_DIR (/opt/ml/model)                 uploaded as model.tar.gz when the job ends
    /opt/ml/checkpoints                          synced with the job's CheckpointConfig, if one is set
    SM_HOSTS, SM_CURRENT_HOST, SM_NUM_GPUS       the cluster: one torchrun node per host
The SM_* variables are set by SageMaker's training toolkit; a bare bring-your-own image gets only the files
(/opt/ml/input/config/resourceconfig.json, /opt/ml/input/data/<channel>), so `sagemaker_env` derives the same
variables from them when they are absent.
This module turns that into one `torchrun` command (static rendezvous at the first host) and execs it, with the
network environment SageMaker's own `torch_distributed` launcher sets (`network_env`): NCCL's socket interface from
resourceconfig.json, and libfabric's EFA provider / device RDMA on the instance types that have them.

Hyperparameters named `sagemaker_*` are the SDK's own (sagemaker_program, sagemaker_region, sagemaker_job_name...,
sagemaker-training-toolkit params.py SAGEMAKER_PREFIX): they are not trainer flags and are ignored, as the toolkit
keeps them out of the user's arguments.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from training.torchrun import SAGEMAKER_STOP_GRACE_S, shutdown_timeout

CONFIG_DIR = "/opt/ml/input/config"
INPUT_DATA = Path("/opt/ml/input/data")
CHECKPOINT_DIR = "/opt/ml/checkpoints"
MODEL_DIR = "/opt/ml/model"
MASTER_PORT = 29500
FLAG_KEYS = ("preset", "output", "export", "model", "max-steps", "save-every", "strategy")
SDK_PREFIX = "sagemaker_"
"""Hyperparameters the SageMaker SDK adds (sagemaker-training-toolkit v5.1.0 src/sagemaker_training/params.py)."""

# Instance types on which SageMaker's torch_distributed launcher turns on EFA (FI_PROVIDER=efa) and EFA device RDMA
# (FI_EFA_USE_DEVICE_RDMA=1): SM_EFA_NCCL_INSTANCES and SM_EFA_RDMA_INSTANCES of sagemaker-training-toolkit v5.1.0
# (src/sagemaker_training/__init__.py, used by torch_distributed.py `_setup`), plus the p5 family (p5e, p5en are
# not in that release's lists at all). The toolkit's RDMA list leaves p5 out; we add it because p5's EFA devices do
# RDMA (EC2 user guide, EFA supported instance types). Not copied: the toolkit also forces NCCL_PROTO=simple on EFA
# instances; here NCCL picks its protocol. Unverified on hardware either way: NCCL_DEBUG=INFO on the first
# multi-node run shows which transport and protocol NCCL took.
EFA_INSTANCES = frozenset(
    {
        "ml.g4dn.8xlarge",
        "ml.g4dn.12xlarge",
        "ml.g5.48xlarge",
        "ml.p3dn.24xlarge",
        "ml.p4d.24xlarge",
        "ml.p4de.24xlarge",
        "ml.p5.48xlarge",
        "ml.p5e.48xlarge",
        "ml.p5en.48xlarge",
        "ml.trn1.32xlarge",
        "ml.p6e-gb200.36xlarge",
    }
)
EFA_RDMA_INSTANCES = frozenset(
    {
        "ml.p4d.24xlarge",
        "ml.p4de.24xlarge",
        "ml.p5.48xlarge",
        "ml.p5e.48xlarge",
        "ml.p5en.48xlarge",
        "ml.trn1.32xlarge",
        "ml.p6e-gb200.36xlarge",
    }
)


def _hp_value(raw: object) -> str:
    # SageMaker stores hyperparameters as JSON strings; some SDKs double-encode them ('"debug"').
    s = str(raw)
    if len(s) >= 2 and s[0] == s[-1] == '"':
        s = json.loads(s)
    return s


def trainer_args(hp: Mapping[str, object], env: Mapping[str, str]) -> list[str]:
    """CLI flags for `python -m training` from hyperparameters and the SageMaker environment."""
    params = {k: _hp_value(v) for k, v in hp.items() if not k.startswith(SDK_PREFIX)}
    channel = env.get("SM_CHANNEL_TRAIN") or next(
        (v for k, v in sorted(env.items()) if k.startswith("SM_CHANNEL_")), None
    )
    if channel is None:
        raise SystemExit("error: no input channel: the training job needs a 'train' channel (SM_CHANNEL_TRAIN)")
    args = ["--data", channel]
    # Default locations follow the contract; the launcher overrides output/export with S3 prefixes so that
    # checkpoints use the trainer's own marker protocol and the model lands in the models bucket as a directory.
    params.setdefault("output", CHECKPOINT_DIR)
    params.setdefault("export", env.get("SM_MODEL_DIR", MODEL_DIR))
    for key in FLAG_KEYS:
        if key in params:
            args += [f"--{key}", params[key]]
    unknown = sorted(k for k in params if k not in FLAG_KEYS and "." not in k)
    if unknown:
        raise SystemExit(f"error: unknown hyperparameters {unknown}: use trainer flags or dotted config keys")
    for key in sorted(k for k in params if "." in k):
        args += ["--set", f"{key}={params[key]}"]
    return args


def torchrun_argv(hp: Mapping[str, object], env: Mapping[str, str]) -> list[str]:
    hosts = json.loads(env.get("SM_HOSTS", '["algo-1"]'))
    current = env.get("SM_CURRENT_HOST", hosts[0])
    gpus = int(env.get("SM_NUM_GPUS", "0"))
    return [
        sys.executable,
        "-m",
        "training.torchrun",  # torchrun that exits 143 on SIGTERM (StopTrainingJob, spot)
        f"--shutdown-timeout={shutdown_timeout(SAGEMAKER_STOP_GRACE_S)}",
        f"--nnodes={len(hosts)}",
        f"--node_rank={hosts.index(current)}",
        f"--nproc_per_node={max(gpus, 1)}",
        # Static rendezvous: SageMaker fixes the host list for the job's lifetime and restarts the whole job on
        # failure, so elastic membership buys nothing here.
        # One host needs no network rendezvous (and its own name may not resolve outside SageMaker).
        f"--master_addr={hosts[0] if len(hosts) > 1 else '127.0.0.1'}",
        f"--master_port={MASTER_PORT}",
        "-m",
        "training",
        *trainer_args(hp, env),
    ]


def network_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables NCCL and libfabric need on this instance, as SageMaker's torch_distributed launcher sets them
    (sagemaker-training-toolkit v5.1.0 src/sagemaker_training/torch_distributed.py `_setup`):
    NCCL_SOCKET_IFNAME = resourceconfig.json's network_interface_name (default eth0, as the toolkit's environment.py
    reads it); FI_PROVIDER=efa on EFA instances; FI_EFA_USE_DEVICE_RDMA=1 where EFA does device RDMA (p4d, p5...).
    A value already in `env` wins (an operator's override, e.g. NCCL_SOCKET_IFNAME=^lo,docker)."""
    rc = _resource_config(env)
    instance_type = env.get("SM_CURRENT_INSTANCE_TYPE") or str(rc.get("current_instance_type", ""))
    wanted = {
        "NCCL_SOCKET_IFNAME": env.get("SM_NETWORK_INTERFACE_NAME") or str(rc.get("network_interface_name", "eth0"))
    }
    if instance_type in EFA_INSTANCES:
        wanted["FI_PROVIDER"] = "efa"
    if instance_type in EFA_RDMA_INSTANCES:
        wanted["FI_EFA_USE_DEVICE_RDMA"] = "1"
    return {k: env.get(k, v) for k, v in wanted.items()}


def _resource_config(env: Mapping[str, str]) -> dict[str, object]:
    path = config_dir(env) / "resourceconfig.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def config_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get("SM_INPUT_CONFIG_DIR", CONFIG_DIR))


def sagemaker_env(env: Mapping[str, str], input_data: Path = INPUT_DATA) -> dict[str, str]:
    """`env` completed with the SM_* variables the toolkit would set, derived from SageMaker's files."""
    full = dict(env)
    rc = _resource_config(env)
    if "SM_HOSTS" not in full and rc:
        full["SM_HOSTS"] = json.dumps(rc["hosts"])
        full["SM_CURRENT_HOST"] = str(rc["current_host"])
    if not any(k.startswith("SM_CHANNEL_") for k in full) and input_data.is_dir():
        for channel in sorted(p for p in input_data.iterdir() if p.is_dir()):
            full[f"SM_CHANNEL_{channel.name.upper()}"] = str(channel)
    if "SM_NUM_GPUS" not in full:
        import torch

        full["SM_NUM_GPUS"] = str(torch.cuda.device_count())
    full.setdefault("SM_MODEL_DIR", MODEL_DIR)
    return full


def main() -> None:
    hp_file = config_dir(os.environ) / "hyperparameters.json"
    hp = json.loads(hp_file.read_text(encoding="utf-8")) if hp_file.is_file() else {}
    env = sagemaker_env(os.environ)
    argv = torchrun_argv(hp, env)
    network = network_env(env)
    print("exec:", " ".join(f"{k}={v}" for k, v in sorted(network.items())), " ".join(argv), flush=True)
    os.execve(argv[0], argv, {**os.environ, **network})


if __name__ == "__main__":
    main()
