"""Sharded checkpoints: what a checkpoint holds (a dict of `Stateful` objects), how it is written (torch.distributed
.checkpoint, an atomic completion marker, resume and rotation), and when the run saves (`Checkpointer`).

What is checkpointed: `train.checkpointed_state(run)` returns `dict[str, Stateful]`, one entry per piece of state
(as torchtitan's CheckpointManager holds `states`: torchtitan/components/checkpointer/dcp.py @ b5bcd76):

    "model"   ModelState(model)                 the (sharded) weights, via get/set_model_state_dict
    "optim"   OptimizerState(model, optimizer)  AdamW's moments, via get/set_optimizer_state_dict
    "loader"  PackedLoader                      the data order's position (epoch, position)

Adding state is one entry there: any object with `state_dict()` and `load_state_dict(sd)` (the
`torch.distributed.checkpoint.stateful.Stateful` protocol; a distillation teacher's config, a data loader's
iterator state). DCP calls `state_dict()` on every rank at save and `load_state_dict()` with the loaded values at
resume, so the entry is restored before the first step. Its values may be tensors, DTensors or plain Python values
(ints, strings, lists: pickled). DCP keeps ONE copy of a key that every rank writes (rank 0's): state that differs
per rank must put the rank in its keys, e.g. `{f"rank_{rank}": ...}`, as torchtitan's dataloader does with
`dp_rank_{i}`. A checkpoint written before an entry existed has none of its keys: resuming it stops with a
ConfigError naming the missing entry (exit 2, before any state is touched) rather than DCP's missing-key traceback.

Layout under `<output>/checkpoints/step_00000120/`:
    .metadata, __<rank>_0.distcp   DCP shards of every Stateful entry, each rank writing its own
    train_state.json               step, world size and the full config (readable without torch)
    COMPLETE                       written last, by rank 0, after every shard and the state are in place

A checkpoint without COMPLETE (a crash or a kill mid-save, an upload cut short) is never resumed from. With an S3
output, shards are written to fast local disk first and then uploaded; the marker is uploaded only after all
nodes have finished uploading, so the marker's presence in S3 proves the whole checkpoint is there.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from training.config import ConfigError
from training.metrics import Reporter
from training.parallelize import Dist
from training.storage import Storage, is_s3, open_storage

# A single-process run (no process group) is intentional here, not a misconfiguration worth a warning per save.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

MARKER = "COMPLETE"
STATE_FILE = "train_state.json"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class Resumed:
    """What `CheckpointManager.load` read besides the Stateful entries (which it loaded in place)."""

    step: int
    config: dict[str, Any]


class ModelState:
    """The model's weights as a checkpoint entry: full or FSDP2-sharded, with the HF module's own key names (so a
    2-rank checkpoint loads into 1 rank, and export reads the same keys)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState:
    """The optimizer's state as a checkpoint entry, keyed by parameter name (not by position), as
    torch.distributed.checkpoint.state_dict defines it."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class CheckpointManager:
    def __init__(self, output: str, local_dir: Path, d: Dist, keep_last: int) -> None:
        """`output`: the run's output location; `local_dir`: this node's scratch space for S3 staging."""
        self.d = d
        self.keep_last = keep_last
        self.remote: Storage = open_storage(f"{output.rstrip('/')}/{CHECKPOINTS_DIR}")
        # With a local (or shared-filesystem) output, DCP writes straight into it; with S3, into local staging.
        self.staged = is_s3(output)
        self.local_root = local_dir / CHECKPOINTS_DIR if self.staged else Path(self.remote.uri)

    # -- discovery ------------------------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        steps = []
        for name in self.remote.list_dirs():
            m = _STEP_DIR.match(name)
            if m and self.remote.exists(f"{name}/{MARKER}"):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """Latest complete checkpoint, as seen by rank 0 and broadcast so that every rank resumes the same one."""
        step = -1
        if self.d.is_main:
            steps = self.complete_steps()
            step = steps[-1] if steps else -1
        if self.d.distributed:
            import torch.distributed as dist

            box = [step]
            dist.broadcast_object_list(box, src=0)
            step = box[0]
        return None if step < 0 else step

    # -- save -----------------------------------------------------------------------------------------------

    def save(self, step: int, states: Mapping[str, Stateful], config: dict[str, Any]) -> float:
        """Collective; returns the seconds it took (local write, upload, marker): what a SIGTERM save costs."""
        started = time.monotonic()
        name = step_dir(step)
        local = self.local_root / name
        # A directory for this step can only be a leftover of an interrupted save: clear it (on every node's
        # scratch, and remotely) so stale shards from a different world size cannot mix with the new ones.
        if self.d.local_rank == 0 and (self.staged or self.d.is_main):
            shutil.rmtree(local, ignore_errors=True)
        if self.d.is_main and self.staged:
            self.remote.delete_dir(name)
        self.d.barrier()
        # DCP calls each entry's state_dict(): every rank writes its shards of each.
        dcp.save(dict(states), checkpoint_id=str(local))
        if self.d.is_main:
            state = {"step": step, "config": config, "world_size": self.d.world_size}
            (local / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        self.d.barrier()
        if self.staged and self.d.local_rank == 0 and local.exists():
            # Each node uploads the shards its ranks wrote (on one node, that is all of them).
            self.remote.upload_dir(local, name)
        self.d.barrier()
        if self.d.is_main:
            self.remote.write_text(f"{name}/{MARKER}", json.dumps({"step": step}))
            self._rotate(keep_from=step)
        self.d.barrier()
        return round(time.monotonic() - started, 2)

    def _rotate(self, keep_from: int) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older ones and any unmarked leftovers."""
        complete = self.complete_steps()
        keep = set(complete[-self.keep_last :])
        for name in self.remote.list_dirs():
            m = _STEP_DIR.match(name)
            if not m or int(m.group(1)) in keep or int(m.group(1)) > keep_from:
                continue
            # Marker first: a checkpoint half-deleted must look incomplete, never complete-but-broken.
            self.remote.delete_file(f"{name}/{MARKER}")
            self.remote.delete_dir(name)
            if self.staged:
                shutil.rmtree(self.local_root / name, ignore_errors=True)
        if self.staged:
            for p in self.local_root.glob("step_*"):
                m = _STEP_DIR.match(p.name)
                if m and int(m.group(1)) not in keep:
                    shutil.rmtree(p, ignore_errors=True)

    # -- load -----------------------------------------------------------------------------------------------

    def load(self, step: int, states: Mapping[str, Stateful]) -> Resumed:
        """Load checkpoint `step` into `states` (in place: DCP calls each entry's load_state_dict)."""
        name = step_dir(step)
        local = self.local_root / name
        if self.staged and self.d.local_rank == 0 and not (local / MARKER).exists():
            # DCP reads shards written by any rank (resharding on a new world size), so each node needs them all.
            shutil.rmtree(local, ignore_errors=True)
            self.remote.download_dir(name, local)
        self.d.barrier()
        _check_entries(states, local, f"{self.remote.uri}/{name}")
        dcp.load(dict(states), checkpoint_id=str(local))
        state = json.loads((local / STATE_FILE).read_text(encoding="utf-8"))
        return Resumed(step=int(state["step"]), config=state["config"])


def _check_entries(states: Mapping[str, Stateful], path: Path, uri: str) -> None:
    """Every entry of `states` has keys in the checkpoint at `path`, or a ConfigError naming those that do not."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tops = {key.split(".", 1)[0] for key in saved}
    missing = sorted(name for name in states if name not in tops)
    if missing:
        raise ConfigError(
            f"checkpoint {uri} holds no {', '.join(missing)} state (it was written before that state was checkpointed):"
            " resume it with the code that wrote it, or start a new run with a new --output"
        )


class Checkpointer:
    """When the run saves, and what a save is: the checkpoint of `states` (every rank), the metric, the event
    (rank 0).

    Due every `save_every` steps before the last (0: never), at the end unless that step was just saved, and on a
    stop unless nothing was trained since the last save (or the resume). The final save happens after the loop, so
    an interval save never duplicates it.
    """

    def __init__(
        self,
        manager: CheckpointManager,
        states: Mapping[str, Stateful],
        config: dict[str, Any],
        report: Reporter,
        save_every: int,
        max_steps: int,
    ) -> None:
        """`states`: what each checkpoint holds (module docstring); `config`: the run's full config, stored in each
        checkpoint's train_state.json."""
        self.manager = manager
        self.states = dict(states)
        self.config = config
        self.report = report
        self.save_every = save_every
        self.max_steps = max_steps
        self.saved_step = 0
        """The step whose state is in the newest complete checkpoint (or 0: the initial state, never saved)."""

    def resume(self, latest: int | None) -> int:
        """Load checkpoint `latest` (None: start from step 0) into every entry of `states`; the step."""
        if latest is None:
            return 0
        resumed = self.manager.load(latest, self.states)
        self.saved_step = resumed.step
        self.report.event("resumed", resumed.step, checkpoint=f"{self.manager.remote.uri}/{step_dir(resumed.step)}")
        return resumed.step

    def due(self, step: int) -> bool:
        """An interval save after `step` (the final one is `save_final`'s)."""
        return bool(self.save_every) and step % self.save_every == 0 and step < self.max_steps

    def save_if_due(self, step: int) -> float:
        """Save after `step` if due; the seconds spent saving (0.0 when not due)."""
        if not self.due(step):
            return 0.0
        save_s = self._save(step)
        self.report.event("checkpoint", step, save_s=save_s)
        return save_s

    def save_final(self, step: int) -> None:
        """The end of training: save the last step unless it is saved already."""
        if step != self.saved_step:
            save_s = self._save(step)
            self.report.event("checkpoint", step, save_s=save_s)

    def save_on_stop(self, step: int) -> None:
        """Stopped (SIGTERM) before training `step` + 1: save unless it is saved already, and report `preempted`."""
        save_s = self._save(step) if step != self.saved_step else 0.0
        self.report.event("preempted", step, checkpoint_step=step, save_s=save_s)

    def _save(self, step: int) -> float:
        save_s = self.manager.save(step, self.states, self.config)
        self.saved_step = step
        self.report.checkpoint_saved(step)
        return save_s
