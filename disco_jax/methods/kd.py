"""Distillation baselines from a frozen teacher on one shared view (teacher BN in eval mode).

`loss.kind`:
- "logits": Hinton KD on class logits, T^2 * KL(softmax(t/T) || softmax(s/T)) at
  `loss.temp`; student and teacher need `num_classes` > 0 (their classifiers). With
  `loss.ce_weight` > 0 it adds ce_weight * CE(student logits, batch["label"]).
- "l2": label-free regression of the teacher's raw embedding by the student's projected
  embedding, mean_n ||s - t||^2 (`losses.embedding_l2_loss`).
- "cosine": label-free, mean_n (1 - cos(s, t)) (`losses.cosine_loss`); equals half the
  unit-vector MSE that DisCo uses, without DisCo's contrastive term.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from disco_jax import losses
from disco_jax.errors import ConfigError
from disco_jax.methods.common import (
    bn_knobs,
    check_bn_groups,
    check_choice,
    check_positive,
    frozen_forward,
    student_forward,
)

NEEDS_TEACHER = True
KINDS = ("logits", "l2", "cosine")
# Hinton et al.'s T = 4 as in most KD baselines; student BN per 32 images like the SEED /
# DisCo runs it is compared with.
LOSS_DEFAULTS = {"kind": "logits", "temp": 4.0, "ce_weight": 0.0, **bn_knobs(32)}


def views(config: Any) -> int:
    return 1


def validate(config: Any) -> None:
    kind = check_choice(config, "kind", KINDS)
    check_bn_groups(config)
    if kind == "logits":
        check_positive(config, "temp")
        for net in ("student", "teacher"):
            if not config[net].get("num_classes", 0) > 0:
                raise ConfigError(
                    f'loss.kind="logits" needs {net}.num_classes > 0 (its classifier); got'
                    f" {config[net].get('num_classes', 0)}"
                )
        if config.student.num_classes != config.teacher.num_classes:
            raise ConfigError(
                f"student.num_classes={config.student.num_classes} must equal"
                f" teacher.num_classes={config.teacher.num_classes} for logit KD"
            )
        if config.loss.ce_weight < 0:
            raise ConfigError(f"loss.ce_weight must be >= 0, got {config.loss.ce_weight}")
    elif config.student.embed_dim != config.teacher.embed_dim:
        raise ConfigError(
            f"student.embed_dim={config.student.embed_dim} must equal teacher.embed_dim="
            f"{config.teacher.embed_dim} for embedding distillation"
        )


def loss_fn(params, state, batch, rng, teacher_vars, ctx):
    cfg = ctx["config"].loss
    rng_aug, rng_drop = jax.random.split(rng)
    images = ctx["augment"](rng_aug, batch["image"])
    t = frozen_forward(ctx["teacher"], teacher_vars, images)
    s, batch_stats = student_forward(params, state, images, ctx, rng=rng_drop)
    kind = cfg.kind
    metrics = {}
    if kind == "logits":
        loss = losses.kd_loss(s["logits"], t["logits"], cfg.temp)
        metrics["kd"] = loss
        if cfg.ce_weight > 0:
            ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
                s["logits"].astype(jnp.float32), batch["label"]))
            metrics["ce"] = ce
            loss = loss + cfg.ce_weight * ce
    elif kind == "l2":
        loss = losses.embedding_l2_loss(s["embedding"], t["embedding"])
    else:
        loss = losses.cosine_loss(s["embedding"], t["embedding"])
    return loss, (metrics, {"batch_stats": batch_stats})
