"""The training loop's progress and metric writers, on clu (moved out of train.py).

clu's metric writers import TensorFlow (its TensorBoard summary writer), so this module is
imported by `train.run` only, never by `import disco_jax.train`: the train step stays usable
without TensorFlow. TF is imported first through `data._tf.import_tf`, so its GPUs are hidden
before clu's writer initialises TF's devices.
"""

from __future__ import annotations

import json
import os

import jax

from disco_jax.data._tf import import_tf

import_tf()

from clu import metric_writers, periodic_actions  # noqa: E402  (after import_tf, on purpose)


class Progress(periodic_actions.ReportProgress):
    """clu's ReportProgress as the one source of steps/s and ETA: it triggers at the log
    steps, and the loop's log line and metrics.jsonl read the figures it computed."""

    def __init__(self, *, num_train_steps: int, every_steps: int):
        super().__init__(num_train_steps=num_train_steps, every_steps=every_steps,
                         every_secs=None)
        self.steps_per_sec: float | None = None
        self.eta_seconds: float | None = None
        self._paused_before = 0.0

    def _apply(self, step: int, t: float) -> None:
        # Time inside `timed(...)` blocks (periodic evaluations) is not training time: leave it
        # out of the rate, so an evaluation does not make the next ETA jump.
        paused = sum(self._time_per_part.values())
        train_s = (t - self._previous_time) - (paused - self._paused_before)
        self._paused_before = paused
        self.steps_per_sec = (step - self._previous_step) / max(train_s, 1e-9)
        self.eta_seconds = (self._num_train_steps - step) / max(self.steps_per_sec, 1e-9)
        # clu's own writer call is skipped: the loop writes steps_per_sec once, with the rest.


class MetricsLog:
    """clu writers (TensorBoard) plus one JSON object per logged step in metrics.jsonl."""

    def __init__(self, workdir: str):
        self.is_main = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.is_main)
        self.path = os.path.join(workdir, "metrics.jsonl")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.writer.write_scalars(step, scalars)
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
