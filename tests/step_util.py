"""Train steps without a run: a recipe's `train.make_train_step`, built as `train.run` builds it
(mesh, schedule, optimizer, student, untrained teacher, state created with its shardings, the
step jitted with the run's shardings and donation), fed synthetic uint8 batches. No tf.data,
orbax or evaluation: the step-level tests of every method (tests/test_steps.py) use it.

The batches have the keys and shapes the method's stream yields (`image` or `view1`/`view2`,
SEED's small `crops`, `label`, MCL's row `index`), drawn with numpy from a seed, so a test can
feed the same batch to a 1-device and an 8-device build, or reorder its rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from disco_jax import jit_util, methods, optim, sharding, train
from disco_jax.bench import cases

N_DATA = 64  # rows of the synthetic dataset a memory bank indexes
STEPS_PER_EPOCH = N_DATA // 16


@dataclasses.dataclass
class Stepper:
    """One built step: `run(batches)` applies it once per batch from the initial state."""

    config: Any
    method: Any
    mesh: jax.sharding.Mesh
    ctx: dict
    init: Any  # () -> a new sharded state
    step_fn: Any
    teacher_vars: Any
    batch_sh: dict
    first: Any  # the initial state, on the host

    def batch(self, seed: int) -> dict[str, np.ndarray]:
        return synthetic_batch(self.config, self.method, seed)

    def run(self, batches: list[dict]) -> tuple[list[dict], list[dict]]:
        """(the metrics of each step as floats, the state after each step, on the host)."""
        state, rows, states = self.init(), [], []
        for b in batches:
            b = {k: jax.device_put(v, self.batch_sh[k]) for k, v in b.items()}
            state, metrics = self.step_fn(state, b, self.teacher_vars)
            rows.append({k: float(v) for k, v in jax.device_get(metrics).items()})
            # Copied (np.array, not a view of the CPU buffer) before the next step donates it.
            states.append(jax.tree_util.tree_map(lambda x: np.array(sharding.to_host(x)), state))
        return rows, states


def synthetic_batch(config: Any, method: Any, seed: int) -> dict[str, np.ndarray]:
    """A global batch as the method's training stream yields it (uint8 crops)."""
    rng = np.random.default_rng(seed)
    n, size = config.batch_size, config.data.image_size
    keys = ("image",) if method.views(config) == 1 else ("view1", "view2")
    batch = {k: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for k in keys}
    options = method.data_options(config)
    if options.get("small_crops"):
        small = options["small_size"]
        batch["crops"] = rng.integers(0, 256, (n, options["small_crops"], small, small, 3),
                                      dtype=np.uint8)
    labels = cases.bank_labels(config, N_DATA)
    if options.get("per_class"):  # MCL's class sampler: `per_class` rows of each class in turn
        classes = rng.permutation(int(labels.max()) + 1)
        batch["label"] = np.repeat(classes, options["per_class"])[:n].astype(np.int32)
    else:
        index = rng.choice(N_DATA, n, replace=False).astype(np.int32)
        batch["label"] = labels[index]
        if options.get("with_index"):
            batch["index"] = index
    return batch


def build(config: Any, devices: int, first: Any = None) -> Stepper:
    """`config` (a resolved recipe, with `teacher.init="random"` where it has a teacher) built on
    `devices` devices, as `train.run`'s setup builds it. `first`: the initial state on the host
    (another build's `first`), instead of compiling the init here; runs on several device counts
    then start from the very same state."""
    config = methods.resolve_loss(config)
    config.mesh.num_devices = devices
    method = methods.get(config.method)
    mesh = sharding.make_mesh(devices)
    sharding.check_batch(config.batch_size, mesh)
    dtype = train.compute_dtype(config.dtype)
    total_steps = train.num_train_steps(config, STEPS_PER_EPOCH)
    schedule = train.make_schedule(config, STEPS_PER_EPOCH, total_steps)
    tx = optim.make_optimizer(config.optimizer, schedule)
    repl = sharding.replicated(mesh)
    teacher = teacher_vars = None
    if method.NEEDS_TEACHER:
        host_teacher, manifest = train.random_teacher(config, method, dtype)
        teacher = method.build_teacher(manifest, dtype)
        teacher_vars = jax.device_put(host_teacher, repl)
    ctx = train.make_ctx(config, method, mesh, dtype, teacher, total_steps, STEPS_PER_EPOCH)
    host = jax.device_put(cases.synthetic_host(config, method, ctx, N_DATA), repl)
    init_state = train.make_init_state(method, tx, ctx, dtype)
    rng = jax.random.PRNGKey(config.seed)
    state_sh = sharding.tree_shardings(jax.eval_shape(init_state, rng, host), mesh)
    batch_sh = {k: sharding.batch_sharding(mesh) for k in synthetic_batch(config, method, 0)}
    step_fn = jax.jit(train.make_train_step(method, tx, schedule, ctx),
                      in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                      donate_argnums=(0,))
    if first is None:  # on the host: each run starts from a copy (donation)
        first = jax.tree_util.tree_map(
            sharding.to_host, jit_util.run_once(init_state, rng, host, out_shardings=state_sh))
    return Stepper(config=config, method=method, mesh=mesh, ctx=ctx, first=first,
                   init=lambda: jax.device_put(first, state_sh),
                   step_fn=step_fn, teacher_vars=teacher_vars, batch_sh=batch_sh)
