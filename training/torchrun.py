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

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun_main


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun_main(argv if argv is not None else sys.argv[1:])
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"torchrun: stopped by {name}; workers were asked to checkpoint and exit", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
