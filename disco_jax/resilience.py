"""What keeps a long run safe: preemption, non-finite steps, resume checks, run records.

Small pure helpers that `train.run` calls; none of them touches the training maths.

- SIGTERM (a preemption notice) only sets a flag; the loop saves at the current step and exits.
- Non-finite steps: the jitted step returns an `ok` flag per step; the host fetches the flags it
  has not seen at log steps and before every checkpoint save (one sync, not one per step), so a
  bad state is never saved and the error names the exact step and its loss terms.
- A workdir's checkpoint remembers the config that made it; resuming with a different one is
  refused unless `force_resume`.
- Orbax writes a checkpoint into a temporary directory and renames it when complete, so an
  interrupted write never becomes the latest; we report which step was lost (orbax's public
  `utils.checkpoint_steps` / `utils.is_tmp_checkpoint`) and orbax removes the leftovers
  (`cleanup_tmp_directories`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from disco_jax.errors import ConfigError

log = logging.getLogger("disco_jax")

# Fields that do not change the trajectory of a run: a resume may change them freely.
RESUME_FREE_KEYS = (
    "stop_at_step", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "evals", "eval", "force_resume", "data.data_dir", "teacher.init", "mesh",
    "nonfinite", "variant", "force_random_teacher",
)


# --------------------------------------------------------------------------- preemption


class Preemption:
    """SIGTERM sets `requested`; the loop checkpoints and leaves at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None
        if _in_main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        del frame
        log.warning("received signal %d (preemption): saving a checkpoint at this step", signum)
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            # All processes must agree on the step, or their collectives would mismatch.
            from jax.experimental import multihost_utils

            local = np.asarray([self.requested], np.int32)
            return bool(multihost_utils.process_allgather(local).max())
        return self.requested

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------- non-finite steps


class NonFiniteGuard:
    """Collects each step's (still on device) metrics; checks them in one fetch when asked."""

    def __init__(self, mode: str) -> None:
        if mode not in ("stop", "skip"):
            raise ConfigError(f"nonfinite must be 'stop' or 'skip', got {mode!r}")
        self.mode = mode
        self.pending: list[tuple[int, dict]] = []
        self.skipped: list[int] = []

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def check(self) -> None:
        """Raise FloatingPointError at the first non-finite step ('stop'), or log skips."""
        if not self.pending:
            return
        flags = jax.device_get([m["finite"] for _, m in self.pending])
        pending, self.pending = self.pending, []
        for (step, metrics), ok in zip(pending, flags, strict=True):
            if bool(ok):
                continue
            if self.mode == "skip":
                self.skipped.append(step)
                log.warning("step %d: non-finite loss or gradients, update skipped (%d so far)",
                            step, len(self.skipped))
                continue
            terms = {k: float(v) for k, v in jax.device_get(metrics).items()
                     if k not in ("finite", "lr", "param_norm")}
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(terms.items()))
            raise FloatingPointError(
                f"non-finite loss or gradients at step {step} ({shown}); stopped, the last good"
                " checkpoint is kept (set nonfinite='skip' to skip such steps instead)"
            )


# --------------------------------------------------------------------------- config identity


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def trajectory_config(config: Any) -> dict[str, Any]:
    """The flattened config fields that determine the trajectory of a run (JSON values)."""
    flat = _flatten(json.loads(config.to_json_best_effort()))
    return {
        k: v for k, v in flat.items()
        if not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS)
    }


def config_hash(trajectory: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(trajectory, sort_keys=True).encode()).hexdigest()


def check_same_config(saved: dict | None, current: dict, workdir: str, force: bool) -> None:
    """Refuse to resume a checkpoint made by another config (one line naming the fields)."""
    if not saved or saved == current:
        return
    keys = sorted(set(saved) | set(current))
    diff = [k for k in keys if saved.get(k) != current.get(k)]
    shown = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:4])
    more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
    if force:
        log.warning("force_resume: resuming despite a config change: %s%s", shown, more)
        return
    raise ConfigError(
        f"workdir {workdir} holds a checkpoint of a different config ({shown}{more}); use a new"
        " workdir, or --config.force_resume=True to resume anyway"
    )


# --------------------------------------------------------------------------- checkpoint scan


def scan_checkpoints(workdir: str) -> tuple[list[int], list[int]]:
    """(complete steps, steps whose write was interrupted) under `workdir/checkpoints`, as
    orbax itself tells them apart (its finalised step directories and its temporary paths)."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return [], []
    complete = ocp.utils.checkpoint_steps(root)
    partial = [ocp.utils.step_from_checkpoint_name(name) for name in os.listdir(root)
               if ocp.utils.is_tmp_checkpoint(os.path.join(root, name))]
    return sorted(complete), sorted(set(partial))


def saved_meta(workdir: str, step: int) -> dict:
    """The JSON meta item of a complete checkpoint ({} if unreadable), read through a
    read-only orbax manager: nothing is created or cleaned up."""
    from disco_jax import checkpoint

    mngr = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        return checkpoint.restore_meta(mngr, step)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a checkpoint without our meta
        log.warning("could not read the meta item of checkpoint %d in %s: %s", step, workdir, e)
        return {}
    finally:
        mngr.close()


def report_lost(workdir: str, complete: list[int], partial: list[int]) -> list[int]:
    """Log the checkpoints whose write never finished (newer than the latest complete one).
    Their temporary directories are removed by the checkpoint manager
    (`cleanup_tmp_directories`, `checkpoint.manager`)."""
    latest = complete[-1] if complete else 0
    lost = [s for s in partial if s > latest]
    if lost:
        log.warning("checkpoint write of step %s in %s was interrupted; resuming from the last"
                    " complete checkpoint (step %d), steps %d..%d are lost and recomputed",
                    ", ".join(map(str, lost)), workdir, latest, latest + 1, lost[-1])
    return lost


def is_disk_full(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# --------------------------------------------------------------------------- run record


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_record(config: Any, *, source: Any, mesh: jax.sharding.Mesh, teacher: dict | None,
               start_step: int, total_steps: int) -> dict:
    """What makes this start of the run reproducible."""
    import flax
    import jaxlib
    import optax
    import orbax.checkpoint as ocp

    devices = mesh.devices.ravel()
    return {
        "start_step": start_step,
        "total_steps": total_steps,
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "flax": flax.__version__, "optax": optax.__version__,
                     "orbax": ocp.__version__, "python": platform.python_version()},
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": int(devices.size),
        "process_count": jax.process_count(),
        "global_batch": int(config.batch_size),
        "per_device_batch": int(config.batch_size) // int(devices.size),
        "dataset": {"name": source.name, "version": getattr(source, "version", None),
                    "train_split": config.data.train_split,
                    "train_examples": source.num_examples(config.data.train_split)},
        "teacher": teacher,
        "git_commit": _git_commit(),
        "host": platform.node(),
    }


def write_run_record(workdir: str, record: dict) -> None:
    """Append this start to `workdir/run_info.json` (a list: one entry per start/resume)."""
    path = os.path.join(workdir, "run_info.json")
    starts: list = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                starts = json.load(f)
        except (OSError, json.JSONDecodeError):
            starts = []
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(starts + [record], f, indent=2, default=str)
    os.replace(tmp, path)

