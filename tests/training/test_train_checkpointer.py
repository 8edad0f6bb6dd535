"""The loop's parts without a model: when `Checkpointer` saves and what it reports, a `Reporter` that is off, and
the checkpoint's dict of Stateful entries through the real CheckpointManager."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from training.checkpoint import Checkpointer, CheckpointManager, Resumed
from training.config import ConfigError
from training.metrics import Reporter, TrainingMetrics
from training.parallelize import Dist


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


class Teacher:
    """A new piece of state, as a distillation run would add it: one entry, plain Python values and a tensor."""

    def __init__(self, name: str, temperature: float) -> None:
        self.name, self.temperature = name, torch.tensor([temperature])

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "temperature": self.temperature}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.name = state["name"]
        self.temperature.copy_(state["temperature"])


def test_new_state_is_one_entry_and_an_old_checkpoint_without_it_is_a_config_error(tmp_path: Path) -> None:
    """The real CheckpointManager (DCP on a local directory): an added entry is saved and restored by name; resuming
    a checkpoint written before the entry existed stops with a ConfigError naming it, not DCP's traceback."""
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    manager = CheckpointManager(str(tmp_path / "run"), tmp_path / "scratch", d, keep_last=2)
    loader = FakeLoader()
    loader.position = 7
    manager.save(3, {"loader": loader, "teacher": Teacher("llama-70b", 2.0)}, {"name": "run"})
    fresh_loader, fresh_teacher = FakeLoader(), Teacher("", 1.0)
    resumed = manager.load(3, {"loader": fresh_loader, "teacher": fresh_teacher})
    assert resumed.step == 3 and resumed.config == {"name": "run"}
    assert fresh_loader.position == 7 and fresh_teacher.name == "llama-70b"
    assert float(fresh_teacher.temperature) == 2.0

    manager.save(4, {"loader": loader}, {"name": "run"})
    with pytest.raises(ConfigError, match=r"step_00000004 holds no teacher state"):
        manager.load(4, {"loader": FakeLoader(), "teacher": Teacher("", 1.0)})
