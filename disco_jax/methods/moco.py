"""MoCo-v2 (facebookresearch/moco with --mlp --moco-t 0.2 --aug-plus --cos): the teacher
pretraining recipe and the students' self-supervised baseline.

Query encoder f_q (trained) on view 1, momentum key encoder f_k (EMA of f_q, m=0.999, updated at
the start of each step from the current f_q, as in the official forward) on view 2; InfoNCE
with the key in column 0 and a queue of earlier keys; keys are enqueued after the loss.

BN (official: 8 GPUs x 32 images): the query encoder normalises over groups of
`loss.bn_group_size` (32) images, the key encoder runs in train mode with `loss.key_bn`
"shuffle" (official shuffle-BN: permute the key batch, BN per group, unshuffle) or "global"
(one group, the leakage-free setting shuffle-BN approximates); see `common.key_forward`.
`bn_group_size=0` normalises every forward over the global batch.
"""

from __future__ import annotations

from typing import Any

import jax

from disco_jax import losses, queue
from disco_jax.errors import ConfigError
from disco_jax.methods.common import (
    bn_knobs,
    check_bn_groups,
    check_key_bn,
    check_positive,
    momentum_keys,
    student_forward,
)

NEEDS_TEACHER = False
# main_moco.py with --mlp --moco-t 0.2 --aug-plus --cos, 8 GPUs x 32 images.
LOSS_DEFAULTS = {"temp": 0.2, "momentum": 0.999, "key_bn": "shuffle", **bn_knobs(32)}


def views(config: Any) -> int:
    return 2


def validate(config: Any) -> None:
    check_positive(config, "temp")
    if not 0.0 <= config.loss.momentum < 1.0:
        raise ConfigError(f"loss.momentum must be in [0, 1), got {config.loss.momentum}")
    queue.check_size(config.queue_size, config.batch_size)
    check_bn_groups(config)
    check_key_bn(config)


def init_extra(config: Any, rng: jax.Array, student_vars: dict, ctx: dict) -> dict:
    return {
        "queue": queue.init(rng, config.queue_size, config.student.embed_dim),
        # The key encoder starts as an exact copy of the query encoder.
        "ema": {"params": student_vars["params"], "batch_stats": student_vars["batch_stats"]},
    }


def loss_fn(params, state, batch, rng, teacher_vars, ctx):
    cfg = ctx["config"].loss
    rng_q, rng_k, rng_drop = jax.random.split(rng, 3)
    x_q = ctx["augment"](rng_q, batch["view1"])
    x_k = ctx["augment"](rng_k, batch["view2"])
    k_out, ema = momentum_keys(params, state["ema"], x_k, ctx, jax.random.fold_in(rng_drop, 1))
    k = k_out["embedding"]
    q_out, batch_stats = student_forward(params, state, x_q, ctx, rng=rng_drop)
    loss = losses.moco_loss(q_out["embedding"], k, state["queue"]["feats"], cfg.temp)
    updates = {
        "batch_stats": batch_stats,
        "queue": queue.enqueue(state["queue"], losses.l2_normalize(k)),
        "ema": ema,
    }
    return loss, ({}, updates)
