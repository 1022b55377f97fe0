"""Tiny SEED runs for the robustness tests: one compiled step shape shared by all of them.

The teacher is written with numpy-filled weights (no training, no compile). Subprocess runs get
the same config through a generated config file, so the persistent compile cache is shared.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from disco_jax import checkpoint, config_lib, methods, models, sharding
from tests.helpers import ROOT, load_config, override, random_variables

TOTAL_STEPS = 6


# One basic block per stage: the runs here test resilience, not the network, and the CIFAR
# ResNet-8 (`helpers.TINY_NET`'s network) compiles in a fraction of the time of a ResNet-18.
MODEL = "resnet8"


def tiny_config(data_dir: str, teacher_dir: str, **overrides):
    """seed_mbv3:smoke shrunk further: `MODEL` x0.125 both sides, batch 8."""
    c = load_config("seed_mbv3.py:smoke", data_dir)
    for net in ("student", "teacher"):
        init = c[net].get("init")
        c[net] = config_lib.encoder_config(MODEL, head_hidden=16, width=0.125)
        c[net].embed_dim = 16
        if init is not None:
            c[net].init = init
    c.teacher.init = teacher_dir
    c.batch_size = 8
    c.queue_size = 32
    c.total_steps = TOTAL_STEPS
    c.checkpoint_every_steps = 2
    c.log_every_steps = 2
    c.keep_checkpoints = 10
    c.mesh.num_devices = 4
    c.eval.enabled = False
    return override(c, **overrides)


def make_teacher(path: str, data_dir: str, nan: bool = False) -> str:
    """An encoder directory for tiny_config's teacher; `nan=True` poisons one weight."""
    net = tiny_config(data_dir, "").teacher
    module = models.build_encoder(net, jnp.float32)
    shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0),
                            jnp.zeros((1, 16, 16, 3)))
    variables = random_variables({"params": shapes["params"],
                                  "batch_stats": shapes["batch_stats"]})
    variables = jax.tree_util.tree_map(np.array, variables)  # writable copies
    if nan:
        leaf = jax.tree_util.tree_leaves(variables["params"])[0]
        leaf.flat[0] = np.nan
    checkpoint.save_encoder(path, variables, methods.encoder_manifest(net))
    return path


def write_config_file(path: str, data_dir: str, teacher_dir: str, **overrides) -> str:
    """A config file for the CLI that builds exactly tiny_config(...)."""
    with open(path, "w") as f:
        f.write(
            "from tests.robust_util import tiny_config\n\n\n"
            "def get_config(arg=None):\n"
            f"    return tiny_config({data_dir!r}, {teacher_dir!r}, **{json.dumps(overrides)})\n"
        )
    return path


def cli(config_file: str, workdir: str, *flags: str, env: dict | None = None,
        timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "disco_jax.main", f"--config={config_file}",
         f"--workdir={workdir}", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env,
    )


def saved_state(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, host numpy state) of a checkpoint (default: the latest) in `workdir`."""
    mngr = checkpoint.manager(workdir, keep=100, every_steps=1)
    step = mngr.latest_step() if step is None else step
    # An explicit target on this process's mesh: the checkpoint may come from other processes.
    meta = ocp.StandardCheckpointer().metadata(
        os.path.join(workdir, "checkpoints", str(step), "state")).item_metadata
    shapes = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(meta))
    shardings = sharding.tree_shardings(shapes, sharding.make_mesh())
    target = jax.tree_util.tree_map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, shardings)
    state, _ = checkpoint.restore(mngr, step, target)
    mngr.close()
    return step, jax.tree_util.tree_map(np.asarray, dict(state))


def assert_trees_equal(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
