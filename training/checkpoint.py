"""Sharded checkpoints with torch.distributed.checkpoint (DCP), an atomic completion marker, resume and rotation.

Layout under `<output>/checkpoints/step_00000120/`:
    .metadata, __<rank>_0.distcp   DCP shards: model + optimizer, each rank writing its own
    train_state.json               step, data-loader position, the full config
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

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
    step: int
    loader_state: dict[str, int]
    config: dict[str, Any]


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

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loader_state: dict[str, int],
        config: dict[str, Any],
    ) -> float:
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
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(local))
        if self.d.is_main:
            state = {"step": step, "loader": loader_state, "config": config, "world_size": self.d.world_size}
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

    def load(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Resumed:
        name = step_dir(step)
        local = self.local_root / name
        if self.staged and self.d.local_rank == 0 and not (local / MARKER).exists():
            # DCP reads shards written by any rank (resharding on a new world size), so each node needs them all.
            shutil.rmtree(local, ignore_errors=True)
            self.remote.download_dir(name, local)
        self.d.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(local))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        state = json.loads((local / STATE_FILE).read_text(encoding="utf-8"))
        return Resumed(step=int(state["step"]), loader_state=state["loader"], config=state["config"])
