"""What a run will do, worked out without compiling or writing anything (`--dry_run`).

`plan(config)` validates a config as the trainer does (`train.validate`: every check that needs
no compile) and returns the run's shape: steps, epochs, devices and mesh, global and per-device
batch, and the student's forward FLOPs per image. `describe(plan)` gives the lines
`python -m disco_jax.main --dry_run` prints.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp

from disco_jax import data, methods, sharding, train
from disco_jax.errors import ConfigError


def forward_flops(module: Any, image_size: int) -> float | None:
    """XLA's estimate of one image's forward pass (`train=False`), from the lowered, not
    compiled, computation (a multiply-add counts 2). Lowered on the CPU backend: the count is
    the same on any backend, and the GPU/TPU plugins have no cost analysis before compiling.
    None where the estimate is unavailable."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return None
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32,
                             sharding=jax.sharding.SingleDeviceSharding(cpu))
    try:
        variables = jax.eval_shape(
            lambda x: module.init(jax.random.PRNGKey(0), x, train=False), x)
        variables = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                           sharding=jax.sharding.SingleDeviceSharding(cpu)),
            variables)
        cost = jax.jit(lambda v, x: module.apply(v, x, train=False)).lower(
            variables, x).cost_analysis()
    except Exception:  # noqa: BLE001 -- an estimate only; the plan stands without it
        return None
    if isinstance(cost, list):  # older jax: one dict per device
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def plan(config: Any, *, check: bool = True) -> dict:
    """The plan of one training config; raises ConfigError (one line) as `train.run` would
    before compiling. `check=False` skips `train.validate` (see `plan_stages`)."""
    method = methods.get(config.method)
    config = methods.resolve_loss(config)
    mesh = sharding.make_mesh(config.mesh.num_devices)
    if check:
        source, _ = train.validate(config, method, mesh)
    else:
        sharding.check_batch(config.batch_size, mesh)
        source = data.get_source(config.data)
    per_epoch = train.epoch_steps(config, source)
    total = train.num_train_steps(config, per_epoch)
    stop = int(config.get("stop_at_step", -1))
    dtype = train.compute_dtype(config.dtype)
    student = method.build_student(config, dtype)
    devices = mesh.devices.flatten()
    return {
        "method": config.method,
        "data": source.name,
        "train_split": config.data.train_split,
        "train_examples": int(source.num_examples(config.data.train_split)),
        "total_steps": total,
        "stop_at_step": stop if 0 < stop < total else None,
        "steps_per_epoch": per_epoch,
        "epochs": total / per_epoch,
        "devices": len(devices),
        "platform": devices[0].platform,
        "processes": jax.process_count(),
        "mesh": dict(mesh.shape),
        "global_batch": int(config.batch_size),
        "per_device_batch": int(config.batch_size) // len(devices),
        "image_size": int(config.data.image_size),
        "dtype": jnp.dtype(dtype).name,
        "student": config.student.model,
        "student_flops_per_image": forward_flops(student, int(config.data.image_size)),
        "checked": check,
    }


def plan_stages(config: Any) -> dict[str, dict]:
    """The plan of every stage of a multi-stage config (`stages`, `stage_order`). A stage that
    reads an encoder an earlier stage of the same run writes (`{workdir}` in its path) fails
    the check of that encoder (for a teacher, the last check of `train.validate`): it is
    planned anyway and marked as checked in part. Any other error is raised."""
    out = {}
    for name in config.stage_order:
        stage = copy.deepcopy(config.stages[name])
        try:
            out[name] = plan(stage)
        except ConfigError as e:
            if "{workdir}" not in str(e):  # a real error, not the encoder yet to be written
                raise
            out[name] = plan(stage, check=False)
    return out


def describe(p: dict) -> list[str]:
    """The plan as the lines `--dry_run` prints."""
    stop = f"; leaves at step {p['stop_at_step']}" if p["stop_at_step"] else ""
    flops = p["student_flops_per_image"]
    cost = ("n/a (XLA gave no estimate)" if flops is None
            else f"{flops / 1e9:.3f} GFLOPs")
    lines = [
        f"method: {p['method']} on {p['data']} ({p['train_examples']} examples in"
        f" {p['train_split']!r})",
        f"steps: {p['total_steps']} in total{stop}",
        f"epochs: {p['epochs']:.4g} of {p['steps_per_epoch']} steps per epoch",
        f"devices: {p['devices']} x {p['platform']} in {p['processes']} process(es);"
        f" mesh {p['mesh']}",
        f"batch: {p['global_batch']} global, {p['per_device_batch']} per device",
        f"student: {p['student']}, forward FLOPs per image at {p['image_size']} px: {cost}"
        f"; compute dtype {p['dtype']}",
    ]
    if not p["checked"]:
        lines.append("checks: partial (it reads an encoder an earlier stage writes; checked"
                     " when that stage has run)")
    return lines
