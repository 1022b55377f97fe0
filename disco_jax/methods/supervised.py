"""Supervised training: cross-entropy on the labels with the student's own classifier.

The baseline every SSLD table compares against, and the way to make an SSLD teacher. The
student is an encoder config with `num_classes` > 0 (its backbone then returns `logits`); one
view per image. `loss.label_smoothing` (default 0) smooths the one-hot targets. Examples with a
negative label (unlabelled extras, see `data.extra`) are masked out of the mean.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from disco_jax.errors import ConfigError
from disco_jax.methods.common import bn_knobs, check_bn_groups, student_forward
from disco_jax.methods.ssld import host_init as host_init  # noqa: PLC0414 (student.init)
from disco_jax.methods.ssld import init_extra as init_extra  # noqa: PLC0414
from disco_jax.methods.ssld import validate_student_init

NEEDS_TEACHER = False
LOSS_DEFAULTS = {"label_smoothing": 0.0, **bn_knobs(0)}


def views(config: Any) -> int:
    return 1


def validate(config: Any) -> None:
    if int(config.student.get("num_classes", 0) or 0) <= 0:
        raise ConfigError("method 'supervised' needs student.num_classes > 0 (a classifier)")
    check_bn_groups(config)
    ls = config.loss.label_smoothing
    if not 0.0 <= ls < 1.0:
        raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {ls}")
    validate_student_init(config)


def loss_fn(params, state, batch, rng, teacher_vars, ctx):
    cfg = ctx["config"]
    rng_aug, rng_drop = jax.random.split(rng)
    images = ctx["augment"](rng_aug, batch["image"])
    out, batch_stats = student_forward(params, state, images, ctx, rng=rng_drop)
    logits = out["logits"].astype(jnp.float32)
    labels = batch["label"].astype(jnp.int32)
    valid = labels >= 0
    targets = optax.smooth_labels(
        jax.nn.one_hot(jnp.maximum(labels, 0), logits.shape[-1]),
        cfg.loss.label_smoothing,
    )
    per_example = optax.softmax_cross_entropy(logits, targets)
    n_valid = jnp.maximum(jnp.sum(valid), 1)
    loss = jnp.sum(jnp.where(valid, per_example, 0.0)) / n_valid
    acc = jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == labels, False)) / n_valid
    return loss, ({"train_top1": 100.0 * acc}, {"batch_stats": batch_stats})
