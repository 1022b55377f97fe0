"""The one training loop: any method, any student/teacher, one mesh.

`run` is validate (writes nothing) -> `setup` (teacher, workdir, schedule, models, state created
sharded or restored, data and the jitted step, evaluators) -> `train_loop` (each step followed by
a list of actions: progress, preemption and non-finite checks, the log line, the evaluators of
`config.evals`, the checkpoint, and any `extra_actions`) -> `finish` (export and the final
evaluators). What setup opens is closed on every way out (a `contextlib.ExitStack`). Evaluation
code is never called here: the loop hands an `eval.Model` to `eval.Suite`.
Nothing here branches on the method's name; methods plug in through `disco_jax.methods`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from disco_jax import (
    checkpoint,
    data,
    distributed,
    jit_util,
    methods,
    models,
    optim,
    platform_info,
    resilience,
    sharding,
)
from disco_jax import eval as evaluation
from disco_jax.errors import ConfigError

log = logging.getLogger("disco_jax")


# --------------------------------------------------------------------------- helpers


def compute_dtype(name: str) -> Any:
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
    return jnp.dtype(name)


def epoch_steps(config: Any, source: Any) -> int:
    """The pipeline's own epoch length, so per-epoch lr steps line up with its reshuffles."""
    shards = data_shards(config)
    return max(1, data.steps_per_epoch(source, split=config.data.train_split,
                                       local_batch=config.batch_size // shards,
                                       process_count=shards))


def num_train_steps(config: Any, steps_per_epoch: int) -> int:
    if config.total_steps > 0:
        return int(config.total_steps)
    if config.total_epochs <= 0:
        raise ConfigError("set total_epochs or total_steps to a positive number")
    return int(round(config.total_epochs * steps_per_epoch))


def validate(config: Any, method: Any, mesh: jax.sharding.Mesh) -> tuple[Any, dict | None]:
    """Every check that needs no compile; raises ConfigError with one line. Writes nothing."""
    if method.NEEDS_TEACHER and config.teacher.get("init") == checkpoint.RANDOM_INIT:
        check_random_teacher(config)  # first: a full recipe is refused wherever it runs
    sharding.check_batch(config.batch_size, mesh)
    # The checks of the config alone first: they need no TensorFlow (seconds to import), so a
    # mistyped option fails at once.
    resilience.NonFiniteGuard(config.get("nonfinite", "stop"))  # validates the option
    data_shards(config)
    method.validate(config)
    optim.validate(config.optimizer)
    data.validate(config.data, config.augment)  # crops, normalisation, augmentation options
    compute_dtype(config.dtype)
    for net in ("student",) + (("teacher",) if method.NEEDS_TEACHER else ()):
        # Unknown names and options fail here, before anything is traced.
        models.build_encoder(config[net])
    source = data.get_source(config.data)  # an unknown or unprepared dataset fails here
    for split, needed in ((config.data.train_split, True),
                          (config.data.eval_split, config.eval.enabled)):
        if needed and source.num_examples(split) == 0:
            raise ConfigError(f"split {split!r} of {source.name} is empty; add examples or pick"
                              " another split")
    if source.num_examples(config.data.train_split) < config.batch_size:
        raise ConfigError(
            f"split {config.data.train_split!r} has fewer examples than one global batch"
            f" ({config.batch_size})"
        )
    evaluation.validate(config.evals, eval_env(config, method, mesh, workdir=""))
    teacher_manifest = None
    if method.NEEDS_TEACHER:
        if not config.teacher.init:
            raise ConfigError(f"method {config.method!r} needs teacher.init (an encoder directory,"
                              " or 'random' in a smoke or benchmark variant)")
        teacher_manifest = checkpoint.teacher_manifest(config.teacher)
        if teacher_manifest.get("model") != config.teacher.model:
            raise ConfigError(
                f"teacher checkpoint {teacher_manifest['path']!r} holds a"
                f" {teacher_manifest.get('model')!r} but teacher.model is"
                f" {config.teacher.model!r}"
            )
    return source, teacher_manifest


# Config variants (`config.variant`, set by config_lib.smoke) that may use an untrained teacher.
RANDOM_TEACHER_VARIANTS = ("smoke", "benchmark")


def check_random_teacher(config: Any) -> None:
    """ConfigError unless `teacher.init="random"` is allowed here: a smoke or benchmark
    variant, or forced (a real recipe with an untrained teacher distils nothing)."""
    variant = config.get("variant", "")
    if variant in RANDOM_TEACHER_VARIANTS or config.get("force_random_teacher", False):
        return
    raise ConfigError(
        f"teacher.init=random (an untrained teacher) is for smoke and benchmark variants only,"
        f" and this config's variant is {variant!r}; set --config.force_random_teacher=True to"
        " use one anyway"
    )


def random_teacher(config: Any, method: Any, dtype: Any) -> tuple[dict, dict]:
    """(host variables, manifest) of an untrained teacher of `config.teacher`'s architecture,
    drawn with numpy from `config.seed` (traced for its shapes, nothing compiles): LeCun-normal
    weights (std 1/sqrt(fan-in)), zero biases, unit BN. Every process and every resume draws
    the same teacher on any backend (its fingerprint says so)."""
    log.warning("teacher.init=random: the teacher is untrained; for smoke tests and benchmarks"
                " only")
    manifest = checkpoint.teacher_manifest(config.teacher)
    module = method.build_teacher(manifest, dtype)
    size = config.data.image_size
    shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0),
                            jnp.zeros((1, size, size, 3), dtype))
    rng = np.random.default_rng([int(config.seed) % 2**32, 0x7EAC])  # not the student's stream

    def draw(path: tuple, leaf: Any) -> np.ndarray:
        name = getattr(path[-1], "key", "")
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if len(leaf.shape) >= 2:  # kernels: (..., fan_in, out) and depthwise (kh, kw, 1, C)
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)).astype(
                leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)  # biases, BN means

    host_vars = jax.tree_util.tree_map_with_path(
        draw, {k: shapes[k] for k in ("params", "batch_stats") if k in shapes})
    return host_vars, manifest | {"fingerprint": checkpoint.fingerprint(host_vars)}


def check_variables(module: Any, host_vars: dict, manifest: dict, size: int, dtype: Any,
                    role: str = "teacher") -> None:
    """ConfigError unless `host_vars` has exactly the arrays `module` expects. Traces only."""
    expected = jax.eval_shape(
        functools.partial(module.init, train=False), jax.random.PRNGKey(0),
        jnp.zeros((1, size, size, 3), dtype),
    )
    expected = {k: expected[k] for k in ("params", "batch_stats") if k in expected}
    got = {k: host_vars[k] for k in expected if k in host_vars}
    want_paths = {sharding.path_str(p): a.shape
                  for p, a in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got_paths = {sharding.path_str(p): np.shape(a)
                 for p, a in jax.tree_util.tree_flatten_with_path(got)[0]}
    if want_paths != got_paths:
        bad = sorted(k for k in set(want_paths) | set(got_paths)
                     if want_paths.get(k) != got_paths.get(k))
        raise ConfigError(
            f"{role} weights in {manifest['path']!r} do not fit a {manifest.get('model')!r}"
            f" with {manifest.get('model_kwargs')} ({len(bad)} mismatched arrays, e.g."
            f" {bad[0]}: expected {want_paths.get(bad[0])}, found {got_paths.get(bad[0])});"
            f" check the {role} directory and its manifest"
        )


def load_teacher(config: Any, method: Any, dtype: Any) -> tuple[Any, Any, dict]:
    """(module, host variables, manifest) of the frozen teacher; ConfigError if its weights are
    unreadable or do not fit the architecture its manifest names (`teacher.init="random"`:
    an untrained one, `random_teacher`). Traces, never compiles."""
    if config.teacher.init == checkpoint.RANDOM_INIT:
        host_vars, manifest = random_teacher(config, method, dtype)
    else:
        host_vars, manifest = checkpoint.load_encoder(config.teacher.init)
    teacher = method.build_teacher(manifest, dtype)
    check_variables(teacher, host_vars, manifest, config.data.image_size, dtype)
    return teacher, host_vars, manifest


def eval_env(config: Any, method: Any, mesh: jax.sharding.Mesh, workdir: str) -> Any:
    """The facts evaluators are built from (they never recompute them)."""
    return evaluation.Env(
        mesh=mesh, data=config.data, workdir=os.path.join(workdir, "eval") if workdir else "",
        seed=config.seed, batch_size=config.eval.batch_size, dtype=compute_dtype(config.dtype),
        has_classifier=int(config.student.get("num_classes", 0) or 0) > 0,
        has_teacher=bool(method.NEEDS_TEACHER))


def eval_model(method: Any, ctx: dict, config: Any, state: dict, teacher_vars: Any,
               dtype: Any) -> Any:
    """The student of `state` as an `eval.Model`: its outputs, the student-teacher pair
    (distillation monitors; the method's queue rides along) and the exported encoder."""
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    if teacher_vars is not None:
        variables["teacher"] = teacher_vars
        if "queue" in state:
            variables["queue"] = state["queue"]["feats"]

    def own(v: dict) -> dict:
        return {"params": v["params"], "batch_stats": v["batch_stats"]}

    stats = (tuple(config.data.mean), tuple(config.data.std))  # the run's normalisation

    def fn(v: dict, x: jax.Array) -> dict:
        out = method.eval_outputs(ctx, own(v), data.normalize(x, dtype, *stats))
        return {k: a.astype(jnp.float32) for k, a in out.items()}

    def pair(v: dict, x: jax.Array) -> dict:
        x = data.normalize(x, dtype, *stats)
        s = method.eval_outputs(ctx, own(v), x)["embedding"]
        t = ctx["teacher"].apply(v["teacher"], x, train=False)["embedding"]
        return {"student": s.astype(jnp.float32), "teacher": t.astype(jnp.float32)}

    def encoder() -> tuple[Any, dict, dict]:
        host = jax.tree_util.tree_map(sharding.to_host, own(variables))
        host, manifest = method.export(config, host)
        return models.build_encoder(manifest, dtype), host, manifest

    return evaluation.Model(
        fn=fn, variables=variables, mesh=ctx["mesh"], step=int(state["step"]),
        pair=pair if teacher_vars is not None else None, encoder=encoder,
        has_classifier=int(config.student.get("num_classes", 0) or 0) > 0,
        tag=f"{config.method}@{int(state['step'])}")


def make_init_state(method: Any, tx: optax.GradientTransformation, ctx: dict,
                    dtype: Any) -> Any:
    """The pure `(rng, host) -> state` of a new run (student variables, optimizer state, step,
    rng and the method's extra state), to be jitted with the state's shardings."""
    config, student = ctx["config"], ctx["student"]
    size = config.data.image_size
    dummy = jnp.zeros((1, size, size, 3), dtype)

    def init_state(rng: jax.Array, host: dict) -> dict:
        r_model, r_extra, r_step = jax.random.split(rng, 3)
        variables = student.init(r_model, dummy, train=False)
        student_vars = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        return {
            **student_vars,
            "opt_state": tx.init(student_vars["params"]),
            "step": jnp.zeros((), jnp.int32),
            "rng": r_step,
            **method.init_extra(config, r_extra, student_vars, {**ctx, "host": host}),
        }

    return init_state


def make_train_step(method: Any, tx: optax.GradientTransformation, schedule: optim.Schedule,
                    ctx: dict) -> Any:
    """The pure train step `(state, batch, teacher_vars) -> (state, metrics)`, not yet jitted.

    `run` jits it with explicit shardings and donates the state; benchmarks time this function.
    """

    def train_step(state: dict, batch: dict, teacher_vars: Any) -> tuple[dict, dict]:
        rng = jax.random.fold_in(state["rng"], state["step"])
        loss_fn = functools.partial(
            method.loss_fn, state=state, batch=batch, rng=rng, teacher_vars=teacher_vars, ctx=ctx
        )
        (loss, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        upd, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], upd)
        new_state = {**state, **updates, "params": params, "opt_state": opt_state,
                     "step": state["step"] + 1}
        grad_norm = optax.tree.norm(grads)
        # Checked on the host only at log/checkpoint steps (resilience.NonFiniteGuard).
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if ctx["config"].get("nonfinite", "stop") == "skip":
            # Keep everything but the step counter, so the data and rng still move on.
            kept = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new_state, state)
            new_state = {**kept, "step": new_state["step"]}
        metrics = {**metrics, "loss": loss, "lr": schedule(state["step"]),
                   "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
                   "update_norm": optax.tree.norm(upd), "finite": ok}
        return new_state, metrics

    return train_step


def data_shards(config: Any) -> int:
    """How many data shards the global batch is cut into (data.num_shards, -1: one per process).

    The training stream is a pure function of (seed, step, shards), whatever the process count:
    each process reads `shards / process_count` shards and concatenates their batches. So a run
    on 2 hosts equals a run on 1 host with `data.num_shards=2`, and resuming on another number of
    hosts with the same `num_shards` continues the very same stream.
    """
    n = int(config.data.get("num_shards", -1))
    n = jax.process_count() if n == -1 else n
    if n <= 0 or n % jax.process_count() or config.batch_size % n:
        raise ConfigError(
            f"data.num_shards={n} must be a positive multiple of the {jax.process_count()}"
            f" process(es) that divides the global batch {config.batch_size} (-1: one per process)"
        )
    return n


def train_stream(source: Any, config: Any, method: Any, start_step: int) -> Any:
    """This process's training batches: its shards' batches, concatenated along the batch."""
    shards = data_shards(config)
    per_process = shards // jax.process_count()
    streams = [
        data.train_dataset(
            source, split=config.data.train_split, views=method.views(config),
            image_size=config.data.image_size, crop_scale=tuple(config.data.crop_scale),
            flip_p=config.data.flip_p, train_crop=config.data.train_crop,
            crop_padding=config.data.crop_padding, fused_decode=config.data.fused_decode,
            antialias=config.data.antialias,
            local_batch=config.batch_size // shards,
            seed=config.seed,
            start_step=start_step, process_index=jax.process_index() * per_process + i,
            process_count=shards, shuffle_buffer=config.data.shuffle_buffer,
            **method.data_options(config),
        )
        for i in range(per_process)
    ]
    if per_process == 1:
        return streams[0]
    from disco_jax.data._tf import no_autograph, tf  # GPUs hidden from TF

    return tf.data.Dataset.zip(tuple(streams)).map(no_autograph(
        lambda *xs: {k: tf.concat([x[k] for x in xs], 0) for k in xs[0]}
    ))


# --------------------------------------------------------------------------- run

# `train.run(..., extra_actions=...)`: `action(step, state)`, called right after each update.
Action = Callable[[int, dict], None]


@dataclasses.dataclass
class StepEnd:
    """One updated step as the loop's actions see it. An action sets `stop` (a preemption) to
    end the run after this step: the later actions still run, and the checkpoint is forced."""

    step: int
    state: dict
    metrics: dict
    is_log: bool
    is_last: bool
    stop: bool = False


LoopAction = Callable[[StepEnd], None]


@dataclasses.dataclass
class Run:
    """What `setup` hands the loop and `finish`: the fixed parts of one run."""

    config: Any
    method: Any
    workdir: str
    mesh: jax.sharding.Mesh
    dtype: Any
    ctx: dict
    teacher_vars: Any
    meta: dict  # saved with every checkpoint: the trajectory config and the teacher's identity
    total_steps: int
    steps_per_epoch: int
    mngr: Any  # orbax CheckpointManager
    step_fn: Any
    batches: Iterator[dict]
    suite: Any  # eval.Suite
    metrics_log: Any  # run_log.MetricsLog

    def model(self, state: dict) -> Any:
        return eval_model(self.method, self.ctx, self.config, state, self.teacher_vars,
                          self.dtype)


def run(config: mlc.ConfigDict, workdir: str, extra_actions: Sequence[Action] = ()) -> dict:
    """Train (or resume) one method in `workdir`, evaluate, export; return the results dict.

    validate (writes nothing) -> `setup` -> `train_loop` -> `finish`. What setup opens (the
    checkpoint manager, the metric writers) is closed on every way out, errors included.

    `extra_actions`: more periodic work, `action(step, state)` called right after every step's
    update, before that step's checks, log line and checkpoint (tests use it to send signals or
    inspect the state at a step)."""
    platform_info.log_backend(log)  # first: which backend, and a warning if a GPU/TPU is unused
    method = methods.get(config.method)
    config = methods.resolve_loss(config)  # every knob in config.json; unknown keys refused
    mesh = sharding.make_mesh(config.mesh.num_devices)
    source, teacher_manifest = validate(config, method, mesh)
    done = finished_results(workdir)
    if done is not None:
        return done
    with contextlib.ExitStack() as stack:
        r, state = setup(config, method, mesh, source, teacher_manifest, workdir, stack)
        state, preempted, train_time = train_loop(r, state, extra_actions)
        results = finish(r, state, preempted, train_time)
    if jax.process_index() == 0 and not preempted and results["step"] >= r.total_steps:
        _plot_curves(workdir)
    return results


def finished_results(workdir: str) -> dict | None:
    """The results.json of a run that already reached its last step, else None."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    if done.get("step", 0) < done.get("total_steps", 1):
        return None
    log.info("%s already finished (step %d); delete results.json to evaluate again", workdir,
             done["step"])
    return done


def close_at_exit(stack: contextlib.ExitStack, close: Callable[[], None], what: str) -> None:
    """`close()` when `stack` unwinds, on every path. On an error path a close that fails too
    (the manager waits for an async write that failed) is logged, so the run's own error (a
    one-line ConfigError, a FloatingPointError) stays the one raised."""

    def exit_(exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc_type is None:
            close()
            return False
        try:
            close()
        except Exception as e:  # noqa: BLE001 -- the error in flight matters more
            log.warning("while stopping on an error, closing %s failed too: %s", what, e)
        return False

    stack.push(exit_)


def setup(config: Any, method: Any, mesh: jax.sharding.Mesh, source: Any,
          teacher_manifest: dict | None, workdir: str,
          stack: contextlib.ExitStack) -> tuple[Run, dict]:
    """Everything before the first step, in this order: the teacher (read and checked before
    anything is written), the workdir, schedule and optimizer, models, the state (restored or
    new), the run record, data and the jitted step, the evaluators, the metric writers."""
    dtype = compute_dtype(config.dtype)
    teacher, host_teacher_vars = None, None
    if method.NEEDS_TEACHER:
        teacher, host_teacher_vars, teacher_manifest = load_teacher(config, method, dtype)
    steps_per_epoch = epoch_steps(config, source)
    total_steps = num_train_steps(config, steps_per_epoch)  # a bad length: before any write
    trajectory = prepare_workdir(config, workdir)
    schedule = make_schedule(config, steps_per_epoch, total_steps)
    tx = optim.make_optimizer(config.optimizer, schedule)
    ctx = make_ctx(config, method, mesh, dtype, teacher, total_steps, steps_per_epoch)
    # The teacher is frozen, outside the optimizer and the checkpoints.
    teacher_vars, teacher_id = teacher_on_mesh(host_teacher_vars, teacher_manifest, mesh)
    meta = {"teacher": teacher_id, "config": trajectory}
    state, state_sh, mngr = init_or_restore(config, method, tx, ctx, dtype, meta, workdir,
                                            stack)
    start_step = int(state["step"])
    log_start(config, source, mesh, workdir, state, teacher_id, total_steps,
              steps_per_epoch)
    batches, step_fn = data_and_step(source, config, method, tx, schedule, ctx, state_sh,
                                     start_step)
    # config.evals: handed a Model, never called from here directly.
    suite = evaluation.Suite(config.evals if config.eval.enabled else {},
                             eval_env(config, method, mesh, workdir),
                             steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    from disco_jax import run_log  # clu: TensorFlow, only once a run trains

    metrics_log = run_log.MetricsLog(workdir)
    close_at_exit(stack, metrics_log.close, "the metric writers")
    return Run(config=config, method=method, workdir=workdir, mesh=mesh, dtype=dtype, ctx=ctx,
               teacher_vars=teacher_vars, meta=meta, total_steps=total_steps,
               steps_per_epoch=steps_per_epoch, mngr=mngr, step_fn=step_fn, batches=batches,
               suite=suite, metrics_log=metrics_log), state


def prepare_workdir(config: Any, workdir: str) -> dict:
    """Refuse a checkpoint of another config (no resume by accident), then create the workdir,
    write config.json and drop interrupted checkpoint writes (process 0). Returns the config's
    trajectory identity, saved with every checkpoint."""
    trajectory = resilience.trajectory_config(config)
    complete, partial = resilience.scan_checkpoints(workdir)
    if complete:
        resilience.check_same_config(
            resilience.saved_meta(workdir, complete[-1]).get("config"), trajectory, workdir,
            bool(config.get("force_resume", False)),
        )
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        resilience.report_lost(workdir, complete, partial)  # the manager removes the leftovers
    return trajectory


def make_schedule(config: Any, steps_per_epoch: int, total_steps: int) -> optim.Schedule:
    return optim.lr_schedule(
        base_lr=config.optimizer.base_lr,
        global_batch=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_epochs=config.optimizer.warmup_epochs,
        decay=config.optimizer.decay,
        granularity=config.optimizer.granularity,
        scale_with_batch=config.optimizer.scale_with_batch,
        step_milestones=tuple(config.optimizer.step_milestones),
        warmup_from=config.optimizer.warmup_from,
        cosine_after_warmup=config.optimizer.cosine_after_warmup,
    )


def make_ctx(config: Any, method: Any, mesh: jax.sharding.Mesh, dtype: Any, teacher: Any,
             total_steps: int, steps_per_epoch: int) -> dict:
    """What the method's functions are handed: the modules, augmentation, config and mesh."""
    augment = functools.partial(data.mocov2_augment, **config.augment,
                                mean=tuple(config.data.mean), std=tuple(config.data.std),
                                out_dtype=dtype)
    return {"student": method.build_student(config, dtype), "teacher": teacher,
            "augment": augment, "config": config, "mesh": mesh, "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch}


def teacher_on_mesh(host_vars: Any, manifest: dict | None,
                    mesh: jax.sharding.Mesh) -> tuple[Any, dict | None]:
    """(the teacher's variables replicated on `mesh`, its identity for the checkpoints' meta);
    (None, None) without a teacher."""
    if host_vars is None:
        return None, None
    log.info("teacher %s from %s (sha256 %s…)", manifest["model"], manifest["path"],
             manifest["fingerprint"][:12])
    return (jax.device_put(host_vars, sharding.replicated(mesh)),
            {"path": manifest["path"], "fingerprint": manifest["fingerprint"]})


def init_or_restore(config: Any, method: Any, tx: optax.GradientTransformation, ctx: dict,
                    dtype: Any, meta: dict, workdir: str,
                    stack: contextlib.ExitStack) -> tuple[dict, Any, Any]:
    """(state, its shardings, the checkpoint manager, closed with `stack`): the latest
    checkpoint in the workdir if any, else a new state created directly with its shardings."""
    mesh = ctx["mesh"]
    # Host-side work of the method (read labels, load weights), passed into the jitted init.
    host = jax.device_put(method.host_init(config, ctx), sharding.replicated(mesh))
    init_state = make_init_state(method, tx, ctx, dtype)
    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed), host)
    state_sh = sharding.tree_shardings(abstract, mesh)
    mngr = checkpoint.manager(
        workdir, keep=config.keep_checkpoints, every_steps=config.checkpoint_every_steps
    )
    close_at_exit(stack, mngr.close, "the checkpoint manager")
    latest = mngr.latest_step()
    if latest is None:
        state = jit_util.run_once(init_state, jax.random.PRNGKey(config.seed), host,
                                  out_shardings=state_sh)
        log.info("initialised a new %s run in %s", config.method, workdir)
        return state, state_sh, mngr
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
    )
    state, saved_meta = checkpoint.restore(mngr, latest, abstract)
    if saved_meta.get("teacher") != meta["teacher"]:
        log.warning("teacher differs from the one this checkpoint was trained with: %s vs %s",
                    saved_meta.get("teacher"), meta["teacher"])
    log.info("resumed from %s at step %d", mngr.directory, latest)
    return state, state_sh, mngr



def log_start(config: Any, source: Any, mesh: jax.sharding.Mesh, workdir: str, state: dict,
              teacher_id: dict | None, total_steps: int, steps_per_epoch: int) -> None:
    """This start's entry in the run record (process 0) and the run's one-line summary."""
    if jax.process_index() == 0:
        resilience.write_run_record(workdir, resilience.run_record(
            config, source=source, mesh=mesh, teacher=teacher_id, start_step=int(state["step"]),
            total_steps=total_steps))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    log.info("student %s: %s parameters; mesh %s; %d steps (%d/epoch), global batch %d",
             config.student.model, f"{n_params:,}", dict(mesh.shape), total_steps,
             steps_per_epoch, config.batch_size)



def data_and_step(source: Any, config: Any, method: Any, tx: optax.GradientTransformation,
                  schedule: optim.Schedule, ctx: dict, state_sh: Any,
                  start_step: int) -> tuple[Iterator[dict], Any]:
    """(global batches from `start_step` on, `make_train_step` jitted with explicit shardings
    and the state donated)."""
    mesh, repl = ctx["mesh"], sharding.replicated(ctx["mesh"])
    ds = train_stream(source, config, method, start_step)
    batch_sh = {k: sharding.batch_sharding(mesh) for k in ds.element_spec}
    step_fn = jax.jit(
        make_train_step(method, tx, schedule, ctx),
        in_shardings=(state_sh, batch_sh, repl),
        out_shardings=(state_sh, repl),
        donate_argnums=(0,),
    )
    return data.global_iterator(ds, mesh), step_fn


def train_loop(r: Run, state: dict, extra_actions: Sequence[Action]) -> tuple[dict, bool, float]:
    """Steps from the state's step to the end (or `stop_at_step`), each followed by the actions
    of `loop_actions`; returns (state, preempted, training seconds). Our SIGTERM handler lives
    exactly as long as the loop (a SIGTERM during the final export ends the process as usual)."""
    config = r.config
    from disco_jax import run_log  # imported by setup already; clu's progress report

    progress = run_log.Progress(num_train_steps=r.total_steps, every_steps=config.log_every_steps)
    start_step = int(state["step"])
    end_step = (r.total_steps if config.stop_at_step <= 0
                else min(r.total_steps, config.stop_at_step))
    guard = resilience.NonFiniteGuard(config.get("nonfinite", "stop"))
    preempted = False
    t0 = time.time()
    log.info("compiling the train step (the first step includes it)")
    with contextlib.closing(resilience.Preemption()) as preemption:
        actions = loop_actions(r, progress, guard, preemption, extra_actions)
        for step in range(start_step + 1, end_step + 1):
            state, metrics = r.step_fn(state, next(r.batches), r.teacher_vars)
            if step == start_step + 1:
                jax.block_until_ready(metrics)
                log.info("first step done in %.1f s (compile included)", time.time() - t0)
            distributed.note_step(step)  # named in the message if a peer process dies
            guard.add(step, metrics)
            end = StepEnd(step=step, state=state, metrics=metrics, is_last=step == end_step,
                          is_log=step % config.log_every_steps == 0 or step == end_step)
            for action in actions:
                action(end)
            if end.stop:
                preempted = True
                break
    checkpoint.wait(r.mngr)
    return state, preempted, time.time() - t0


def loop_actions(r: Run, progress: Any, guard: resilience.NonFiniteGuard,
                 preemption: resilience.Preemption,
                 extra_actions: Sequence[Action]) -> list[LoopAction]:
    """The periodic work after each update, in this order: the extra actions (right after the
    update: a test's SIGTERM there is this step's preemption), the progress report, the
    preemption check, the non-finite check, the log line, the due evaluators, the checkpoint."""
    config = r.config

    def preempt(t: StepEnd) -> None:
        # Multi-process agreement on a preemption costs a collective: only at log steps.
        t.stop = (jax.process_count() == 1 or t.is_log) and preemption.should_stop(t.step)

    def check_finite(t: StepEnd) -> None:
        if t.is_log or t.stop or t.is_last or r.mngr.should_save(t.step):
            guard.check()  # before any save: a non-finite state is never checkpointed

    def log_line(t: StepEnd) -> None:
        if not t.is_log:
            return
        scalars = {k: float(v) for k, v in jax.device_get(t.metrics).items() if k != "finite"}
        rate = progress.steps_per_sec
        if rate is not None:
            scalars["steps_per_sec"] = rate
        r.metrics_log.write(t.step, scalars)
        eta = "" if rate is None else (
            f" | {rate:.2f} steps/s, {rate * config.batch_size:.0f} img/s, ETA"
            f" {evaluation.common.format_eta(progress.eta_seconds)}")
        log.info("step %d/%d loss %.4f lr %.4g%s", t.step, r.total_steps, scalars["loss"],
                 scalars["lr"], eta)

    def periodic_evals(t: StepEnd) -> None:
        due = r.suite.due(t.step)
        if due:
            with progress.timed("eval", wait_jax_async_dispatch=False):
                records = r.suite.run_all(r.model(t.state), due)
            r.metrics_log.write(t.step, evaluation.flat(records))

    def save(t: StepEnd) -> None:
        checkpoint.save(r.mngr, t.step, t.state, r.meta, force=t.is_last or t.stop)

    def extra(action: Action) -> LoopAction:
        return lambda t: action(t.step, t.state)

    return [*map(extra, extra_actions), lambda t: progress(t.step, time.time()), preempt,
            check_finite, log_line, periodic_evals, save]


def finish(r: Run, state: dict, preempted: bool, train_time: float) -> dict:
    """The results dict; at the last step also the exported encoder, the final evaluators'
    records and results.json (process 0)."""
    config, workdir, step = r.config, r.workdir, int(state["step"])
    if preempted:
        log.warning("preempted: checkpoint of step %d saved in %s; start the same command again"
                    " to resume", step, r.mngr.directory)
        return {"step": step, "total_steps": r.total_steps, "preempted": True,
                "method": config.method}
    results: dict[str, Any] = {"step": step, "total_steps": r.total_steps,
                               "method": config.method, "student": config.student.model,
                               "train_seconds_this_run": round(train_time, 1)}
    if step < r.total_steps:
        return results
    is_main = jax.process_index() == 0
    seen = export_encoder(r, state)
    names = r.suite.at_end()
    if names:
        t_eval = time.time()
        records = r.suite.run_all(r.model(state), names)
        results["eval_seconds"] = round(time.time() - t_eval, 1)
        results["evals"] = evaluation.flat(records)
        results.update(headline(results["evals"]))
        r.metrics_log.write(step, results["evals"])
        if is_main:
            evaluation.records.write(workdir, records, {
                "encoder": os.path.join(workdir, "encoder"), "model": config.student.model,
                "data": seen, "step": step})
    if is_main:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def export_encoder(r: Run, state: dict) -> dict:
    """Write WORKDIR/encoder (every process: orbax's save synchronises them, so process 0 alone
    would wait forever); returns the data facts its manifest records."""
    config = r.config
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    variables = jax.tree_util.tree_map(sharding.to_host, variables)
    variables, manifest = r.method.export(config, variables)
    seen = {"name": config.data.name, "image_size": int(config.data.image_size),
            "train_split": config.data.train_split, "eval_split": config.data.eval_split,
            # the input normalisation the encoder was trained with (evaluate reuses it)
            "mean": list(config.data.mean), "std": list(config.data.std)}
    checkpoint.save_encoder(
        os.path.join(r.workdir, "encoder"), variables,
        manifest | {"source": "disco_jax", "method": config.method, "step": int(state["step"]),
                    "data": seen},
    )
    return seen


def headline(flat: dict[str, float]) -> dict[str, float]:
    """`knn_top1` / `linear_top1`: the kNN (its headline k) and quick-probe top-1, for tables."""
    out = {}
    for key, name in (("knn/top1", "knn_top1"), ("linear_fast/top1", "linear_top1")):
        if key in flat:
            out[name] = flat[key]
    return out


def _plot_curves(workdir: str) -> None:
    """W/plots/curves.png; a plotting problem must not fail a finished run."""
    from disco_jax import plot

    try:
        log.info("plot: %s", plot.curves(workdir))
    except Exception as e:  # noqa: BLE001 -- matplotlib/fonts/disk: report and go on
        log.warning("could not draw the training curves: %s", e)
