"""L-MCL: layer-wise mutual contrastive learning (TPAMI-23 "Online Knowledge Distillation via
Mutual Contrastive Learning for Visual Recognition", winycg/L-MCL; methods.md §4.4).

The student is an `LMCLCohort` (disco_jax/models/lmcl.py) of `loss.num_nets` peers, each a
classifying ResNet with auxiliary branches after every stage but the last, so S stages (3 on
CIFAR ResNets, 4 on torchvision ResNets) of features f_ik, logits and `mcl_embed` embeddings
z_ik per network i, plus the logit ``aggregator``. One step (``main_layer_mcl_*_meta.py``):

- CE on every stage's logits and on each network's aggregated logits, plus the logit KD
  sum_i sum_j KL_T(final logits_i <- aggregated_j, detached), T = kd_temp;
- the MCL terms for every ordered stage pair (i, k, j, z), i != j (`losses.lmcl_losses`,
  in-batch, CIFAR; `losses.lmcl_bank_losses`, memory bank, ImageNet), each anchor's term
  weighted by w = sigmoid(cos(P_ik f_ik, P_jz f_jz)) from the `LossWeightNet` (detached here);
  total = CE + KD + alpha VCL + gamma SoftVCL + beta ICL + lam SoftICL;
- every `loss.meta_freq` steps of an epoch (official: after the update of batch b with
  b % meta_freq == 0) the weight network takes one SGD step (Nesterov, the run's lr, momentum
  and weight decay) on the hypergradient of the official ``MetaSGD`` look-ahead
  (`meta_hypergrad`): from the current parameters (all but the aggregator), `meta_steps` SGD
  steps (momentum from zero) on the weighted MCL loss and one on the stage CE, then the CE of
  every stage, back-propagated through those steps. The parameters are then rolled back (the
  look-ahead leaves no trace). Here it runs at the start of the next step, from exactly the
  parameters the official code starts from, on that step's batch (official: the same batch
  as the update just done), and that step already uses the new weights, as the official
  next step does.

Knobs (`config.loss`, official defaults = the CIFAR script; the ImageNet recipe overrides):
`form` ("in_batch" / "memory_bank"), `num_nets`, `tau`, `kd_temp`, `alpha`, `gamma`, `beta`,
`lam`, `meta_freq` (0: no meta step, the weight network stays at its initialisation),
`meta_steps` (``--times``), `meta_adjoint` ("official": ``MetaSGD.meta_backward``'s adjoint
recursion, which adds the momentum adjoint to the parameter adjoint where the chain rule has
weight_decay times it; "exact": the true gradient of the unrolled steps), `per_class`
(in_batch: MPerClassSampler m), `pos_k`, `neg_k`, `bank_momentum` (memory_bank: banks of the
last stage's embeddings, own row updated after the loss), `vcl_bank` (memory_bank: "first",
the official code's VCL of b against network i's bank, or "own"), `eval_heads` ("all": the
`classifier` evaluator sees every (network, stage) head, ``net{i*S+s}``, and reports the best,
as the official test's max over networks and stages; "final": the networks' own classifiers
only), `bn_group_size` (0: global-batch BN, the one-GPU CIFAR runs).

kNN, probes and the export use network 0 as a plain encoder (backbone + last-stage head).
Not reproduced: the official meta step's side effects after its rollback (its last recompute
updates the BN running statistics and, on ImageNet, the bank rows once more); the ImageNet
script's look-ahead per DDP process on its half batch (one look-ahead on the global batch
here); its positive draw, which may pick the anchor's own row (MCL's sampler skips it, ~1 in
1300 on ImageNet); CIFAR's best-epoch selection on the test set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from disco_jax import losses, optim
from disco_jax.errors import ConfigError
from disco_jax.methods import mcl
from disco_jax.methods.common import (
    bn_groups,
    check_bn_groups,
    check_choice,
    check_positive,
    student_forward,
    train_forward,
)
from disco_jax.models import build_encoder
from disco_jax.models.lmcl import LossWeightNet, aux_plan, build_lmcl_cohort, plain_variables

NEEDS_TEACHER = False
FORMS = ("in_batch", "memory_bank")
TERMS = mcl.TERMS
# main_layer_mcl_cifar_meta.py (the ImageNet script: alpha = beta = 0.01, tau 0.07,
# meta_freq 500, memory bank; configs/lmcl_r34x2.py).
LOSS_DEFAULTS: dict[str, Any] = {
    **mcl.COHORT_DEFAULTS,
    "meta_freq": 50,
    "meta_steps": 2,
    "meta_adjoint": "official",
    "vcl_bank": "first",
    "eval_heads": "all",
}


def data_options(config: Any) -> dict:
    return mcl.data_options(config)  # in_batch: the class sampler; memory_bank: row indices


def _check_int(config: Any, name: str, low: int) -> None:
    value = config.loss[name]
    if not isinstance(value, int) or value < low:
        raise ConfigError(f"loss.{name} must be an integer >= {low}, got {value!r}")


def validate(config: Any) -> None:
    cfg = config.loss
    check_choice(config, "form", FORMS)
    _check_int(config, "num_nets", 2)
    _check_int(config, "meta_freq", 0)
    _check_int(config, "meta_steps", 1)
    check_choice(config, "meta_adjoint", ("official", "exact"))
    check_choice(config, "vcl_bank", ("first", "own"))
    check_choice(config, "eval_heads", ("all", "final"))
    check_bn_groups(config)
    check_positive(config, "tau", "kd_temp")
    for name, _ in TERMS:
        if cfg[name] < 0:
            raise ConfigError(f"loss.{name} must be >= 0, got {cfg[name]}")
    aux_plan(build_encoder(config.student).backbone)  # a ResNet the branches can copy
    mcl.check_labels(config)
    if cfg.form == "in_batch":
        return
    _check_int(config, "pos_k", 1)
    _check_int(config, "neg_k", 1)
    if not 0.0 <= cfg.bank_momentum < 1.0:
        raise ConfigError(f"loss.bank_momentum must be in [0, 1), got {cfg.bank_momentum}")


def build_student(config: Any, dtype: Any) -> Any:
    return build_lmcl_cohort(config.student, config.loss.num_nets, dtype)


# ------------------------------------------------------------------------------ train state


def host_init(config: Any, ctx: dict) -> dict:
    return mcl.host_init(config, ctx)  # memory_bank: the class table of the train labels


def _weight_net(config: Any, num_stages: int) -> LossWeightNet:
    return LossWeightNet(config.loss.num_nets, num_stages)


def init_extra(config: Any, rng: jax.Array, student_vars: dict, ctx: dict) -> dict:
    """`loss_weight_net` {params, momentum} (its own optimizer's state); memory_bank: MCL's
    per-network banks `queue_bank{i}` and `bank_lookup`."""
    r_w, r_bank = jax.random.split(rng)
    size = config.data.image_size
    shapes = jax.eval_shape(
        lambda v: ctx["student"].apply(v, jnp.zeros((1, size, size, 3), jnp.float32)),
        student_vars)
    feats = shapes["stage_features"]  # (M, S, 1, d)
    params = _weight_net(config, feats.shape[1]).init(
        r_w, jnp.zeros(feats.shape, jnp.float32))["params"]
    out = {"loss_weight_net": {"params": params,
                               "momentum": jax.tree_util.tree_map(jnp.zeros_like, params)}}
    if config.loss.form == "memory_bank":
        out |= mcl.init_extra(config, r_bank, student_vars, ctx)
    return out


# ------------------------------------------------------------------------------ meta step


def meta_hypergrad(inner: Callable, outer: Callable, theta: Any, lam: Any, *, lr: jax.Array,
                   momentum: float, weight_decay: float, steps: int,
                   adjoint: str = "official") -> Any:
    """d outer / d lam through `steps` SGD steps on `inner(theta, lam)` and one on
    `outer(theta, lam)` (winycg/L-MCL ``losses/meta_optimizers.py: MetaSGD``).

    Forward, from momentum 0 (torch SGD, no Nesterov): v <- mu v + g + wd theta, theta <-
    theta - lr v. Backward from a0 = grad outer(theta_T), a1 = 0, for each step t in reverse
    with c = a1 - lr a0: lam_grad += (d g_t / d lam)^T c, and
    a0 <- (1 - lr wd) a0 + A + (d g_t / d theta)^T c, a1 <- mu c, where A = a1 for
    `adjoint="official"` (``meta_backward``) and wd a1 for "exact" (the chain rule, as
    d v_{t+1} / d theta_t = H + wd I). The gradients g_t are recomputed at the saved theta_t,
    as the official code restores each state and re-runs the objective; the repeated inner
    steps are one `lax.scan` each way, so the network's second-order graph is compiled once.
    """
    tm = jax.tree_util.tree_map
    scale = 1.0 if adjoint == "official" else weight_decay

    def sgd(th, v, g):
        v = tm(lambda v_, g_, p: momentum * v_ + g_ + weight_decay * p, v, g, th)
        return tm(lambda p, v_: p - lr * v_, th, v), v

    def forward(carry, _):
        th, v = carry
        return sgd(th, v, jax.grad(inner)(th, lam)), th  # theta_t saved for the reverse pass

    (th_outer, v), inner_thetas = jax.lax.scan(forward, (theta, tm(jnp.zeros_like, theta)),
                                               None, length=steps)
    th_final, _ = sgd(th_outer, v, jax.grad(outer)(th_outer, lam))

    def back(carry, obj, th_t):
        a0, a1, lam_grad = carry
        c = tm(lambda x0, x1: x1 - lr * x0, a0, a1)
        hc, lc = jax.vjp(jax.grad(obj), th_t, lam)[1](c)
        a0 = tm(lambda x0, x1, h: (1.0 - lr * weight_decay) * x0 + scale * x1 + h, a0, a1, hc)
        return a0, tm(lambda x: momentum * x, c), tm(jnp.add, lam_grad, lc)

    a0 = jax.grad(outer)(th_final, lam)
    carry = back((a0, tm(jnp.zeros_like, a0), tm(jnp.zeros_like, lam)), outer, th_outer)
    carry, _ = jax.lax.scan(lambda cr, th_t: (back(cr, inner, th_t), None), carry,
                            inner_thetas, reverse=True)
    return carry[2]


def nesterov_sgd(state: dict, grad: Any, lr: jax.Array, momentum: float,
                 weight_decay: float) -> dict:
    """torch.optim.SGD(nesterov=True, weight_decay) on {params, momentum} (the weight network's
    ``weight_optimizer``): d = g + wd p, buf = mu buf + d, p -= lr (d + mu buf)."""
    tm = jax.tree_util.tree_map
    d = tm(lambda g, p: g + weight_decay * p, grad, state["params"])
    buf = tm(lambda b, d_: momentum * b + d_, state["momentum"], d)
    params = tm(lambda p, d_, b: p - lr * (d_ + momentum * b), state["params"], d, buf)
    return {"params": params, "momentum": buf}


def _schedule(ctx: dict) -> optim.Schedule:
    """The run's lr schedule (the official meta and weight optimizers follow the main lr)."""
    config = ctx["config"]
    return optim.lr_schedule(global_batch=config.batch_size,
                             steps_per_epoch=ctx["steps_per_epoch"],
                             total_steps=ctx["total_steps"],
                             **optim.schedule_options(config.optimizer))


def meta_due(step: jax.Array, steps_per_epoch: int, freq: int) -> jax.Array:
    """Whether this step starts with the meta step: the previous step's batch index within its
    epoch is a multiple of `freq` (official ``batch_idx % meta_freq == 0``, after the update)."""
    prev = step - 1
    return (step >= 1) & ((prev % steps_per_epoch) % freq == 0)


def _meta_update(params, state, x, labels, contrast, wstate, ctx, rng) -> dict:
    config = ctx["config"]
    cfg, opt = config.loss, config.optimizer
    lr = _schedule(ctx)(state["step"] - 1)  # the lr of the update the official meta follows
    frozen = jax.lax.stop_gradient(params)
    theta = {k: v for k, v in frozen.items() if k != "aggregator"}  # MetaSGD's parameters

    def forward(th):
        variables = {"params": {**th, "aggregator": frozen["aggregator"]},
                     "batch_stats": state["batch_stats"]}
        return train_forward(ctx["student"], variables, x, bn_groups(ctx), rng)[0]

    def inner(th, lam):
        out = forward(th)
        w = _weight_net(config, out["stage_features"].shape[1]).apply(
            {"params": lam}, out["stage_features"])
        return _weighted(cfg, _mcl_terms(cfg, out["stage_embedding"], labels, w, contrast))

    def outer(th, lam):
        return _stage_ce(forward(th)["stage_logits"], labels)

    grad = meta_hypergrad(inner, outer, theta, wstate["params"], lr=lr,
                          momentum=opt.momentum, weight_decay=opt.weight_decay,
                          steps=cfg.meta_steps, adjoint=cfg.meta_adjoint)
    return nesterov_sgd(wstate, grad, lr, opt.momentum, opt.weight_decay)


# ------------------------------------------------------------------------------ losses


def _weighted(cfg: Any, terms: dict) -> jax.Array:
    return sum(cfg[w] * terms[t] for w, t in TERMS)


def _mcl_terms(cfg: Any, embeddings, labels, weights, contrast) -> dict:
    if cfg.form == "in_batch":
        return losses.lmcl_losses(embeddings, labels, weights, cfg.tau, cfg.kd_temp)
    return losses.lmcl_bank_losses(embeddings, contrast, weights, cfg.tau, cfg.kd_temp,
                                   cfg.pos_k, cfg.vcl_bank)


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()


def _stage_ce(stage_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """sum over networks and stages of CE (the meta step's outer objective)."""
    m, s = stage_logits.shape[:2]
    return sum(_ce(stage_logits[i, k], labels) for i in range(m) for k in range(s))


def loss_fn(params, state, batch, rng, teacher_vars, ctx):
    config = ctx["config"]
    cfg = config.loss
    m = cfg.num_nets
    r_aug, r_drop, r_idx = jax.random.split(rng, 3)
    x = ctx["augment"](r_aug, batch["image"])
    labels = batch["label"].astype(jnp.int32)
    contrast, banks = None, []
    if cfg.form == "memory_bank":
        index = batch["index"].astype(jnp.int32)
        idx = mcl._sample_bank_indices(r_idx, state["bank_lookup"], index, labels, cfg.pos_k,
                                       cfg.neg_k)
        banks = [state[f"queue_bank{i}"]["feats"] for i in range(m)]
        contrast = jnp.stack([bank[idx] for bank in banks])
    wstate = state["loss_weight_net"]
    metrics = {}
    if cfg.meta_freq:
        due = meta_due(state["step"], ctx["steps_per_epoch"], cfg.meta_freq)
        wstate = jax.lax.cond(
            due, lambda w: _meta_update(params, state, x, labels, contrast, w, ctx, r_drop),
            lambda w: w, wstate)
        metrics["meta"] = due.astype(jnp.float32)

    out, batch_stats = student_forward(params, state, x, ctx, rng=r_drop)
    weights = jax.lax.stop_gradient(_weight_net(config, out["stage_features"].shape[1]).apply(
        {"params": wstate["params"]}, out["stage_features"]))  # official: torch.no_grad()
    terms = _mcl_terms(cfg, out["stage_embedding"], labels, weights, contrast)
    agg = out["agg_logits"]
    ce = _stage_ce(out["stage_logits"], labels)
    ce_agg = sum(_ce(agg[i], labels) for i in range(m))
    final = out["stage_logits"][:, -1]
    logit_kd = sum(losses.kl_div_t(final[i], agg[j], cfg.kd_temp)  # target detached
                   for i in range(m) for j in range(m))
    loss = ce + ce_agg + logit_kd + _weighted(cfg, terms)
    updates = {"batch_stats": batch_stats, "loss_weight_net": wstate}
    for i, bank in enumerate(banks):  # after the loss: the last stage's embeddings
        updates[f"queue_bank{i}"] = {"feats": losses.bank_update(
            bank, index, out["embedding"][i], cfg.bank_momentum)}
    metrics |= {"ce": ce, "ce_agg": ce_agg, "logit_kd": logit_kd, **terms,
                "pair_weight": jnp.mean(weights),
                "top1_net0": jnp.mean(jnp.argmax(final[0], -1) == labels) * 100.0}
    return loss, (metrics, updates)


# ------------------------------------------------------------------------------ eval / export


def eval_outputs(ctx: dict, variables: dict, images: jax.Array) -> dict:
    """Network 0's features, embedding and logits (kNN, probes, export) and `logits_nets`:
    every (network, stage) head, (M * S, N, C) network-major (`eval_heads="all"`), or the
    networks' own classifiers (M, N, C)."""
    out = ctx["student"].apply(variables, images, train=False)
    heads = out["logits"]
    if ctx["config"].loss.eval_heads == "all":
        heads = out["stage_logits"].reshape(-1, *out["stage_logits"].shape[2:])
    return {"features": out["features"], "embedding": out["embedding"][0],
            "logits": out["logits"][0], "logits_nets": heads}


def export(config: Any, variables: dict) -> tuple[dict, dict]:
    """Network 0 as a plain encoder (backbone with its classifier + last-stage head)."""
    from disco_jax.methods import encoder_manifest  # the registry imports this module

    return plain_variables(variables, 0), encoder_manifest(config.student)
