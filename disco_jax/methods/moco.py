"""MoCo-v2 (facebookresearch/moco with --mlp --moco-t 0.2 --aug-plus --cos): the teacher
pretraining recipe and the students' self-supervised baseline.

Query encoder f_q (trained) on view 1, momentum key encoder f_k (EMA of f_q, m=0.999, updated at
the start of each step from the current f_q, as in the official forward) on view 2; InfoNCE
with the key in column 0 and a queue of earlier keys; keys are enqueued after the loss.

BN: the key encoder runs in train mode. `loss.key_bn="global"` (default): under jit its
statistics are global-batch, the leakage-free setting shuffle-BN approximates.
`loss.key_bn="shuffle"`: the official shuffle-BN (permute the key batch, per-device BN over
`loss.bn_groups` groups, 0 = one per device, unshuffle); see `common.key_forward`.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from disco_jax import losses, queue
from disco_jax.errors import ConfigError
from disco_jax.methods.common import (
    KEY_BN_MODES,
    check_bn_groups,
    check_choice,
    check_positive,
    key_forward,
    student_forward,
)

NEEDS_TEACHER = False


def views(config: Any) -> int:
    return 2


def validate(config: Any) -> None:
    check_positive(config, "temp")
    if not 0.0 <= config.loss.momentum < 1.0:
        raise ConfigError(f"loss.momentum must be in [0, 1), got {config.loss.momentum}")
    queue.check_size(config.queue_size, config.batch_size)
    check_choice(config, "key_bn", KEY_BN_MODES, "global")
    check_bn_groups(config)


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
    # Momentum update before the forward, from the parameters as they are at this step.
    ema_params = optax.incremental_update(
        jax.lax.stop_gradient(params), state["ema"]["params"], step_size=1.0 - cfg.momentum
    )
    k_out, k_stats = key_forward(
        ctx["student"], {"params": ema_params, "batch_stats": state["ema"]["batch_stats"]}, x_k,
        ctx, jax.random.fold_in(rng_drop, 1), mode=cfg.get("key_bn", "global"),
    )
    k = k_out["embedding"]
    q_out, batch_stats = student_forward(params, state, x_q, ctx, rng=rng_drop)
    loss = losses.moco_loss(q_out["embedding"], k, state["queue"]["feats"], cfg.temp)
    updates = {
        "batch_stats": batch_stats,
        "queue": queue.enqueue(state["queue"], losses.l2_normalize(k)),
        "ema": {"params": ema_params, "batch_stats": k_stats},
    }
    return loss, ({}, updates)
