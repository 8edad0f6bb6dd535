"""`python -m training.torchrun [torchrun args]`: torchrun, exiting 128 + signal (143 for SIGTERM) when stopped.

In a pod, torchrun is PID 1: the kubelet's SIGTERM (eviction, spot reclaim via the termination handler, `kubectl
delete`) and SageMaker's StopTrainingJob reach it, not the trainer. torchrun's agent then forwards SIGTERM to the
workers, waits up to `--shutdown-timeout` seconds for them (the trainer finishes its step, checkpoints and exits
143), and raises `SignalException` out of `torch.distributed.run.main`: a 28-line traceback and exit status 1,
which reads as a crash. This wrapper runs the same `main` and turns that one exception into a one-line message and
the conventional status, so the pod's and the SageMaker job's status say "preempted" the way training/__main__.py
documents. Everything else (arguments, failures of workers, their error summary) is torchrun's own behaviour.
"""

from __future__ import annotations

import signal
import sys

AGENT_MARGIN_S = 15
"""Seconds of the grace period kept for the agent itself after its workers have exited (closing the rendezvous
store, logging, the process exit) and for the kubelet's own latency in delivering the signal."""

SAGEMAKER_STOP_GRACE_S = 120
"""StopTrainingJob sends SIGTERM, "which delays job termination for 120 seconds" (SageMaker API reference,
StopTrainingJob); managed spot interruptions use the same stop path."""


def shutdown_timeout(grace_s: int) -> int:
    """torchrun's --shutdown-timeout (SIGTERM to workers -> SIGKILL) for a pod/job grace period of `grace_s`:
    the workers get all of it but the agent's margin. torchrun's own default is 30 s whatever the grace."""
    if grace_s <= AGENT_MARGIN_S:
        raise ValueError(f"termination grace {grace_s}s leaves no time to checkpoint (> {AGENT_MARGIN_S}s needed)")
    return grace_s - AGENT_MARGIN_S


def main(argv: list[str] | None = None) -> int:
    # Imported here: ops/training_k8s_job.py imports shutdown_timeout() and needs no torch for it.
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv if argv is not None else sys.argv[1:])
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"torchrun: stopped by {name}; workers were asked to checkpoint and exit", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
