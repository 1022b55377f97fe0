"""SEED (Fang et al., ICLR 2021): the student mimics a frozen SSL teacher's similarity
distribution over a queue of teacher embeddings (jacobswan1/SEED `seed/builder.py`).

One augmented view per image goes to both networks (the identical tensor). The teacher runs
with BN in inference mode. After the loss, the all-gathered teacher embeddings are enqueued
(global FIFO). Defaults: K=65536, student temperature 0.2, teacher temperature 1e-4.

Small-patch variant (`main_small-patch.py` + `seed/small_patch_builder.py`, SwAV teachers):
`loss.small_crops=6` adds `loss.small_size` (96) px crops of scale `loss.small_scale`
((0.05, 0.14)). The student runs on the N*n crops in a second forward (its BN statistics are
those of the crops; running statistics updated after the main forward's), the teacher too, and
a second SEED loss over those N*n rows (batch mean) with its own queue `queue_small` is simply
added. Only crop 0 of each image is enqueued there, at the same pointer as the main queue.
"""

from __future__ import annotations

from typing import Any

import jax

from disco_jax import losses, queue
from disco_jax.errors import ConfigError
from disco_jax.methods.common import (
    bn_knobs,
    check_bn_groups,
    check_positive,
    frozen_forward,
    student_forward,
)

NEEDS_TEACHER = True
# seed/builder.py + main.py; the small-patch variant's crops (main_small-patch.py); per-GPU BN
# over 32 images (8 GPUs x 32).
LOSS_DEFAULTS = {
    "student_temp": 0.2,
    "teacher_temp": 1e-4,
    "small_crops": 0,
    "small_size": 96,
    "small_scale": (0.05, 0.14),
    **bn_knobs(32),
}


def views(config: Any) -> int:
    return 1


def _small_crops(config: Any) -> int:
    return int(config.loss.small_crops)


def data_options(config: Any) -> dict:
    if not _small_crops(config):
        return {}
    return {"small_crops": _small_crops(config), "small_size": int(config.loss.small_size),
            "small_scale": tuple(config.loss.small_scale)}


def validate(config: Any) -> None:
    check_positive(config, "student_temp", "teacher_temp")
    queue.check_size(config.queue_size, config.batch_size)
    check_bn_groups(config)
    if _small_crops(config) < 0:
        raise ConfigError(f"loss.small_crops must be >= 0 (0: off), got {_small_crops(config)}")
    if _small_crops(config):
        lo, hi = config.loss.small_scale
        if config.loss.small_size <= 0 or not 0 < lo <= hi <= 1:
            raise ConfigError(
                "loss.small_size must be > 0 and loss.small_scale (min, max) within (0, 1];"
                f" got {config.loss.small_size}, {(lo, hi)}"
            )


def init_extra(config: Any, rng: jax.Array, student_vars: dict, ctx: dict) -> dict:
    extra = {"queue": queue.init(rng, config.queue_size, config.teacher.embed_dim)}
    if _small_crops(config):
        extra["queue_small"] = queue.init(
            jax.random.fold_in(rng, 1), config.queue_size, config.teacher.embed_dim)
    return extra


def loss_fn(params, state, batch, rng, teacher_vars, ctx):
    cfg = ctx["config"].loss
    rng_aug, rng_drop = jax.random.split(rng)
    images = ctx["augment"](rng_aug, batch["image"])
    t = frozen_forward(ctx["teacher"], teacher_vars, images)["embedding"]
    s, batch_stats = student_forward(params, state, images, ctx, rng=rng_drop)
    loss = losses.seed_loss(
        s["embedding"], t, state["queue"]["feats"], cfg.student_temp, cfg.teacher_temp
    )
    updates = {"batch_stats": batch_stats,
               "queue": queue.enqueue(state["queue"], losses.l2_normalize(t))}
    metrics = {}
    if _small_crops(ctx["config"]):
        crops = batch["crops"]
        n, m = crops.shape[:2]
        small = crops.reshape(n * m, *crops.shape[2:])  # image-major, like torch's view(-1)
        small = ctx["augment"](jax.random.fold_in(rng_aug, 1), small)
        t_small = frozen_forward(ctx["teacher"], teacher_vars, small)["embedding"]
        s_small, batch_stats = student_forward(params, state, small, ctx,
                                               rng=jax.random.fold_in(rng_drop, 1),
                                               batch_stats=batch_stats)
        loss_small = losses.seed_loss(s_small["embedding"], t_small,
                                      state["queue_small"]["feats"], cfg.student_temp,
                                      cfg.teacher_temp)
        metrics = {"seed_main": loss, "seed_small": loss_small}
        loss = loss + loss_small
        crop0 = t_small.reshape(n, m, -1)[:, 0]
        updates["batch_stats"] = batch_stats
        updates["queue_small"] = queue.enqueue(state["queue_small"], losses.l2_normalize(crop0))
    return loss, (metrics, updates)
