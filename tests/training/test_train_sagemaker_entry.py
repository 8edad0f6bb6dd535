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
