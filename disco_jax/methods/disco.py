"""DisCo (Gao et al., ECCV 2022): the student's own MoCo-v2 plus embedding consistency with a
frozen teacher on both views (Yuting-Gao/DisCo-pytorch `builder_kq_mse_largeembedding_2048.py`).

Student query encoder f_q on both views (q = f_q(x_q), qk = f_q(x_k), both with gradient; the
BN running statistics are updated twice, in that order, as the official two forwards do);
momentum key encoder f_k (EMA, m=0.999, updated before the forward) on x_k; a queue of student
keys (K=65536, tau 0.2). Loss = InfoNCE + distill_weight * (||t_q - q||^2 + ||t_k - qk||^2) on
unit vectors (`losses.disco_loss`). Student head d -> head_hidden (2048) -> 128, no BN.

Options (`config.loss`):
- `bn_group_size`: images per BN group in every train-mode forward (official: 32, each of the 8
  GPUs' share; 0 = the global batch).
- `teacher_bn`: "train" (official: `model.train()` leaves the teacher on batch statistics, per
  BN group; they are not stored) or "eval" (running statistics).
- `key_bn`: "shuffle" (official MoCo shuffle-BN, `common.key_forward`) or "global".
- `distill_reduction` "sum" (official) or "mean", and `distill_weight`: see config_lib.disco_recipe
  for how to reproduce the official per-GPU sum on a global batch.
"""

from __future__ import annotations

from typing import Any

import jax

from disco_jax import losses, queue
from disco_jax.errors import ConfigError
from disco_jax.methods.common import (
    TEACHER_BN_MODES,
    bn_knobs,
    check_bn_groups,
    check_choice,
    check_key_bn,
    check_positive,
    momentum_keys,
    student_forward,
    teacher_forward,
)

NEEDS_TEACHER = True
# DisCo-pytorch main.py / builder_kq_mse_largeembedding_2048.py on 8 GPUs x 32 images.
LOSS_DEFAULTS = {
    "temp": 0.2,
    "momentum": 0.999,
    # The official loss is a per-GPU sum; averaged over 8 GPUs it is 1/8 of our global-batch
    # sum at 8 x 32 (see config_lib.disco_recipe).
    "distill_weight": 1.0 / 8,
    "distill_reduction": "sum",
    "teacher_bn": "train",
    "key_bn": "shuffle",
    **bn_knobs(32),
}


def views(config: Any) -> int:
    return 2


def validate(config: Any) -> None:
    check_positive(config, "temp")
    if not 0.0 <= config.loss.momentum < 1.0:
        raise ConfigError(f"loss.momentum must be in [0, 1), got {config.loss.momentum}")
    if config.loss.distill_weight < 0:
        raise ConfigError(f"loss.distill_weight must be >= 0, got {config.loss.distill_weight}")
    check_choice(config, "distill_reduction", ("sum", "mean"))
    check_choice(config, "teacher_bn", TEACHER_BN_MODES)
    check_bn_groups(config)
    check_key_bn(config)
    if config.student.embed_dim != config.teacher.embed_dim:
        raise ConfigError(
            f"student.embed_dim={config.student.embed_dim} must equal teacher.embed_dim="
            f"{config.teacher.embed_dim} (DisCo matches the embeddings directly)"
        )
    queue.check_size(config.queue_size, config.batch_size)


def init_extra(config: Any, rng: jax.Array, student_vars: dict, ctx: dict) -> dict:
    return {
        "queue": queue.init(rng, config.queue_size, config.student.embed_dim),
        "ema": {"params": student_vars["params"], "batch_stats": student_vars["batch_stats"]},
    }


def loss_fn(params, state, batch, rng, teacher_vars, ctx):
    cfg = ctx["config"].loss
    rng_q, rng_k, rng_drop, rng_t = jax.random.split(rng, 4)
    x_q = ctx["augment"](rng_q, batch["view1"])
    x_k = ctx["augment"](rng_k, batch["view2"])
    k_out, ema = momentum_keys(params, state["ema"], x_k, ctx, jax.random.fold_in(rng_drop, 1))
    q_out, batch_stats = student_forward(params, state, x_q, ctx, rng=rng_drop)
    qk_out, batch_stats = student_forward(params, state, x_k, ctx,
                                          rng=jax.random.fold_in(rng_drop, 2),
                                          batch_stats=batch_stats)
    t_q = teacher_forward(ctx["teacher"], teacher_vars, x_q, ctx, rng_t, cfg.teacher_bn)
    t_k = teacher_forward(ctx["teacher"], teacher_vars, x_k, ctx,
                          jax.random.fold_in(rng_t, 1), cfg.teacher_bn)
    k = k_out["embedding"]
    out = losses.disco_loss(
        q_out["embedding"], k, state["queue"]["feats"], qk_out["embedding"],
        t_q["embedding"], t_k["embedding"], temp=cfg.temp, distill_weight=cfg.distill_weight,
        distill_reduction=cfg.distill_reduction,
    )
    metrics = {name: out[name] for name in ("contrastive", "distill_q", "distill_k")}
    updates = {
        "batch_stats": batch_stats,
        "queue": queue.enqueue(state["queue"], losses.l2_normalize(k)),
        "ema": ema,
    }
    return out["total"], (metrics, updates)
