"""Preemption, hard kills, interrupted writes, topology changes and non-finite steps.

Every run here is tests/robust_util.tiny_config (one compiled step, shared through the
persistent cache with the CLI subprocesses). Kills are sent by an extra action of the trainer
(tests/signal_run.py), right after that step's update: SIGKILL may land while an async
checkpoint write is in flight; SIGTERM is the preemption notice.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from jax.sharding import PartitionSpec as P

from disco_jax import checkpoint, main, sharding, train
from disco_jax.errors import EXIT_RUN_FAILED, ConfigError, RunError
from tests import signal_run
from tests.helpers import read_metrics
from tests.robust_util import (
    TOTAL_STEPS,
    assert_trees_equal,
    make_teacher,
    saved_state,
    tiny_config,
    write_config_file,
)

pytestmark = pytest.mark.slow  # end to end: whole runs, subprocesses


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("teachers")
    return (make_teacher(str(root / "good"), data_dir),
            make_teacher(str(root / "nan"), data_dir, nan=True))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir, teachers):
    """An uninterrupted run: checkpoints at 2, 4, 6 (4 devices)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    train.run(tiny_config(data_dir, teachers[0]), workdir)
    return workdir


def copy_upto(src: str, dst: str, step: int) -> str:
    """A copy of workdir `src` as if it had stopped after checkpointing `step`."""
    shutil.copytree(src, dst)
    for name in os.listdir(os.path.join(dst, "checkpoints")):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(dst, "checkpoints", name))
    shutil.rmtree(os.path.join(dst, "encoder"), ignore_errors=True)
    os.remove(os.path.join(dst, "results.json"))
    return dst


def tree_digest(path: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def test_sigkill_twice_then_sigterm_resumes_bitwise(tmp_path, data_dir, teachers, straight):
    workdir = str(tmp_path / "w")
    cfg_file = write_config_file(str(tmp_path / "cfg.py"), data_dir, teachers[0])
    for step in (3, 5):  # SIGKILL: the process dies on the spot, no handler runs
        proc = signal_run.cli(cfg_file, workdir, step, int(signal.SIGKILL))
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr  # the second start did continue the first
    # SIGTERM (in this process): checkpoint at the current step, return normally.
    before = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    assert before < 5
    handler = signal.getsignal(signal.SIGTERM)
    res = train.run(tiny_config(data_dir, teachers[0]), workdir,
                    extra_actions=(signal_run.signal_at(5, int(signal.SIGTERM)),))
    assert res["preempted"] and res["step"] == 5
    assert saved_state(workdir)[0] == 5
    assert signal.getsignal(signal.SIGTERM) == handler  # our handler is removed again
    res = train.run(tiny_config(data_dir, teachers[0]), workdir)
    assert res["step"] == TOTAL_STEPS and "preempted" not in res
    # Everything that determines the future was restored: the final states are bitwise equal.
    step_a, a = saved_state(straight)
    step_b, b = saved_state(workdir)
    assert step_a == step_b == TOTAL_STEPS
    assert set(a) >= {"params", "batch_stats", "opt_state", "queue", "rng", "step"}
    assert_trees_equal(a, b)
    la = {r["step"]: r["loss"] for r in read_metrics(straight)}
    lb = {r["step"]: r["loss"] for r in read_metrics(workdir)}  # recomputed steps overwrite
    assert la == lb
    starts = json.load(open(os.path.join(workdir, "run_info.json")))
    assert len(starts) == 4 and starts[-1]["start_step"] == 5
    assert {"versions", "device_kind", "device_count", "process_count", "global_batch",
            "per_device_batch", "dataset", "teacher", "git_commit"} <= set(starts[0])
    assert starts[0]["device_count"] == 4 and starts[0]["per_device_batch"] == 2
    assert len(starts[0]["teacher"]["fingerprint"]) == 64


def test_cli_sigterm_exits_0_with_a_message(tmp_path, data_dir, teachers, straight):
    cfg_file = write_config_file(str(tmp_path / "cfg.py"), data_dir, teachers[0])
    proc = signal_run.cli(cfg_file, str(tmp_path / "w"), 3, int(signal.SIGTERM))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preempted: saved step 3" in proc.stderr
    _, b = saved_state(str(tmp_path / "w"))
    _, a = saved_state(straight, 2)
    assert int(b["step"]) == 3 and int(a["step"]) == 2


def test_interrupted_write_never_becomes_latest(tmp_path, data_dir, teachers, straight, caplog):
    workdir = copy_upto(straight, str(tmp_path / "w"), 2)
    # A write of step 4 that died midway: orbax's tmp dir, half its files gone.
    partial = os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp-1763800000000")
    shutil.copytree(os.path.join(straight, "checkpoints", "4"), partial)
    for root, _, files in os.walk(partial):
        for f in files[::2]:
            os.remove(os.path.join(root, f))
    with caplog.at_level(logging.INFO, logger="disco_jax"):
        train.run(tiny_config(data_dir, teachers[0], stop_at_step=4), workdir)
    text = caplog.text
    assert "step 4" in text and "interrupted" in text and "step 2)" in text
    assert "resumed from" in text and "at step 2" in text
    assert not os.path.exists(partial)
    assert_trees_equal(saved_state(straight, 4)[1], saved_state(workdir, 4)[1])


@pytest.mark.parametrize("devices", [2, 8])
def test_restore_onto_another_device_count(straight, devices):
    """Saved on 4 devices, restored onto 2 or 8: same values, queue sharded on the new mesh."""
    path = os.path.join(straight, "checkpoints", str(TOTAL_STEPS), "state")
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata
    mesh = sharding.make_mesh(devices)
    shapes = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(meta))
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        shapes, sharding.tree_shardings(shapes, mesh))
    mngr = checkpoint.manager(straight, keep=10, every_steps=1)
    state, _ = checkpoint.restore(mngr, TOTAL_STEPS, abstract)
    mngr.close()
    feats = state["queue"]["feats"]
    assert feats.sharding.spec == P("data", None) and len(feats.sharding.device_set) == devices
    assert len(feats.addressable_shards) == devices
    assert_trees_equal(saved_state(straight)[1], jax.tree_util.tree_map(np.asarray, state))


def test_nonfinite_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, data_dir, teachers,
                                                                  straight):
    workdir = copy_upto(straight, str(tmp_path / "w"), 2)
    before = tree_digest(os.path.join(workdir, "checkpoints"))
    handler = signal.getsignal(signal.SIGTERM)
    # The poisoned teacher makes step 3 non-finite; the host notices at step 4 (log + save).
    with pytest.raises(FloatingPointError, match=r"at step 3 \(.*loss=nan") as info:
        train.run(tiny_config(data_dir, teachers[1]), workdir)
    assert "\n" not in str(info.value) and "last good checkpoint is kept" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) == handler  # restored on the error path too
    assert tree_digest(os.path.join(workdir, "checkpoints")) == before


def test_nonfinite_skip_keeps_the_state(tmp_path, data_dir, teachers, straight, caplog):
    workdir = copy_upto(straight, str(tmp_path / "w"), 2)
    cfg = tiny_config(data_dir, teachers[1], nonfinite="skip", stop_at_step=4)
    with caplog.at_level(logging.WARNING, logger="disco_jax"):
        train.run(cfg, workdir)
    assert "step 3: non-finite" in caplog.text and "step 4: non-finite" in caplog.text
    _, good = saved_state(straight, 2)
    step, skipped = saved_state(workdir, 4)
    assert int(skipped["step"]) == 4
    for key in ("params", "batch_stats", "opt_state", "queue", "rng"):
        assert_trees_equal(good[key], skipped[key])


def test_disk_full_while_checkpointing_is_one_line(tmp_path, data_dir, teachers, straight,
                                                   monkeypatch, capsys):
    workdir = copy_upto(straight, str(tmp_path / "w"), 2)
    before = tree_digest(os.path.join(workdir, "checkpoints"))

    def full(self, step, *args, **kwargs):
        if not (kwargs.get("force") or self.should_save(step)):
            return False
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(RunError, match=r"no space left on device .*step 4.*resumes from step 2"
                       ) as info:
        train.run(tiny_config(data_dir, teachers[0]), workdir)
    assert "\n" not in str(info.value)
    assert not isinstance(info.value, ConfigError)  # the environment failed, not the input
    assert tree_digest(os.path.join(workdir, "checkpoints")) == before
    # The program: the same one line, and exit status 4 (a failed run), not 2 (bad input).
    config_file = write_config_file(str(tmp_path / "cfg.py"), data_dir, teachers[0])
    try:
        flags.FLAGS(["disco_jax.main", f"--config={config_file}", f"--workdir={workdir}"])
        with pytest.raises(SystemExit) as exit_info:
            main.main([])
    finally:
        flags.FLAGS.unparse_flags()
    assert exit_info.value.code == EXIT_RUN_FAILED == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no space left on device while writing the checkpoint")
    assert tree_digest(os.path.join(workdir, "checkpoints")) == before


def test_real_checkpoint_of_another_config_is_refused(tmp_path, data_dir, teachers, straight):
    """The same check as tests/test_errors.py, on a checkpoint the trainer wrote itself."""
    workdir = copy_upto(straight, str(tmp_path / "w"), 4)
    before = tree_digest(workdir)
    cfg = tiny_config(data_dir, teachers[0], **{"loss.student_temp": 0.1})
    with pytest.raises(ConfigError, match=r"different config \(loss.student_temp: 0.2 -> 0.1\)"):
        train.run(cfg, workdir)
    assert tree_digest(workdir) == before
