"""The trainer's Prometheus endpoint: the `llm_training_*` series over HTTP, and the train loop feeding them."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import training.metrics
from ops.net import free_port
from training.config import ConfigError, apply_overrides, preset
from training.metrics import TrainingMetrics, start_training_metrics
from training.train import train


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_served_over_http_and_follow_the_logged_steps() -> None:
    metrics = TrainingMetrics()
    port = metrics.serve(0, addr="127.0.0.1")
    try:
        before = scrape(port)
        assert before["llm_training_step"] == 0 and before["llm_training_checkpoints_total"] == 0
        assert "llm_training_mfu" not in before  # unknown until a step reports it (CPU never does)
        metrics.set_step(10)
        metrics.record_step({"step": 12, "loss": 2.5, "lr": 3e-4, "tokens_per_s": 1234.5}, tokens=2048)
        metrics.record_step({"step": 14, "loss": 2.25, "lr": 2e-4, "tokens_per_s": 1500.0, "mfu": 0.41}, tokens=2048)
        metrics.checkpoint_saved(14)
        values = scrape(port)
    finally:
        metrics.close()
    assert values["llm_training_step"] == 14
    assert values["llm_training_loss"] == 2.25
    assert values["llm_training_learning_rate"] == pytest.approx(2e-4)
    assert values["llm_training_tokens_per_second"] == 1500.0
    assert values["llm_training_mfu"] == pytest.approx(0.41)
    assert values["llm_training_tokens_total"] == 4096
    assert values["llm_training_checkpoints_total"] == 1


def test_only_global_rank_zero_publishes_and_only_local_rank_zero_serves() -> None:
    assert start_training_metrics(0, rank=0, local_rank=0) is None  # off
    assert start_training_metrics(free_port(), rank=1, local_rank=1) is None
    port = free_port()
    other_node = start_training_metrics(port, rank=8, local_rank=0)
    assert other_node is not None and not other_node.publish
    try:
        assert scrape(port) == {}  # answers the scrape, with no series to mislead a dashboard
        other_node.record_step({"step": 1, "loss": 1.0, "lr": 1.0, "tokens_per_s": 1.0}, tokens=1)
        assert scrape(port) == {}
        # A port already taken is a warning, not a failed run.
        assert start_training_metrics(port, rank=0, local_rank=0) is None
    finally:
        other_node.close()


def test_metrics_port_is_a_validated_config_field() -> None:
    assert preset("debug").metrics_port == 0
    assert apply_overrides(preset("debug"), ["metrics_port=9400"]).metrics_port == 9400
    with pytest.raises(ConfigError, match="metrics_port"):
        apply_overrides(preset("debug"), ["metrics_port=70000"])


def test_train_loop_feeds_the_metrics(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRAINING_LOCAL_DIR", str(tmp_path / "scratch"))
    started: list[TrainingMetrics | None] = []

    def spy(port: int, rank: int, local_rank: int) -> TrainingMetrics | None:
        started.append(start_training_metrics(port, rank, local_rank))
        return started[-1]

    monkeypatch.setattr(training.metrics, "start_training_metrics", spy)
    cfg = apply_overrides(
        preset("debug"),
        [f"data.path={corpus}", f"output={tmp_path / 'run'}", "max_steps=4", "checkpoint.save_every=2",
         "log_every=2", f"metrics_port={free_port()}"],
    )  # fmt: skip
    assert train(cfg) == 0
    (metrics,) = started
    assert metrics is not None and metrics._server is None  # closed when the run ends
    records = [r for r in map(json.loads, capsys.readouterr().out.splitlines()) if "loss" in r]
    value = metrics.registry.get_sample_value
    assert value("llm_training_step") == 4
    assert value("llm_training_loss") == records[-1]["loss"]
    assert value("llm_training_learning_rate") == records[-1]["lr"]
    tokens_per_step = cfg.parallel.micro_batch_size * cfg.data.seq_len
    assert value("llm_training_tokens_total") == 4 * tokens_per_step
    assert value("llm_training_checkpoints_total") == 2  # step 2 and the final one
    assert value("llm_training_mfu") is None  # CPU: no known peak
