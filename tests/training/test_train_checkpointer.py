"""The loop's parts without a model: when `Checkpointer` saves and what it reports, and a `Reporter` that is off."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from training.checkpoint import Checkpointer, Resumed
from training.metrics import Reporter, TrainingMetrics


@dataclass
class FakeManager:
    """CheckpointManager's save/load, recording the steps saved."""

    saved: list[int] = field(default_factory=list)
    uri: str = "s3://bucket/run/checkpoints"

    @property
    def remote(self) -> Any:
        return self

    def save(self, step: int, states: dict[str, Any], config: dict) -> float:
        # every entry's state as DCP would write it (state_dict() called at save time)
        assert {k: v.state_dict() for k, v in states.items()} == {"loader": {"position": step}}
        assert config == {"name": "run"}
        self.saved.append(step)
        return 0.25

    def load(self, step: int, states: dict[str, Any]) -> Resumed:
        states["loader"].load_state_dict({"position": step})  # what DCP does with the loaded values
        return Resumed(step=step, config={})


class FakeLoader:
    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def run(
    save_every: int, max_steps: int, stop_at: int | None = None, resume_from: int | None = None
) -> tuple[list[int], float | None]:
    """The loop's checkpoint calls as `_train` makes them; the steps saved and the checkpoints counter."""
    manager, loader = FakeManager(), FakeLoader()
    series = TrainingMetrics()
    with Reporter(True, series, max_steps) as report:
        ckpt = Checkpointer(manager, {"loader": loader}, {"name": "run"}, report, save_every, max_steps)
        step = ckpt.resume(resume_from)
        assert loader.position == (resume_from or 0)
        while step < max_steps:
            if step == stop_at:
                ckpt.save_on_stop(step)
                break
            step += 1
            loader.position = step
            ckpt.save_if_due(step)
        else:
            ckpt.save_final(step)
    return manager.saved, series.registry.get_sample_value("llm_training_checkpoints_total")


def events(capsys: pytest.CaptureFixture[str]) -> list[tuple[Any, ...]]:
    return [tuple(r.values()) for r in map(json.loads, capsys.readouterr().out.splitlines())]


def test_saves_every_interval_before_the_last_step_then_the_last_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(save_every=2, max_steps=5)[0] == [2, 4, 5]
    assert events(capsys) == [("checkpoint", 2, 0.25), ("checkpoint", 4, 0.25), ("checkpoint", 5, 0.25)]
    saved, count = run(save_every=2, max_steps=4)
    assert saved == [2, 4] and count == 2  # step 4: the final save, not an interval one as well
    assert events(capsys) == [("checkpoint", 2, 0.25), ("checkpoint", 4, 0.25)]
    assert run(save_every=0, max_steps=3)[0] == [3]


def test_a_stop_saves_unless_nothing_was_trained_since_the_last_save(capsys: pytest.CaptureFixture[str]) -> None:
    saved, count = run(save_every=2, max_steps=10, stop_at=3)
    assert saved == [2, 3] and count == 2
    assert events(capsys)[-1] == ("preempted", 3, 3, 0.25)
    saved, count = run(save_every=2, max_steps=10, stop_at=2)
    assert saved == [2] and count == 1
    assert events(capsys)[-1] == ("preempted", 2, 2, 0.0)
    assert run(save_every=0, max_steps=10, stop_at=0)[0] == []
    assert events(capsys) == [("preempted", 0, 0, 0.0)]


def test_a_resumed_run_does_not_save_its_resumed_step_again(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(save_every=2, max_steps=4, resume_from=4)[0] == []
    assert events(capsys) == [("resumed", 4, "s3://bucket/run/checkpoints/step_00000004")]
    assert run(save_every=2, max_steps=6, resume_from=4, stop_at=4)[0] == []
    assert events(capsys)[-1] == ("preempted", 4, 4, 0.0)
    assert run(save_every=0, max_steps=6, resume_from=4)[0] == [6]


def test_a_reporter_that_is_off_reports_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with Reporter(False, None, 10) as report:
        report.event("start", 0, max_steps=10)
        report.at_step(0)
        report.step_logged({"step": 1, "loss": 1.0, "lr": 1.0, "tokens_per_s": 1.0}, tokens=1)
        report.checkpoint_saved(1)
    assert capsys.readouterr().out == ""
