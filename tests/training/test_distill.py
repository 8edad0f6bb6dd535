"""Knowledge distillation (training/distill.py): the chunked loss equals KL + CE on full logits (value and
gradients, ignored labels excluded), alpha = 0 is exactly today's loss, the trainer distils on one process, under
DDP and FSDP2, resumes after SIGTERM, records the teacher in the export, and refuses a teacher with another
tokenizer before any step."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from train_helpers import Run, parse_records, run_training, train_cmd

from tests.helpers import REPO_ROOT
from training.debug_model import build_model, build_tokenizer
from training.distill import linear_distillation, reference_distillation_loss
from training.export import EXPORT_INFO
from training.loss import IGNORE_INDEX, linear_cross_entropy

STEPS = 12
COMMON = ("--max-steps", str(STEPS), "--save-every", "4", "--set", "data.seq_len=32")


@pytest.mark.parametrize(("alpha", "temperature", "chunk_tokens"), [(0.5, 1.0, 7), (1.0, 2.5, 64), (0.3, 0.7, 1000)])
def test_loss_and_gradients_equal_reference_kl_plus_ce(alpha: float, temperature: float, chunk_tokens: int) -> None:
    torch.manual_seed(0)
    tokens, hidden_size, vocab = 50, 16, 97
    hidden = torch.randn(tokens, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(tokens, 24, dtype=torch.float64)  # the teacher may be wider
    t_weight = torch.randn(vocab, 24, dtype=torch.float64)
    labels = torch.randint(0, vocab, (tokens,))
    labels[::4] = IGNORE_INDEX  # ignored rows count in neither term

    ref = reference_distillation_loss(hidden @ weight.t(), t_hidden @ t_weight.t(), labels, alpha, temperature)
    ref_gh, ref_gw = torch.autograd.grad(ref * 3.0, (hidden, weight))
    got = linear_distillation(hidden, weight, t_hidden, t_weight, labels, alpha, temperature, chunk_tokens)
    got_gh, got_gw = torch.autograd.grad(got * 3.0, (hidden, weight))

    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_gw, ref_gw, rtol=1e-5, atol=1e-6)
    # The reference itself is KL + CE: a student equal to the teacher leaves the CE term only.
    same = reference_distillation_loss(t_hidden @ t_weight.t(), t_hidden @ t_weight.t(), labels, alpha, temperature)
    ce = torch.nn.functional.cross_entropy(t_hidden @ t_weight.t(), labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(same.double(), (1 - alpha) * ce, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_exactly_the_plain_loss() -> None:
    torch.manual_seed(1)
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    labels = torch.randint(0, 97, (40,))
    labels[:5] = IGNORE_INDEX
    plain = linear_cross_entropy(hidden, weight, labels, 16)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    kd = linear_distillation(hidden, weight, torch.randn(40, 8), torch.randn(97, 8), labels, 0.0, 2.0, 16)
    kd_grads = torch.autograd.grad(kd, (hidden, weight))
    assert torch.equal(plain, kd)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, kd_grads, strict=True))


def _write_model(out: Path, seed: int, vocab_size: int | None = None) -> Path:
    tokenizer = build_tokenizer(vocab_size=vocab_size) if vocab_size else build_tokenizer()
    build_model(tokenizer, seed=seed).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A debug Llama with other weights than the student's (seed 1): same tokenizer, a different distribution."""
    return _write_model(tmp_path_factory.mktemp("teacher") / "teacher", seed=1)


def test_alpha_zero_trains_exactly_like_plain_training(corpus: Path, teacher: Path, tmp_path: Path) -> None:
    args = ("--data", str(corpus), "--max-steps", "4", "--save-every", "0", "--set", "data.seq_len=32")
    plain = run_training(*args, "--output", str(tmp_path / "plain"), ranks=1)
    kd = run_training(*args, "--output", str(tmp_path / "kd"), "--distill-from", str(teacher),
                      "--set", "distill.alpha=0", ranks=1)  # fmt: skip
    for run in (plain, kd):
        assert run.returncode == 0, run.stderr[-3000:]
    assert kd.losses == plain.losses
    assert f"distill_from={teacher} alpha=0 T=1" in kd.stderr


@pytest.fixture(scope="module")
def fsdp_kd(corpus: Path, teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("kd-fsdp")
    return run_training("--data", str(corpus), "--output", str(out), "--strategy", "fsdp", "--distill-from",
                        str(teacher), "--set", "distill.temperature=2", *COMMON)  # fmt: skip


def test_fsdp_distillation_learns_and_records_the_teacher_in_the_export(fsdp_kd: Run, teacher: Path) -> None:
    assert fsdp_kd.returncode == 0, fsdp_kd.stderr[-3000:]
    losses = fsdp_kd.losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < 0.8 * losses[1], losses
    export = Path(fsdp_kd.events("exported")[0]["path"])
    info = json.loads((export / EXPORT_INFO).read_text())
    assert info["distillation"] == {"teacher": str(teacher), "alpha": 0.5, "temperature": 2.0}
    # The teacher is not part of the student: same parameter names and shapes as the debug model's.
    from safetensors.torch import load_file

    saved = load_file(export / "model.safetensors")
    assert set(saved) == set(build_model(build_tokenizer()).state_dict())


def test_ddp_distillation_matches_fsdp(corpus: Path, teacher: Path, tmp_path: Path, fsdp_kd: Run) -> None:
    ddp = run_training("--data", str(corpus), "--output", str(tmp_path), "--strategy", "ddp", "--distill-from",
                       str(teacher), "--set", "distill.temperature=2", *COMMON)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    for step, loss in fsdp_kd.losses.items():
        assert ddp.losses[step] == pytest.approx(loss, rel=1e-3, abs=1e-3)


def test_distillation_resumes_after_sigterm_on_the_same_trajectory(
    corpus: Path, teacher: Path, tmp_path: Path, fsdp_kd: Run
) -> None:
    args = ("--data", str(corpus), "--output", str(tmp_path), "--strategy", "fsdp", "--distill-from", str(teacher),
            "--set", "distill.temperature=2", *COMMON)  # fmt: skip
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    seen = []
    for line in proc.stdout:
        if line.startswith("{"):
            seen.append(json.loads(line))
            if seen[-1].get("step", 0) >= 5 and "loss" in seen[-1]:
                proc.send_signal(signal.SIGTERM)
                break
    seen += parse_records(proc.stdout.read())
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, stderr[-3000:]
    stopped_at = next(r for r in seen if r.get("event") == "preempted")["checkpoint_step"]
    assert 5 <= stopped_at < STEPS
    state = json.loads((tmp_path / "checkpoints" / f"step_{stopped_at:08d}" / "train_state.json").read_text())
    assert state["config"]["distill"] == {"teacher": str(teacher), "alpha": 0.5, "temperature": 2.0}

    resumed = run_training(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.events("resumed")[0]["step"] == stopped_at
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(fsdp_kd.losses[step], rel=1e-4, abs=1e-5), step


def test_a_teacher_with_another_tokenizer_is_refused_before_any_step(corpus: Path, tmp_path: Path) -> None:
    other = _write_model(tmp_path / "other", seed=1, vocab_size=600)
    run = run_training("--data", str(corpus), "--output", str(tmp_path / "run"), "--distill-from", str(other),
                       *COMMON, ranks=1)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"error: distill.teacher={other}: its tokenizer differs from the student's" in run.stderr
    assert "Traceback" not in run.stderr
    assert not run.records and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [("distill.alpha=1.5", "distill.alpha must be in [0, 1]"), ("distill.temperature=0", "distill.temperature must")],
)
def test_bad_distill_config_is_exit_2(override: str, message: str, corpus: Path, tmp_path: Path) -> None:
    run = run_training("--data", str(corpus), "--output", str(tmp_path), "--set", override, ranks=1, timeout=60)
    assert run.returncode == 2 and message in run.stderr


def test_fsdp_teacher_is_frozen_and_resharded_after_its_forward(teacher: Path, tmp_path: Path) -> None:
    """A one-rank gloo group: the teacher's layers are FSDP2 units that give their gathered weights back after
    each forward (a layer that is its own root would keep them by default), and nothing of it trains."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from training.config import DistillConfig, ParallelConfig
    from training.distill import load_teacher
    from training.parallelize import Dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        tok = build_tokenizer()
        student = build_model(tok)
        t = load_teacher(DistillConfig(teacher=str(teacher)), ParallelConfig(strategy="fsdp"), d, tmp_path, student,
                         tok, bf16=False, say=lambda _: None)  # fmt: skip
        hidden = t.hidden_states(torch.randint(0, len(tok), (2, 16)))
        assert hidden.shape == (2, 16, student.config.hidden_size)  # the identity head returns hidden states
        layer_params = [p for layer in t.model.model.layers for p in layer.parameters()]
        assert layer_params and all(isinstance(p, DTensor) for p in layer_params), "left unsharded after forward"
        assert not any(p.requires_grad for p in t.model.parameters()) and not t.model.training
        assert not isinstance(t.head_weight, DTensor) and not t.head_weight.requires_grad
    finally:
        dist.destroy_process_group()
