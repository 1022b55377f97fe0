"""SimCLR (Chen et al. 2020; google-research/simclr): NT-Xent between two views of each image.

Both views go through the one encoder (backbone + projection head, BN in train mode: under jit
its statistics are global-batch, what the official code gets with cross-replica BN); the loss
contrasts over the global batch (`losses.simclr_loss`: 2N - 2 negatives per anchor, the
official mean of the two directions' sum). Temperature `loss.temp` (0.1 for the paper's batch
4096, Table B.1 / appendix B.9). Use it with optimizer.name="lars" and
weight_decay_mask="kernels" (the official LARS skips BN parameters and biases).
"""

from __future__ import annotations

from typing import Any

import jax

from disco_jax import losses
from disco_jax.methods.common import bn_knobs, check_bn_groups, check_positive, student_forward

NEEDS_TEACHER = False
# google-research/simclr run.py: `temperature` flag default 0.1 (the paper's batch-4096
# choice); BN over the global batch (`global_bn=True`).
LOSS_DEFAULTS: dict[str, Any] = {
    "temp": 0.1,
    **bn_knobs(0),
}


def views(config: Any) -> int:
    return 2


def validate(config: Any) -> None:
    check_positive(config, "temp")
    check_bn_groups(config)


def loss_fn(params, state, batch, rng, teacher_vars, ctx):
    cfg = ctx["config"].loss
    rng_1, rng_2, rng_drop = jax.random.split(rng, 3)
    # SimCLR augments both views alike; `view=2` lets `augment.view2` override (empty by
    # default).
    x1 = ctx["augment"](rng_1, batch["view1"], view=1)
    x2 = ctx["augment"](rng_2, batch["view2"], view=2)
    # One forward over both views: BN statistics over all 2N images, as the official
    # tf.concat(features_list, 0) before the network.
    x = jax.numpy.concatenate([x1, x2], axis=0)
    out, batch_stats = student_forward(params, state, x, ctx, rng=rng_drop)
    z1, z2 = jax.numpy.split(out["embedding"], 2, axis=0)
    loss = losses.simclr_loss(z1, z2, cfg.temp)
    return loss, ({}, {"batch_stats": batch_stats})
