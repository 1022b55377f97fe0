"""Two real processes x 2 CPU devices (gloo) equal one process x 4 devices; missing peers fail.

The CLI starts `jax.distributed` from --coordinator_address/--num_processes/--process_id.
`data.num_shards=2` in both runs makes the training stream the same function of (seed, step)
whether one process reads both shards or each process reads its own.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from disco_jax import train
from tests import signal_run
from tests.helpers import ROOT, read_metrics
from tests.robust_util import (
    TOTAL_STEPS,
    make_teacher,
    saved_state,
    tiny_config,
    write_config_file,
)

pytestmark = pytest.mark.slow  # end to end: whole runs, subprocesses


def free_port_pair() -> int:
    """A port p with p and p+1 free (jax's coordinator and our rendezvous)."""
    for _ in range(100):
        port = random.randint(20000, 60000)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def start(config_file: str, workdir: str, port: int, pid: int, *flags: str,
          devices: int = 2, signal_at: tuple[int, int] | None = None) -> subprocess.Popen:
    """The CLI as process `pid` of 2; `signal_at=(STEP, SIGNUM)`: the process sends itself
    SIGNUM right after step STEP's update (tests/signal_run.py)."""
    # This process's XLA flags (conftest: optimisation level 0) with another device count: the
    # per-device programs then compute as the in-process reference's do, and the runs differ
    # only in how the cross-process all-reduce sums.
    xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
    xla_flags.append(f"--xla_force_host_platform_device_count={devices}")
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": " ".join(xla_flags)}
    program = ([sys.executable, "-m", "disco_jax.main"] if signal_at is None
               else signal_run.command(*signal_at))
    return subprocess.Popen(
        [*program, f"--config={config_file}",
         f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={pid}", *flags],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir):
    return make_teacher(str(tmp_path_factory.mktemp("teacher") / "enc"), data_dir)


def test_two_processes_equal_one_process(tmp_path, data_dir, teacher):
    """Also across a preemption of one process, so the resumed 2-process run is compared."""
    overrides = {"data.num_shards": 2, "mesh.num_devices": -1}
    cfg_file = write_config_file(str(tmp_path / "cfg.py"), data_dir, teacher, **overrides)
    multi = str(tmp_path / "multi")
    # A preemption notice that reaches only process 1 (after its step 3): the processes agree
    # at the next log step (4), both save and exit 0, and a restart of both finishes the run.
    preempt = (3, int(signal.SIGTERM))
    port = free_port_pair()
    procs = [start(cfg_file, multi, port, i, "--distributed_timeout=120",
                   signal_at=preempt if i == 1 else None) for i in (0, 1)]
    # Meanwhile, the reference in this process: 1 process x 4 devices, same global batch.
    single = str(tmp_path / "single")
    train.run(tiny_config(data_dir, teacher, **{"data.num_shards": 2}), single)
    # And the same run on 1 device: the same math (global BN, batch-mean gradients), its float32
    # sums in another order. Its distance from the 4-device run is this CPU's reduction-order
    # noise, measured here rather than copied from one machine.
    one = str(tmp_path / "one")
    train.run(tiny_config(data_dir, teacher, **{"data.num_shards": 2, "mesh.num_devices": 1}),
              one)
    outs = [p.communicate(timeout=540) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "preempted: saved step 4" in err, err[-3000:]
    assert "process 1 of 2" in outs[1][1]
    port = free_port_pair()
    procs = [start(cfg_file, multi, port, i, "--distributed_timeout=120") for i in (0, 1)]
    outs = [p.communicate(timeout=540) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # Process 0 alone writes metrics and results; both wrote the checkpoint (orbax).
    # Not bitwise: the cross-process all-reduce (gloo) sums in another order than the
    # in-process one. The 2-process run must lie within 4x the 1-device vs 4-device noise: both
    # are reorderings of the same float32 sums, and the 1-device run reorders more of them (its
    # kernels see 8 images, not 2), so its distance is the larger scale; 4 covers the spread of
    # two such distances. The floor is one float32 rounding per entry, should the noise be 0.
    # A sharding or data bug (a process reading the wrong shard, per-process BN statistics,
    # gradients not averaged across processes) moves these by percents.
    eps = float(np.finfo(np.float32).eps)
    la, lb, lc = ([(r["step"], r["loss"]) for r in read_metrics(w)] for w in (single, multi, one))
    assert [s for s, _ in la] == [s for s, _ in lb] == [s for s, _ in lc] == [2, 4, 6]
    la, lb, lc = (np.array([v for _, v in x]) for x in (la, lb, lc))
    # The losses are scalars: the largest of their 3 noise samples sets their scale.
    loss_noise = np.abs(la - lc).max() + eps * np.abs(la).max()
    assert np.abs(la - lb).max() <= 4 * loss_noise, (la, lb, lc)
    step_a, a = saved_state(single)
    step_b, b = saved_state(multi)
    step_c, c = saved_state(one)
    assert step_a == step_b == step_c == TOTAL_STEPS
    for key in ("params", "batch_stats", "queue", "opt_state"):
        flat_a, flat_b, flat_c = (np.concatenate([np.ravel(x) for x in _leaves(st[key])]).astype(
            np.float64) for st in (a, b, c))
        ref = np.linalg.norm(flat_a)
        diff = np.linalg.norm(flat_a - flat_b)
        noise = np.linalg.norm(flat_a - flat_c) + eps * ref
        assert diff <= 4 * noise, (f"{key}: relative L2 difference {diff / ref:.2e}, 1- vs"
                                   f" 4-device noise {noise / ref:.2e}")


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


@pytest.mark.parametrize("present", [0, 1])
def test_a_process_that_never_arrives_is_named(tmp_path, data_dir, present):
    cfg_file = write_config_file(str(tmp_path / "cfg.py"), data_dir, str(tmp_path / "none"))
    t0 = time.time()
    proc = start(cfg_file, str(tmp_path / "w"), free_port_pair(), present,
                 "--distributed_timeout=4")
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 4, err[-3000:]  # a failed run (RunError), not bad input (2)
    if present == 0:
        assert last.startswith("error: process(es) 1 of 2 never arrived at the coordinator")
    else:
        assert last.startswith("error: process 1: the coordinator (process 0) at 127.0.0.1:")
    assert "--distributed_timeout" in last
    assert time.time() - t0 < 60  # bounded: the timeout plus start-up, never a hang
    assert not (tmp_path / "w").exists()



@pytest.mark.parametrize("victim", [1, 0])
def test_a_process_that_dies_mid_run_is_named(tmp_path, data_dir, teacher, victim):
    """SIGKILL one process after its step 3: the other names it and exits 4, within seconds.

    Killing process 0 also takes jax's coordination service down with it; the survivor must
    still name process 0 rather than hang or die with jax's generic fatal message.
    """
    overrides = {"data.num_shards": 2, "mesh.num_devices": -1, "total_steps": 400,
                 "checkpoint_every_steps": 1000, "log_every_steps": 1000}
    cfg_file = write_config_file(str(tmp_path / "cfg.py"), data_dir, teacher, **overrides)
    port = free_port_pair()
    kill = (3, int(signal.SIGKILL))
    procs = [start(cfg_file, str(tmp_path / "w"), port, i, "--distributed_timeout=300",
                   signal_at=kill if i == victim else None) for i in (0, 1)]
    dead, survivor = procs[victim], procs[1 - victim]
    dead.communicate(timeout=540)
    assert dead.returncode == -9
    t_death = time.time()
    _, err = survivor.communicate(timeout=240)
    waited = time.time() - t_death
    assert survivor.returncode == 4, err[-3000:]
    assert f"error: process {victim} of 2 exited or was killed" in err, err[-3000:]
    assert "start all 2 processes again with the same command to resume" in err
    # Bounded well below the 300 s heartbeat timeout: the closed connection is seen at once.
    assert waited < 60, waited


def test_the_peer_loss_probe_records_a_killed_worker(tmp_path):
    """launch/probe_peer_loss.py (the figures of launch/README.md): with the watchdog, a
    SIGKILLed worker is named by the survivor, which exits 4 well within the timeout."""
    out = tmp_path / "probe"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "probe_peer_loss.py"), "--out", str(out),
         "--cases", "kill_1", "--watchdog", "on", "--heartbeat_s", "60"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = json.load(open(out / "probe.json"))["records"]
    assert record["exit_status"] == 4 and record["noticed_s"] < 30, record
    assert record["survivor_message"].startswith("error: process 1 of 2 exited or was killed")
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "probe_peer_loss.py"),
                          "--cases", "kill_2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: --cases: unknown")
