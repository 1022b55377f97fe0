"""The one training loop: any method, any student/teacher, one mesh.

Read top to bottom: validate -> workdir -> mesh & data -> models -> state (created sharded) ->
restore -> jitted step -> loop (log, checkpoint, kNN) -> final evaluation and export.
Nothing here branches on the method's name; methods plug in through `disco_jax.methods`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from clu import metric_writers, periodic_actions

from disco_jax import checkpoint, data, distributed, methods, models, optim, resilience, sharding
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


def num_train_steps(config: Any, steps_per_epoch: int) -> int:
    if config.total_steps > 0:
        return int(config.total_steps)
    if config.total_epochs <= 0:
        raise ConfigError("set total_epochs or total_steps to a positive number")
    return int(round(config.total_epochs * steps_per_epoch))


def validate(config: Any, method: Any, mesh: jax.sharding.Mesh) -> tuple[Any, dict | None]:
    """Every check that needs no compile; raises ConfigError with one line. Writes nothing."""
    sharding.check_batch(config.batch_size, mesh)
    source = data.get_source(config.data)  # an unknown or unprepared dataset fails here
    resilience.NonFiniteGuard(config.get("nonfinite", "stop"))  # validates the option
    data_shards(config)
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
    method.validate(config)
    optim.validate(config.optimizer)
    compute_dtype(config.dtype)
    for net in ("student",) + (("teacher",) if method.NEEDS_TEACHER else ()):
        # Unknown names and options fail here, before anything is traced.
        models.build_encoder(config[net])
    teacher_manifest = None
    if method.NEEDS_TEACHER:
        if not config.teacher.init:
            raise ConfigError(f"method {config.method!r} needs teacher.init (an encoder directory)")
        teacher_manifest = checkpoint.read_manifest(config.teacher.init)
        if teacher_manifest.get("model") != config.teacher.model:
            raise ConfigError(
                f"teacher checkpoint {teacher_manifest['path']!r} holds a"
                f" {teacher_manifest.get('model')!r} but teacher.model is"
                f" {config.teacher.model!r}"
            )
    return source, teacher_manifest


def load_teacher(config: Any, method: Any, dtype: Any) -> tuple[Any, Any, dict]:
    """(module, host variables, manifest) of the frozen teacher; ConfigError if its weights are
    unreadable or do not fit the architecture its manifest names. Traces, never compiles."""
    host_vars, manifest = checkpoint.load_encoder(config.teacher.init)
    teacher = method.build_teacher(manifest, dtype)
    size = config.data.image_size
    expected = jax.eval_shape(
        functools.partial(teacher.init, train=False), jax.random.PRNGKey(0),
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
            f"teacher weights in {manifest['path']!r} do not fit a {manifest.get('model')!r}"
            f" with {manifest.get('model_kwargs')} ({len(bad)} mismatched arrays, e.g."
            f" {bad[0]}: expected {want_paths.get(bad[0])}, found {got_paths.get(bad[0])});"
            " check teacher.init and the manifest"
        )
    return teacher, host_vars, manifest


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


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


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
            flip_p=config.data.flip_p, local_batch=config.batch_size // shards, seed=config.seed,
            start_step=start_step, process_index=jax.process_index() * per_process + i,
            process_count=shards, shuffle_buffer=config.data.shuffle_buffer,
            **method.data_options(config),
        )
        for i in range(per_process)
    ]
    if per_process == 1:
        return streams[0]
    import tensorflow as tf

    return tf.data.Dataset.zip(tuple(streams)).map(
        lambda *xs: {k: tf.concat([x[k] for x in xs], 0) for k in xs[0]}
    )


# --------------------------------------------------------------------------- run


def run(config: mlc.ConfigDict, workdir: str) -> dict:
    """Train (or resume) one method in `workdir`, evaluate, export; return the results dict."""
    method = methods.get(config.method)
    mesh = sharding.make_mesh(config.mesh.num_devices)
    source, teacher_manifest = validate(config, method, mesh)

    # ---- workdir: written only after validation passed.
    is_main = jax.process_index() == 0
    finished = os.path.join(workdir, "results.json")
    if os.path.exists(finished):
        with open(finished) as f:
            done = json.load(f)
        if done.get("step", 0) >= done.get("total_steps", 1):
            log.info("%s already finished (step %d); delete results.json to evaluate again",
                     workdir, done["step"])
            return done
    # The teacher is read (and its weights checked) before anything is written.
    dtype = compute_dtype(config.dtype)
    teacher, host_teacher_vars, teacher_manifest = None, None, teacher_manifest
    if method.NEEDS_TEACHER:
        teacher, host_teacher_vars, teacher_manifest = load_teacher(config, method, dtype)
    # A checkpoint of another config is never resumed by accident.
    trajectory = resilience.trajectory_config(config)
    complete, partial = resilience.scan_checkpoints(workdir)
    if complete:
        resilience.check_same_config(
            resilience.saved_meta(workdir, complete[-1]).get("config"), trajectory, workdir,
            bool(config.get("force_resume", False)),
        )
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        for step in resilience.report_lost(workdir, complete, partial):
            resilience.remove_partial(workdir, step)

    # ---- steps and schedule.
    # The pipeline's own epoch length, so per-epoch lr steps line up with its reshuffles.
    shards = data_shards(config)
    steps_per_epoch = max(1, data.steps_per_epoch(
        source, split=config.data.train_split,
        local_batch=config.batch_size // shards, process_count=shards,
    ))
    total_steps = num_train_steps(config, steps_per_epoch)
    schedule = optim.lr_schedule(
        base_lr=config.optimizer.base_lr,
        global_batch=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_epochs=config.optimizer.warmup_epochs,
        decay=config.optimizer.decay,
        granularity=config.optimizer.granularity,
        scale_with_batch=config.optimizer.scale_with_batch,
        step_milestones=tuple(config.optimizer.step_milestones),
    )
    tx = optim.make_optimizer(config.optimizer, schedule)

    # ---- models. The teacher is frozen, outside the optimizer and the checkpoints.
    student = method.build_student(config, dtype)
    teacher_vars, meta = None, {"teacher": None, "config": trajectory}
    repl = sharding.replicated(mesh)
    if method.NEEDS_TEACHER:
        teacher_vars = jax.device_put(host_teacher_vars, repl)
        meta["teacher"] = {
            "path": teacher_manifest["path"],
            "fingerprint": teacher_manifest["fingerprint"],
        }
        log.info("teacher %s from %s (sha256 %s…)", teacher_manifest["model"],
                 teacher_manifest["path"], teacher_manifest["fingerprint"][:12])
    augment = functools.partial(data.mocov2_augment, **config.augment, out_dtype=dtype)
    ctx = {"student": student, "teacher": teacher, "augment": augment, "config": config,
           "mesh": mesh}

    # ---- train state, created directly with its shardings.
    size = config.data.image_size
    dummy = jnp.zeros((1, size, size, 3), dtype)

    def init_state(rng: jax.Array) -> dict:
        r_model, r_extra, r_step = jax.random.split(rng, 3)
        variables = student.init(r_model, dummy, train=False)
        student_vars = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        return {
            **student_vars,
            "opt_state": tx.init(student_vars["params"]),
            "step": jnp.zeros((), jnp.int32),
            "rng": r_step,
            **method.init_extra(config, r_extra, student_vars, ctx),
        }

    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))
    state_sh = sharding.tree_shardings(abstract, mesh)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
    )

    # ---- restore (a checkpoint in the workdir wins), else initialise.
    mngr = checkpoint.manager(
        workdir, keep=config.keep_checkpoints, every_steps=config.checkpoint_every_steps
    )
    latest = mngr.latest_step()
    if latest is not None:
        state, saved_meta = checkpoint.restore(mngr, latest, abstract)
        if saved_meta.get("teacher") != meta["teacher"]:
            log.warning("teacher differs from the one this checkpoint was trained with: %s vs %s",
                        saved_meta.get("teacher"), meta["teacher"])
        log.info("resumed from %s at step %d", mngr.directory, latest)
    else:
        state = jax.jit(init_state, out_shardings=state_sh)(jax.random.PRNGKey(config.seed))
        log.info("initialised a new %s run in %s", config.method, workdir)
    start_step = int(state["step"])
    if is_main:
        resilience.write_run_record(workdir, resilience.run_record(
            config, source=source, mesh=mesh, teacher=meta["teacher"], start_step=start_step,
            total_steps=total_steps))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    log.info("student %s: %s parameters; mesh %s; %d steps (%d/epoch), global batch %d",
             config.student.model, f"{n_params:,}", dict(mesh.shape), total_steps,
             steps_per_epoch, config.batch_size)

    ds = train_stream(source, config, method, start_step)
    batch_sh = {k: sharding.batch_sharding(mesh) for k in ds.element_spec}
    step_fn = jax.jit(
        make_train_step(method, tx, schedule, ctx),
        in_shardings=(state_sh, batch_sh, repl),
        out_shardings=(state_sh, repl),
        donate_argnums=(0,),
    )

    # ---- evaluation of the frozen backbone.
    feature_fn = jax.jit(
        lambda v, x: method.eval_features(ctx, v, data.normalize(x, out_dtype=dtype)).astype(
            jnp.float32
        ),
        out_shardings=repl,
    )

    def features(state: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
        ds = data.eval_dataset(
            source, split=split, image_size=size,
            local_batch=config.eval.batch_size // jax.process_count(),
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        return evaluation.extract(functools.partial(feature_fn, variables), ds, mesh)

    def evaluate(state: dict, linear: bool) -> dict[str, float]:
        train_f, train_y = features(state, config.data.train_split)
        test_f, test_y = features(state, config.data.eval_split)
        out = {"knn_top1": evaluation.knn_accuracy(
            train_f, train_y, test_f, test_y, num_classes=source.num_classes,
            k=config.eval.knn_k, temp=config.eval.knn_temp)}
        if linear:
            out["linear_top1"] = evaluation.linear_probe(
                train_f, train_y, test_f, test_y, num_classes=source.num_classes,
                epochs=config.eval.linear_epochs, lr=config.eval.linear_lr,
                batch_size=config.eval.linear_batch_size, seed=config.seed)
        return out

    # ---- the loop.
    metrics_log = MetricsLog(workdir)
    report = periodic_actions.ReportProgress(num_train_steps=total_steps,
                                             writer=metrics_log.writer,
                                             every_steps=config.log_every_steps)
    end_step = total_steps if config.stop_at_step <= 0 else min(total_steps, config.stop_at_step)
    batches = data.global_iterator(ds, mesh)
    guard = resilience.NonFiniteGuard(config.get("nonfinite", "stop"))
    preemption = resilience.Preemption()
    # Tests only: "STEP:SIGNUM" sends this process a signal right after that step's update
    # (SIGKILL: a hard kill, maybe during an async checkpoint write; SIGTERM: a preemption).
    signal_at = os.environ.get("DISCO_JAX_TEST_SIGNAL_AT_STEP", "")
    signal_step, _, signal_num = signal_at.partition(":")
    preempted = False
    t0, t_last, step_last = time.time(), time.time(), start_step
    try:
        for step in range(start_step + 1, end_step + 1):
            batch = next(batches)
            state, metrics = step_fn(state, batch, teacher_vars)
            distributed.note_step(step)  # named in the message if a peer process dies
            guard.add(step, metrics)
            if signal_at and step == int(signal_step):
                os.kill(os.getpid(), int(signal_num))
            report(step, time.time())
            is_log = step % config.log_every_steps == 0 or step == end_step
            # Multi-process agreement on a preemption costs a collective: only at log steps.
            preempted = (jax.process_count() == 1 or is_log) and preemption.should_stop(step)
            if is_log or preempted or step == end_step or mngr.should_save(step):
                guard.check()  # before any save: a non-finite state is never checkpointed
            if is_log:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()
                           if k != "finite"}
                now = time.time()
                rate = (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                scalars["steps_per_sec"] = rate
                metrics_log.write(step, scalars)
                log.info("step %d/%d loss %.4f lr %.4g | %.2f steps/s, %.0f img/s, ETA %s",
                         step, total_steps, scalars["loss"], scalars["lr"], rate,
                         rate * config.batch_size,
                         format_eta((total_steps - step) / max(rate, 1e-9)))
            every = config.eval_every_steps
            if every > 0 and step % every == 0 and step < end_step:
                knn = evaluate(state, linear=False)
                metrics_log.write(step, knn)
                log.info("step %d kNN top-1 %.2f%%", step, knn["knn_top1"])
            checkpoint.save(mngr, step, state, meta, force=step == end_step or preempted)
            if preempted:
                break
    finally:  # also on errors: never leave our SIGTERM handler behind
        preemption.close()
    checkpoint.wait(mngr)
    train_time = time.time() - t0
    if preempted:
        log.warning("preempted: checkpoint of step %d saved in %s; start the same command again"
                    " to resume", int(state["step"]), mngr.directory)
        metrics_log.close()
        mngr.close()
        return {"step": int(state["step"]), "total_steps": total_steps, "preempted": True,
                "method": config.method}

    # ---- the end: export the encoder and evaluate it.
    final_step = int(state["step"])
    results: dict[str, Any] = {"step": final_step, "total_steps": total_steps,
                               "method": config.method, "student": config.student.model,
                               "train_seconds_this_run": round(train_time, 1)}
    if final_step >= total_steps:
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        variables = jax.tree_util.tree_map(sharding.to_host, variables)
        variables, manifest = method.export(config, variables)
        # Every process: orbax's save synchronises them (process 0 alone would wait forever).
        checkpoint.save_encoder(
            os.path.join(workdir, "encoder"), variables,
            manifest | {"source": "disco_jax", "method": config.method, "step": final_step},
        )
        if config.eval.enabled:
            t_eval = time.time()
            results.update(evaluate(state, linear=True))
            results["eval_seconds"] = round(time.time() - t_eval, 1)
            metrics_log.write(final_step, {k: results[k] for k in ("knn_top1", "linear_top1")})
            log.info("final: kNN top-1 %.2f%%, linear top-1 %.2f%%",
                     results["knn_top1"], results["linear_top1"])
        if is_main:
            with open(os.path.join(workdir, "results.json"), "w") as f:
                json.dump(results, f, indent=2)
    metrics_log.close()
    mngr.close()
    return results
