"""BYOL (Grill et al. 2020; deepmind-research/byol): an online encoder + predictor regresses
the EMA target encoder's projection of the other view.

Online network: the `config.student` encoder (backbone + projector, BYOL's "mlp_bn" 4096 ->
256) plus a predictor of the same shape (`loss.pred_hidden`, output = student.embed_dim),
both trained. Target network: the EMA of the online encoder, in the train state as `ema`
(initialised as a copy), with BN in train mode (batch statistics) as the official target
forward. Loss: 2 - 2 cos(q(z1), z'2) + 2 - 2 cos(q(z2), z'1), each a batch mean (official).
tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 over the K training steps (tau_base 0.996).
The EMA averages in the online parameters as they are at the start of step k (computed inside
the differentiated function, as moco_v2 here): at most a one-step lag against averaging after
the optimizer step.

Evaluation and the exported encoder are the online backbone + projector (no predictor).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from disco_jax import losses, models
from disco_jax.errors import ConfigError
from disco_jax.methods.common import (
    bn_groups,
    bn_knobs,
    check_bn_groups,
    student_forward,
    train_forward,
)

NEEDS_TEACHER = False
# deepmind-research/byol configs/byol.py: base_target_ema (the 1000-epoch preset; 300 epochs
# use 0.99), predictor_hidden_size; BN over the global batch (`cross_replica_axis`).
LOSS_DEFAULTS: dict[str, Any] = {
    "tau_base": 0.996,
    "pred_hidden": 4096,
    **bn_knobs(0),
}


class OnlineNet(nn.Module):
    """The online encoder and the predictor; params `{"encoder": ..., "predictor": ...}`."""

    encoder: nn.Module
    predictor: nn.Module

    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        out = self.encoder(x, train=train)
        return {**out, "prediction": self.predictor(out["embedding"], train=train)}


def views(config: Any) -> int:
    return 2


def validate(config: Any) -> None:
    tau = config.loss.tau_base
    if not 0.0 <= tau <= 1.0:
        raise ConfigError(f"loss.tau_base must be in [0, 1], got {tau}")
    if int(config.loss.pred_hidden) <= 0:
        raise ConfigError("loss.pred_hidden must be a positive width (BYOL: 4096)")
    check_bn_groups(config)


def build_student(config: Any, dtype: Any) -> nn.Module:
    predictor = models.create_head("mlp_bn", out_dim=config.student.embed_dim,
                                   hidden_dim=int(config.loss.pred_hidden), dtype=dtype)
    return OnlineNet(encoder=models.build_encoder(config.student, dtype), predictor=predictor)


def init_extra(config: Any, rng: jax.Array, student_vars: dict, ctx: dict) -> dict:
    # The target starts as an exact copy of the online encoder (no predictor).
    return {"ema": {k: student_vars[k]["encoder"] for k in ("params", "batch_stats")}}


def tau_at(step: jax.Array, total_steps: int, tau_base: float) -> jax.Array:
    """BYOL's target decay: tau_base at step 0, cosine-increased to 1 at the last step."""
    progress = jnp.asarray(step, jnp.float32) / max(total_steps, 1)
    return 1.0 - (1.0 - tau_base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0


def loss_fn(params, state, batch, rng, teacher_vars, ctx):
    config = ctx["config"]
    rng_1, rng_2, rng_drop = jax.random.split(rng, 3)
    # BYOL's asymmetric views: view 2 takes `augment.view2`'s overrides (blur p 0.1 and
    # solarize p 0.2 against view 1's 1.0 and 0 in the recipe).
    views_ = (ctx["augment"](rng_1, batch["view1"], view=1),
              ctx["augment"](rng_2, batch["view2"], view=2))
    tau = tau_at(state["step"], ctx["total_steps"], config.loss.tau_base)
    ema_params = optax.incremental_update(
        jax.lax.stop_gradient(params["encoder"]), state["ema"]["params"], step_size=1.0 - tau
    )
    # Each view is its own forward (own BN batch), as the official `apply_once_fn` per view.
    # Target: train-mode BN (batch statistics); its running statistics are tracked so the
    # target could be exported too, but never enter the loss.
    t_stats, targets = state["ema"]["batch_stats"], []
    for i, x in enumerate(views_):
        t_out, t_stats = train_forward(
            ctx["student"].encoder, {"params": ema_params, "batch_stats": t_stats}, x,
            bn_groups(ctx), jax.random.fold_in(rng_drop, 10 + i),
        )
        targets.append(jax.lax.stop_gradient(t_out["embedding"]))
    batch_stats, preds = None, []
    for i, x in enumerate(views_):
        out, batch_stats = student_forward(params, state, x, ctx,
                                           rng=jax.random.fold_in(rng_drop, i),
                                           batch_stats=batch_stats)
        preds.append(out["prediction"])
    loss = losses.byol_loss(preds[0], targets[1]) + losses.byol_loss(preds[1], targets[0])
    updates = {"batch_stats": batch_stats, "ema": {"params": ema_params, "batch_stats": t_stats}}
    return loss, ({"tau": tau}, updates)


def export(config: Any, variables: dict) -> tuple[dict, dict]:
    """The online encoder (backbone + projector) alone, loadable as any encoder directory."""
    from disco_jax.methods import encoder_manifest  # here: the registry imports this module

    enc = {k: variables[k]["encoder"] for k in ("params", "batch_stats")}
    return enc, encoder_manifest(config.student)

