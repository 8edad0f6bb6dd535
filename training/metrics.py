"""What the train loop reports: `Reporter`, the one object it tells about events and logged steps.

Two outputs. JSON lines on stdout from global rank 0 (the records docs/training.md lists), with a tqdm bar on
stderr when a person is watching a terminal. And Prometheus metrics (`TrainingMetrics`), all prefixed
`llm_training_` (names are a contract: the Grafana dashboard in infra/dashboards and docs/training.md use them).

Prometheus is off unless `metrics_port` is set. Global rank 0 owns the values (the same numbers it prints as JSON
lines); every other node's local rank 0 serves an empty registry on the same port, so each pod the scrape
annotations point at answers and none shows up as a down target. Each instance has its own `CollectorRegistry`: no
process-wide state, several can run in one process (tests). Whatever is off does nothing: the loop calls the same
methods on every rank, with or without metrics.
"""

from __future__ import annotations

import json
import sys
import threading
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class TrainingMetrics:
    """The trainer's series. `publish=False` registers none (an endpoint that answers with nothing)."""

    def __init__(self, registry: CollectorRegistry | None = None, publish: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        self.publish = publish
        self._server: Any = None
        self._thread: threading.Thread | None = None
        if not publish:
            return
        r = self.registry
        self.step = Gauge("llm_training_step", "Optimizer steps completed (the run's global step).", registry=r)
        self.loss = Gauge("llm_training_loss", "Training loss at the last logged step (mean over ranks).", registry=r)
        self.learning_rate = Gauge("llm_training_learning_rate", "Learning rate of the last logged step.", registry=r)
        self.tokens_per_second = Gauge(
            "llm_training_tokens_per_second", "Training throughput of the last logged step, all ranks.", registry=r
        )
        self.mfu = Gauge(
            "llm_training_mfu",
            "Model FLOPs utilisation (0-1) of the last logged step; absent on devices with no known peak.",
            registry=r,
        )
        self.tokens = Counter("llm_training_tokens", "Tokens trained by this process, all ranks.", registry=r)
        self.checkpoints = Counter("llm_training_checkpoints", "Checkpoints completely saved.", registry=r)
        # A Gauge with no labels is exported (as 0) from creation: hide MFU until a value is known.
        self.registry.unregister(self.mfu)
        self._mfu_registered = False

    # -- serving -----------------------------------------------------------------------------------------------
    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve `/metrics` on `addr:port` (0 picks a free port) from a daemon thread; returns the bound port."""
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- updates from the train loop ---------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """At start or resume: the step the run is at before training another."""
        if self.publish:
            self.step.set(step)

    def record_step(self, record: dict[str, Any], tokens: int) -> None:
        """A logged step: the JSON-lines record (`step`, `loss`, `lr`, `tokens_per_s`, optional `mfu`) and the
        tokens trained since the previous logged step."""
        if not self.publish:
            return
        self.step.set(record["step"])
        self.loss.set(record["loss"])
        self.learning_rate.set(record["lr"])
        self.tokens_per_second.set(record["tokens_per_s"])
        self.tokens.inc(tokens)
        if record.get("mfu") is not None:
            if not self._mfu_registered:
                self.registry.register(self.mfu)
                self._mfu_registered = True
            self.mfu.set(record["mfu"])

    def checkpoint_saved(self, step: int) -> None:
        if self.publish:
            self.checkpoints.inc()
            self.step.set(step)


def start_training_metrics(port: int, rank: int, local_rank: int) -> TrainingMetrics | None:
    """The trainer's metrics for this process: None when `port` is 0 or the process serves none (local rank != 0).
    A port that cannot be bound is a warning, not a failed run: losing metrics must not stop training."""
    if port <= 0 or local_rank != 0:
        return None
    metrics = TrainingMetrics(publish=rank == 0)
    try:
        metrics.serve(port)
    except OSError as e:
        print(f"warning: training metrics not served on port {port}: {e}", file=sys.stderr)
        return None
    return metrics


class _Unserved:
    """The Prometheus side when this process serves none (`metrics_port` 0, a local rank other than 0, a port that
    could not be bound): `TrainingMetrics`' updates, doing nothing."""

    def set_step(self, step: int) -> None:
        pass

    def record_step(self, record: dict[str, Any], tokens: int) -> None:
        pass

    def checkpoint_saved(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Reporter:
    """JSON lines (and the bar) on global rank 0, and the Prometheus series when they are served. Every rank calls
    every method; the ones with nothing to report do nothing. A context manager: leaving it closes the bar and stops
    the endpoint."""

    def __init__(self, is_main: bool, series: TrainingMetrics | None, total_steps: int) -> None:
        """`series`: the Prometheus metrics this process serves (`start_training_metrics`), or None."""
        self.is_main = is_main
        self.series: TrainingMetrics | _Unserved = series if series is not None else _Unserved()
        self.bar: Any = None
        if is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=0, desc="train", unit="step", dynamic_ncols=True)

    @classmethod
    def start(cls, metrics_port: int, rank: int, local_rank: int, total_steps: int) -> Reporter:
        """The run's reporter: JSON lines on rank 0, Prometheus on `metrics_port` (0: off)."""
        series = start_training_metrics(metrics_port, rank, local_rank) if metrics_port else None
        return cls(rank == 0, series, total_steps)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def event(self, name: str, step: int, **fields: Any) -> None:
        """One event record: `{"event": name, "step": step, **fields}`."""
        self._emit({"event": name, "step": step, **fields})

    def at_step(self, step: int) -> None:
        """At start or resume: the step the run is at before training another."""
        if self.bar is not None:
            self.bar.update(step)
        self.series.set_step(step)

    def step_logged(self, record: dict[str, Any], tokens: int) -> None:
        """A logged step's record (`step`, `loss`, `lr`, `grad_norm`, `tokens_per_s`, `step_time_s`, optional
        `mfu`) and the tokens trained, all ranks, since the previous logged step."""
        self._emit(record)
        self.series.record_step(record, tokens=tokens)

    def checkpoint_saved(self, step: int) -> None:
        """A checkpoint is completely saved (its event, which differs on a stop, is the caller's)."""
        self.series.checkpoint_saved(step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.series.close()

    def _emit(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        line = json.dumps(record)
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
            if "loss" in record:
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                self.bar.update(record["step"] - self.bar.n)
        else:
            print(line, flush=True)
