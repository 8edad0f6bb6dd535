"""Validation before anything paid starts: the launcher refuses what the trainer, the pool or the GPU would."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, STACK_OUTPUTS_DEV
from training import fit
from training.config import preset

DOCS_TRAINING = REPO_ROOT / "docs" / "training.md"


def launch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.launch_training", "--stack", "dev", "--outputs", str(STACK_OUTPUTS_DEV),
         "--name", "run1", "--data", "corpora/c4", "--image-tag", "v1", "--dry-run", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("target", ["eks", "sagemaker"])
def test_a_preset_without_its_model_is_refused_before_submission(target: str) -> None:
    proc = launch("--target", target, "--preset", "llama-8b", "--instance-type", "ml.p4d.24xlarge")
    assert proc.returncode == 2
    assert "needs a model: pass --model" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("target", ["eks", "sagemaker"])
def test_the_trainers_own_config_errors_are_refused(target: str) -> None:
    proc = launch("--target", target, "--model", "base/m", "--set", "optim.lr=-1")
    assert proc.returncode == 2 and "optim.lr must be > 0" in proc.stderr and "Traceback" not in proc.stderr
    proc = launch("--target", target, "--set", "parallel.nope=1")
    assert proc.returncode == 2 and "has no field 'nope'" in proc.stderr


def test_sagemaker_hyperparameters_the_entry_point_would_refuse_are_refused() -> None:
    proc = launch("--target", "sagemaker", "--set", "bogus=1")
    assert proc.returncode == 2 and "unknown hyperparameters ['bogus']" in proc.stderr


def test_more_nodes_than_the_pool_can_have_is_an_error_naming_the_fix() -> None:
    proc = launch("--target", "eks", "--nodes", "5", "--model", "base/m")  # the fixture's pool: max_size 4
    assert proc.returncode == 2
    assert "--nodes 5 is more than the 'training' pool's maximum of 4" in proc.stderr
    assert "trainingMaxSize" in proc.stderr and "Traceback" not in proc.stderr
    assert launch("--target", "eks", "--nodes", "4", "--model", "base/m").returncode == 0


def test_a_preset_that_cannot_fit_the_pools_gpu_is_refused_with_the_nodes_it_needs() -> None:
    # llama-8b on one g6e.12xlarge (4 x L40S): model state alone is 30 GiB per GPU.
    proc = launch("--target", "eks", "--preset", "llama-8b", "--model", "base/llama-3.1-8b", "--nodes", "1")
    assert proc.returncode == 2 and "does not fit 1 x g6e.12xlarge" in proc.stderr and "pass --nodes 2" in proc.stderr
    ok = launch("--target", "eks", "--preset", "llama-8b", "--model", "base/llama-3.1-8b", "--nodes", "2")
    assert ok.returncode == 0, ok.stderr
    proc = launch("--target", "sagemaker", "--preset", "llama-3b", "--model", "b/m", "--instance-type", "ml.g5.xlarge")
    assert proc.returncode == 2 and "does not fit 1 x ml.g5.xlarge" in proc.stderr


def test_the_documented_examples_pass_the_launchers_checks() -> None:
    text = DOCS_TRAINING.read_text()
    commands = re.findall(r"^python -m ops\.launch_training (.*?--dry-run)", text.replace("\\\n", " "), re.M)
    assert len(commands) >= 2
    for cmd in commands:
        args = cmd.replace("<tag>", "v1").split()[2:]  # drop "--stack dev": launch() passes it
        proc = subprocess.run(
            [sys.executable, "-m", "ops.launch_training", "--stack", "dev", "--outputs", str(STACK_OUTPUTS_DEV), *args],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, (cmd, proc.stderr)


def test_fit_model_states_its_parts_and_the_docs_table_matches_it() -> None:
    cfg = preset("llama-1b")
    e = fit.estimate(fit.PRESET_SHAPES["llama-1b"], cfg, gpus=1, gpu_gib=80)
    # The calibration point: 4 x 4096 tokens of llama-1b took 25 GiB of activations on one H100 (bench/RESULTS.md).
    assert e.activations_gib == pytest.approx(25.0)
    assert e.model_state_gib == pytest.approx(16 * fit.PRESET_SHAPES["llama-1b"].params / 2**30)
    # FSDP shards the model state over every GPU; DDP does not.
    sharded = fit.estimate(fit.PRESET_SHAPES["llama-1b"], cfg, gpus=8, gpu_gib=80)
    assert sharded.model_state_gib == pytest.approx(e.model_state_gib / 8)
    text = DOCS_TRAINING.read_text()
    for name in fit.PRESET_SHAPES:
        row = re.search(rf"^\| `{name}` .*$", text, re.M)
        assert row, name
        cells = [c.strip() for c in row.group(0).strip("|").split("|")][1:]
        want = [fit.fewest_nodes(preset(name), t) for t in ("g6e.xlarge", "g6e.12xlarge", "p4d.24xlarge")]
        assert cells == [f"{n} node{'s' if n > 1 else ''}" for n in want], name


def test_sagemaker_dry_run_maps_to_the_sdks_model_trainer() -> None:
    proc = launch("--target", "sagemaker", "--instance-count", "2", "--spot")
    assert proc.returncode == 0, proc.stderr
    import json

    request = json.loads(proc.stdout)  # stdout stays the CreateTrainingJob request
    view = proc.stderr
    assert "ModelTrainer(" in view
    assert f"training_image={request['AlgorithmSpecification']['TrainingImage']!r}" in view
    assert "compute=Compute(instance_type='ml.p4d.24xlarge', instance_count=2, volume_size_in_gb=200, " in view
    assert "enable_managed_spot_training=True" in view
    assert "StoppingCondition(max_runtime_in_seconds=86400, max_wait_time_in_seconds=172800)" in view
    assert "InputData(channel_name='train', data_source=" in view
    assert "Networking(enable_inter_container_traffic_encryption=True)" in view
