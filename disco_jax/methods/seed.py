"""SEED (Fang et al., ICLR 2021): the student mimics a frozen SSL teacher's similarity
distribution over a queue of teacher embeddings (jacobswan1/SEED `seed/builder.py`).

One augmented view per image goes to both networks (the identical tensor). The teacher runs
with BN in inference mode. After the loss, the all-gathered teacher embeddings are enqueued
(global FIFO). Defaults: K=65536, student temperature 0.2, teacher temperature 1e-4.
"""

from __future__ import annotations

from typing import Any

import jax

from disco_jax import losses, queue
from disco_jax.methods.common import check_positive, frozen_forward, student_forward

NEEDS_TEACHER = True


def views(config: Any) -> int:
    return 1


def validate(config: Any) -> None:
    check_positive(config, "student_temp", "teacher_temp")
    queue.check_size(config.queue_size, config.batch_size)


def init_extra(config: Any, rng: jax.Array, student_vars: dict, ctx: dict) -> dict:
    return {"queue": queue.init(rng, config.queue_size, config.teacher.embed_dim)}


def loss_fn(params, state, batch, rng, teacher_vars, ctx):
    cfg = ctx["config"].loss
    rng_aug, rng_drop = jax.random.split(rng)
    images = ctx["augment"](rng_aug, batch["image"])
    t = frozen_forward(ctx["teacher"], teacher_vars, images)["embedding"]
    s, batch_stats = student_forward(params, state, images, ctx, rng=rng_drop)
    loss = losses.seed_loss(
        s["embedding"], t, state["queue"]["feats"], cfg.student_temp, cfg.teacher_temp
    )
    new_queue = queue.enqueue(state["queue"], losses.l2_normalize(t))
    return loss, ({}, {"batch_stats": batch_stats, "queue": new_queue})
