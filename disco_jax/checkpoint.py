"""Orbax checkpoints of the train state, and exported encoders (teachers, students).

- The train state (a plain dict: params, batch_stats, opt_state, queue, step, rng, ...) is saved
  by an orbax `CheckpointManager` under `W/checkpoints`, every N steps and at the end, keeping
  the last k. Restoring targets the abstract, sharded state, so every array goes straight onto
  its devices with its declared sharding. A small JSON `meta` item rides along (the teacher's
  path and fingerprint, the config hash), so a teacher is never re-saved in every checkpoint.
- An *encoder* directory (`W/encoder`, or the output of a converter) holds one network's
  `{"params", "batch_stats"}` plus `manifest.json` saying which architecture it is. Teachers are
  loaded from such directories; the manifest is checked against the config before any compile.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from disco_jax.errors import ConfigError, RunError

MANIFEST = "manifest.json"
# `teacher.init` value for an untrained teacher built by the trainer (smoke tests, benchmarks);
# an encoder directory of that name is reached as "./random".
RANDOM_INIT = "random"


def manager(workdir: str, *, keep: int, every_steps: int) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: the leftovers of an interrupted write are removed when a run
    # opens its workdir again (resilience.report_lost names the lost step first).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, every_steps), create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
    )


class CheckpointWriteError(RunError):
    """The disk filled up (or its quota ran out) while a checkpoint was being written."""


def _disk_full(mngr: ocp.CheckpointManager, step: int | None, e: BaseException) -> None:
    from disco_jax import resilience

    if not resilience.is_disk_full(e):
        raise e
    where = f"step {step}" if step is not None else "the last step"
    kept = [s for s in mngr.all_steps() if step is None or s < step]
    raise CheckpointWriteError(
        f"no space left on device while writing the checkpoint of {where} in {mngr.directory};"
        f" free space (or lower keep_checkpoints) and run again: it resumes from step"
        f" {max(kept) if kept else 0}, the last complete checkpoint"
    ) from None


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, force=False) -> bool:
    """Save asynchronously (orbax writes a tmp dir and renames it when complete)."""
    try:
        return mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )
    except Exception as e:  # an earlier async write may surface its error here too
        _disk_full(mngr, step, e)
        raise


def wait(mngr: ocp.CheckpointManager) -> None:
    """Wait for pending writes; a full disk becomes a one-line error."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        _disk_full(mngr, None, e)
        raise


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
    )
    return out["state"], dict(out["meta"])


def restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The JSON `meta` item of a checkpoint alone (check it before restoring the state)."""
    out = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])


def fingerprint(tree: Any) -> str:
    """sha256 over every leaf's path, shape, dtype and bytes: identifies a frozen network."""
    h = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: jax.tree_util.keystr(kv[0])
    ):
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str((arr.shape, arr.dtype.str)).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def save_encoder(path: str, variables: dict, manifest: dict) -> None:
    """Write `{"params", "batch_stats"}` and a manifest (architecture, head, source, ...).

    In a multi-process run every process must call it (orbax's save is collective)."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    variables = jax.tree_util.tree_map(np.asarray, variables)
    ckptr = ocp.StandardCheckpointer()
    target = os.path.join(path, "variables")
    ckptr.save(target, variables, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() != 0:  # all processes join orbax's save; one writes the manifest
        return
    manifest = {**manifest, "fingerprint": fingerprint(variables)}
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(path, MANIFEST))  # the manifest last: it marks completeness


def read_manifest(path: str, role: str = "teacher") -> dict:
    """The manifest of an encoder directory; ConfigError if it is not one."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "encoder")) and not os.path.exists(
        os.path.join(path, MANIFEST)
    ):
        path = os.path.join(path, "encoder")  # a disco_jax workdir: use its exported encoder
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise ConfigError(
            f"{role} checkpoint {path!r} not found (expected an encoder directory with"
            f" {MANIFEST}: a finished disco_jax workdir, its 'encoder' folder, or the output of"
            " `python -m disco_jax.convert`)"
        )
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{role} manifest {mpath!r} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or not manifest.get("model"):
        raise ConfigError(f"{role} manifest {mpath!r} names no model; rewrite it with"
                          " `python -m disco_jax.convert` or point at another directory")
    manifest["path"] = path
    return manifest


def teacher_manifest(net: Any, role: str = "teacher") -> dict:
    """The manifest of the network `net.init` names: its encoder directory's, or for
    `init="random"` the one `net`'s own config gives (architecture, head, classes; no weights
    or fingerprint yet: the trainer initialises them)."""
    if net.get("init") == RANDOM_INIT:
        from disco_jax.methods import encoder_manifest  # here: the methods import this module

        return encoder_manifest(net, path=RANDOM_INIT, source="random")
    return read_manifest(net.init, role)


def load_encoder(path: str, role: str = "teacher") -> tuple[dict, dict]:
    """(variables, manifest) of an encoder directory, as host numpy arrays."""
    manifest = read_manifest(path, role)
    try:
        variables = ocp.StandardCheckpointer().restore(
            os.path.join(manifest["path"], "variables")
        )
    except Exception as e:  # orbax raises many types for truncated/corrupt data
        raise ConfigError(f"cannot read {role} weights in {manifest['path']!r}:"
                          f" {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    variables = jax.tree_util.tree_map(np.asarray, dict(variables))
    return variables, manifest
