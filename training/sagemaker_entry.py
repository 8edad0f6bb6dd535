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
This module turns that into one `torchrun` command (static rendezvous at the first host) and execs it.
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


def _hp_value(raw: object) -> str:
    # SageMaker stores hyperparameters as JSON strings; some SDKs double-encode them ('"debug"').
    s = str(raw)
    if len(s) >= 2 and s[0] == s[-1] == '"':
        s = json.loads(s)
    return s


def trainer_args(hp: Mapping[str, object], env: Mapping[str, str]) -> list[str]:
    """CLI flags for `python -m training` from hyperparameters and the SageMaker environment."""
    params = {k: _hp_value(v) for k, v in hp.items()}
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


def config_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get("SM_INPUT_CONFIG_DIR", CONFIG_DIR))


def sagemaker_env(env: Mapping[str, str], input_data: Path = INPUT_DATA) -> dict[str, str]:
    """`env` completed with the SM_* variables the toolkit would set, derived from SageMaker's files."""
    full = dict(env)
    resource_config = config_dir(env) / "resourceconfig.json"
    if "SM_HOSTS" not in full and resource_config.is_file():
        rc = json.loads(resource_config.read_text(encoding="utf-8"))
        full["SM_HOSTS"] = json.dumps(rc["hosts"])
        full["SM_CURRENT_HOST"] = rc["current_host"]
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
    argv = torchrun_argv(hp, sagemaker_env(os.environ))
    print("exec:", " ".join(argv), flush=True)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
