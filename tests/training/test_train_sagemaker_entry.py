"""The training image's SageMaker entry point (`docker run <image> train`): the container files in, torchrun out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from training.sagemaker_entry import sagemaker_env, torchrun_argv


def test_sagemaker_entry_reads_bare_container_files(tmp_path: Path) -> None:
    """Without the SageMaker toolkit's SM_* variables, the contract's files describe the cluster."""
    rc = tmp_path / "resourceconfig.json"
    rc.write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    (tmp_path / "data" / "train").mkdir(parents=True)
    env = sagemaker_env({"SM_NUM_GPUS": "0", "SM_INPUT_CONFIG_DIR": str(tmp_path)}, input_data=tmp_path / "data")
    argv = torchrun_argv({}, env)
    joined = " ".join(argv)
    assert "--nnodes=1 --node_rank=0 --nproc_per_node=1" in joined
    # Defaults of the contract: checkpoints to /opt/ml/checkpoints, the model to SM_MODEL_DIR.
    assert f"--data {tmp_path / 'data' / 'train'}" in joined
    assert "--output /opt/ml/checkpoints" in joined and "--export /opt/ml/model" in joined
    with pytest.raises(SystemExit, match="unknown hyperparameters"):
        torchrun_argv({"bogus": "1"}, env)


def test_sagemaker_train_entry_point_runs_a_job_end_to_end(corpus: Path, tmp_path: Path) -> None:
    """What `docker run <image> train` does on one CPU instance: hyperparameters in, model in SM_MODEL_DIR out."""
    config = tmp_path / "config"
    config.mkdir()
    hp = {"preset": "debug", "max-steps": "4", "save-every": "2", "data.seq_len": "32",
          "output": str(tmp_path / "checkpoints")}  # fmt: skip
    (config / "hyperparameters.json").write_text(json.dumps(hp))
    env = dict(os.environ, SM_INPUT_CONFIG_DIR=str(config), SM_CHANNEL_TRAIN=str(corpus.parent),
               SM_MODEL_DIR=str(tmp_path / "model"), SM_HOSTS='["algo-1"]', SM_CURRENT_HOST="algo-1",
               SM_NUM_GPUS="0")  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "training.sagemaker_entry"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert '"event": "exported"' in proc.stdout
    # torchrun (and so NCCL in every rank) was started with the network environment (no resourceconfig: eth0)
    assert "exec: NCCL_SOCKET_IFNAME=eth0 " in proc.stdout


def _resource_config(tmp_path: Path, instance_type: str, interface: str | None = "ens32") -> dict[str, str]:
    """A resourceconfig.json as SageMaker writes it on a 2-host job (field names: sagemaker-training-toolkit
    v5.1.0 environment.py `read_resource_config`)."""
    rc = {"current_host": "algo-2", "current_instance_type": instance_type, "current_group_name": "homogeneousCluster",
          "hosts": ["algo-1", "algo-2"], "instance_groups": [{"instance_group_name": "homogeneousCluster",
          "instance_type": instance_type, "hosts": ["algo-1", "algo-2"]}]}  # fmt: skip
    if interface is not None:
        rc["network_interface_name"] = interface
    (tmp_path / "resourceconfig.json").write_text(json.dumps(rc))
    return {"SM_NUM_GPUS": "8", "SM_INPUT_CONFIG_DIR": str(tmp_path), "SM_CHANNEL_TRAIN": "/opt/ml/input/data/train"}


def test_network_env_follows_sagemakers_torch_distributed_launcher(tmp_path: Path) -> None:
    from training.sagemaker_entry import network_env

    env = sagemaker_env(_resource_config(tmp_path, "ml.p4d.24xlarge"))
    assert network_env(env) == {"NCCL_SOCKET_IFNAME": "ens32", "FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"}
    assert "--nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=algo-1" in " ".join(torchrun_argv({}, env))
    env = sagemaker_env(_resource_config(tmp_path, "ml.p5.48xlarge"))
    assert network_env(env)["FI_EFA_USE_DEVICE_RDMA"] == "1" and network_env(env)["FI_PROVIDER"] == "efa"
    # EFA without device RDMA (g5.48xlarge), no EFA at all (g5.12xlarge), no interface name: the toolkit's eth0
    env = sagemaker_env(_resource_config(tmp_path, "ml.g5.48xlarge"))
    assert network_env(env) == {"NCCL_SOCKET_IFNAME": "ens32", "FI_PROVIDER": "efa"}
    env = sagemaker_env(_resource_config(tmp_path, "ml.g5.12xlarge", interface=None))
    assert network_env(env) == {"NCCL_SOCKET_IFNAME": "eth0"}
    # an operator's value wins
    assert network_env({**env, "NCCL_SOCKET_IFNAME": "^lo,docker"})["NCCL_SOCKET_IFNAME"] == "^lo,docker"


def test_sdk_hyperparameters_are_ignored(tmp_path: Path) -> None:
    """The SDK adds sagemaker_* keys (JSON-encoded strings); they are not trainer flags."""
    env = sagemaker_env(_resource_config(tmp_path, "ml.p4d.24xlarge"))
    hp = {"sagemaker_program": '"train"', "sagemaker_region": '"us-east-1"', "sagemaker_job_name": '"job-1"',
          "sagemaker_container_log_level": "20", "preset": '"debug"', "data.seq_len": "32"}  # fmt: skip
    argv = torchrun_argv(hp, env)
    assert not any("sagemaker" in a for a in argv)
    assert "--preset debug" in " ".join(argv) and "data.seq_len=32" in argv
    with pytest.raises(SystemExit, match=r"unknown hyperparameters \['bogus'\]"):
        torchrun_argv({**hp, "bogus": "1"}, env)
