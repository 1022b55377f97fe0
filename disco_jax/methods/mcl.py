"""MCL: mutual contrastive learning of a cohort of M peers (winycg/MCL, methods.md §4).

The student is a `Cohort` of `loss.num_nets` encoders (params net_0 ... net_{M-1}), each with
its classifier and its own `mcl_embed` head, all on the same augmented batch. `loss.form`:

- "in_batch" (CIFAR, §4.1): SupCon-style VCL / ICL over the batch plus the soft KL terms;
  the input pipeline's class-balanced sampler gives `loss.per_class` (2) examples per class.
- "memory_bank" (ImageNet, §4.2): one (n_data, 128) bank per network in the train state
  (`queue_bank{m}`, rows sharded over devices), 1 own + `pos_k` same-class + `neg_k`
  other-class rows per anchor, momentum-0.5 update of the own row after the loss.
- "moco" (self-supervised, §4.3): per-network EMA key encoder and queue, two views, the
  unweighted sum of the four terms (set the weights to 1), no labels.

Supervised total: sum_m CE(logits_m, y) + alpha VCL + gamma SoftVCL + beta ICL + lam SoftICL
[+ `logit_distill`: KL_T from the cohort's mean logits, T = kd_temp; detached by default as in
the CIFAR code; M = 2 both nets, M > 2 the last net only].

`loss.shared_stem` (M >= 3, CIFAR / torchvision ResNets; the official ``ResNet_b`` cohorts):
one stem (conv1 + layer1 on CIFAR, conv1 ... layer2 on ImageNet ResNets) shared by M branches.

BN: `loss.bn_group_size` images per BN group (0, the default: the global batch, as the
one-GPU CIFAR runs; the ImageNet scripts' DataParallel BN is per GPU, their GPU count unstated);
the MoCo form's key encoders use `loss.key_bn` ("shuffle": MoCo's shuffle-BN over those groups,
its default there with groups of 32). kNN, probes and export use network 0 alone (a plain
encoder); the `classifier` evaluator reports every network's top-1/top-5 and the best one, as
the official code does (its CIFAR script also keeps the best epoch on the test set, which is
not reproduced).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from disco_jax import data, losses, queue
from disco_jax.errors import ConfigError
from disco_jax.methods.common import (
    bn_knobs,
    check_bn_groups,
    check_key_bn,
    check_positive,
    momentum_keys,
    student_forward,
)
from disco_jax.models.cohort import (
    build_cohort,
    plain_variables,
    shared_stem_stages,
)

NEEDS_TEACHER = False
FORMS = ("in_batch", "memory_bank", "moco")
TERMS = (("alpha", "vcl"), ("gamma", "soft_vcl"), ("beta", "icl"), ("lam", "soft_icl"))
# The knobs MCL and L-MCL share, with main_cifar.py's (in_batch) values.
COHORT_DEFAULTS: dict[str, Any] = {
    "form": "in_batch",
    "num_nets": 2,
    "tau": 0.1,
    "kd_temp": 3.0,
    # main_cifar.py / main_imagenet.py scripts: 0.1 / 1 / 0.1 / 1; MoCo: the plain sum.
    "alpha": 0.1,
    "gamma": 1.0,
    "beta": 0.1,
    "lam": 1.0,
    "per_class": 2,  # in_batch: MPerClassSampler(m=2)
    "pos_k": 1,  # memory_bank
    "neg_k": 8192,
    "bank_momentum": 0.5,
    **bn_knobs(0),
}
# The in_batch (CIFAR, main_cifar.py) defaults; `loss_config(form)` has each form's own.
LOSS_DEFAULTS: dict[str, Any] = {
    **COHORT_DEFAULTS,
    "logit_distill": False,
    "logit_distill_detach": True,  # CIFAR code; main_imagenet.py does not detach
    "shared_stem": False,  # M >= 3 ResNets: one shared stem (official for M >= 3)
    "momentum": 0.999,  # moco: key encoders
    "key_bn": "shuffle",  # moco: MoCo's shuffle-BN (needs bn_group_size > 0)
}
FORM_DEFAULTS: dict[str, dict[str, Any]] = {
    "in_batch": {},
    "memory_bank": {"tau": 0.07},
    # main_moco_mcl.py on MoCo's 8 GPUs x 32 images.
    "moco": {"tau": 0.07, "alpha": 1.0, "beta": 1.0, "bn_group_size": 32},
}


def views(config: Any) -> int:
    return 2 if config.loss.form == "moco" else 1


def data_options(config: Any) -> dict:
    form = config.loss.form
    if form == "in_batch":
        return {"per_class": int(config.loss.per_class)}
    return {"with_index": True} if form == "memory_bank" else {}


def validate(config: Any) -> None:
    cfg = config.loss
    if cfg.form not in FORMS:
        raise ConfigError(f"loss.form must be one of {', '.join(FORMS)}, got {cfg.form!r}")
    if not isinstance(cfg.num_nets, int) or cfg.num_nets < 2:
        raise ConfigError(f"loss.num_nets must be an integer >= 2, got {cfg.num_nets!r}")
    check_bn_groups(config)
    if cfg.shared_stem:
        if cfg.num_nets < 3:
            raise ConfigError(f"loss.shared_stem needs loss.num_nets >= 3 (the official code"
                              f" shares only for M >= 3), got {cfg.num_nets}; set it to False")
        if not shared_stem_stages(config.student):
            raise ConfigError(f"loss.shared_stem needs a CIFAR (resnet8/32/56/110) or torchvision"
                              f" ResNet student, got {config.student.model!r}; set it to False")
    check_positive(config, "tau", "kd_temp")
    for name, _ in TERMS:
        if cfg[name] < 0:
            raise ConfigError(f"loss.{name} must be >= 0, got {cfg[name]}")
    if cfg.form == "moco":
        if not 0.0 <= cfg.momentum < 1.0:
            raise ConfigError(f"loss.momentum must be in [0, 1), got {cfg.momentum}")
        queue.check_size(config.queue_size, config.batch_size)
        check_key_bn(config)
        return
    check_labels(config)
    if cfg.form != "in_batch":
        if cfg.pos_k < 1 or cfg.neg_k < 1:
            raise ConfigError(f"loss.pos_k and loss.neg_k must be >= 1, got {cfg.pos_k},"
                              f" {cfg.neg_k}")
        if not 0.0 <= cfg.bank_momentum < 1.0:
            raise ConfigError(f"loss.bank_momentum must be in [0, 1), got {cfg.bank_momentum}")


def check_labels(config: Any) -> None:
    """The supervised forms (MCL, L-MCL): a classifier over the data's classes; in_batch: a
    class-balanced batch of `loss.per_class` examples per class that the data can fill."""
    classes = data.get_source(config.data).num_classes
    if config.student.num_classes < classes:
        raise ConfigError(f"student.num_classes is {config.student.num_classes} but the data has"
                          f" {classes} classes; set student.num_classes={classes}")
    if config.loss.form == "in_batch":
        m = config.loss.per_class
        if not isinstance(m, int) or m < 2:
            raise ConfigError(f"loss.per_class must be an integer >= 2 (SupCon needs a"
                              f" positive in the batch), got {m!r}")
        if config.batch_size % m or config.batch_size // m > classes:
            raise ConfigError(f"batch_size {config.batch_size} must be a multiple of"
                              f" loss.per_class={m} and hold at most {classes} classes"
                              f" (<= {m * classes})")


def build_student(config: Any, dtype: Any) -> Any:
    return build_cohort(config.student, config.loss.num_nets, dtype,
                        shared_stem=bool(config.loss.shared_stem))


# ------------------------------------------------------------------------------ train state


def _bank_lookup(config: Any) -> dict[str, np.ndarray]:
    """Class-sorted example table of the train split, for O(1) same/other-class sampling."""
    source = data.get_source(config.data)
    split = config.data.train_split
    labels = np.fromiter(
        (ex["label"] for ex in source.dataset(split, decode=False).as_numpy_iterator()),
        np.int64, count=source.num_examples(split),
    )
    order = np.argsort(labels, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    count = np.bincount(labels, minlength=source.num_classes)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return {k: np.asarray(v, np.int32) for k, v in
            {"sorted": order, "rank": rank, "start": start, "count": count}.items()}


def host_init(config: Any, ctx: dict) -> dict:
    """memory_bank: the class table of every train label, read once on the host."""
    return {"bank_lookup": _bank_lookup(config)} if config.loss.form == "memory_bank" else {}


def init_extra(config: Any, rng: jax.Array, student_vars: dict, ctx: dict) -> dict:
    cfg, m = config.loss, config.loss.num_nets
    keys = jax.random.split(rng, m)
    dim = config.student.embed_dim
    if cfg.form == "memory_bank":
        lookup = ctx["host"]["bank_lookup"]
        n = lookup["sorted"].shape[0]
        # Rows padded to a multiple of the devices so the rows shard evenly; never sampled.
        n_dev = ctx["mesh"].devices.size
        rows = -(-n // n_dev) * n_dev
        s = 1.0 / np.sqrt(dim / 3.0)
        banks = {f"queue_bank{i}": {"feats": jax.random.uniform(
            keys[i], (rows, dim), jnp.float32, -s, s)} for i in range(m)}
        return {**banks, "bank_lookup": lookup}
    if cfg.form == "moco":
        queues = {f"queue_{i}": queue.init(keys[i], config.queue_size, dim) for i in range(m)}
        # Every key encoder starts as an exact copy of its query encoder.
        ema = {"params": student_vars["params"], "batch_stats": student_vars["batch_stats"]}
        return {**queues, "ema": ema}
    return {}


# ------------------------------------------------------------------------------ losses


def _logit_distill(logits: jax.Array, temp: float, detach: bool) -> jax.Array:
    """KL_T(net <- cohort mean logits): M = 2 both nets, M > 2 the last one (§4.1)."""
    mean = jnp.mean(logits, axis=0)
    target = jax.lax.stop_gradient(mean) if detach else mean
    log_t = jax.nn.log_softmax(target / temp, axis=-1)
    students = range(logits.shape[0]) if logits.shape[0] == 2 else [logits.shape[0] - 1]
    total = jnp.zeros((), jnp.float32)
    for i in students:
        log_s = jax.nn.log_softmax(logits[i] / temp, axis=-1)
        total += temp**2 * jnp.mean(jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1))
    return total


def _sample_bank_indices(rng: jax.Array, lookup: dict, index: jax.Array, labels: jax.Array,
                         pos_k: int, neg_k: int) -> jax.Array:
    """(N, 1 + pos_k + neg_k): [own | same-class other than own | other-class], uniform."""
    n = lookup["sorted"].shape[0]
    start, count = lookup["start"][labels], lookup["count"][labels]
    own_rank = lookup["rank"][index] - start
    r_pos, r_neg = jax.random.split(rng)
    u = jax.random.uniform(r_pos, (labels.shape[0], pos_k))
    p = jnp.floor(u * jnp.maximum(count - 1, 1)[:, None]).astype(jnp.int32)
    p = jnp.where(count[:, None] > 1, p + (p >= own_rank[:, None]), 0)  # skip the own row
    u = jax.random.uniform(r_neg, (labels.shape[0], neg_k))
    q = jnp.floor(u * (n - count)[:, None]).astype(jnp.int32)
    q = q + jnp.where(q >= start[:, None], count[:, None], 0)  # skip the own class's block
    pos = lookup["sorted"][start[:, None] + p]
    neg = lookup["sorted"][jnp.clip(q, 0, n - 1)]
    return jnp.concatenate([index[:, None].astype(jnp.int32), pos, neg], axis=1)


def _weighted(cfg: Any, terms: dict) -> jax.Array:
    return sum(cfg[w] * terms[t] for w, t in TERMS)


def _supervised_loss(params, state, batch, rng, ctx):
    config = ctx["config"]
    cfg = config.loss
    r_aug, r_drop, r_idx = jax.random.split(rng, 3)
    x = ctx["augment"](r_aug, batch["image"])
    out, batch_stats = student_forward(params, state, x, ctx, rng=r_drop)
    labels = batch["label"].astype(jnp.int32)
    logits = out["logits"].astype(jnp.float32)
    ce = sum(optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean() for lg in logits)
    updates = {"batch_stats": batch_stats}
    if cfg.form == "in_batch":
        terms = losses.mcl_losses(out["embedding"], labels, cfg.tau, cfg.kd_temp)
    else:
        index = batch["index"].astype(jnp.int32)
        idx = _sample_bank_indices(r_idx, state["bank_lookup"], index, labels, cfg.pos_k,
                                   cfg.neg_k)
        m = cfg.num_nets
        banks = [state[f"queue_bank{i}"]["feats"] for i in range(m)]
        contrast = jnp.stack([bank[idx] for bank in banks])
        terms = losses.mcl_bank_losses(out["embedding"], contrast, cfg.tau, cfg.kd_temp,
                                       cfg.pos_k)
        for i in range(m):  # after the loss: the banks hold this step's embeddings
            updates[f"queue_bank{i}"] = {"feats": losses.bank_update(
                banks[i], index, out["embedding"][i], cfg.bank_momentum)}
    loss = ce + _weighted(cfg, terms)
    metrics = {"ce": ce, **terms,
               "top1_net0": jnp.mean(jnp.argmax(logits[0], -1) == labels) * 100.0}
    if cfg.logit_distill:
        metrics["logit_kd"] = _logit_distill(logits, cfg.kd_temp, cfg.logit_distill_detach)
        loss += metrics["logit_kd"]
    return loss, (metrics, updates)


def _moco_loss(params, state, batch, rng, ctx):
    cfg = ctx["config"].loss
    m = cfg.num_nets
    r_q, r_k, r_drop = jax.random.split(rng, 3)
    x_q = ctx["augment"](r_q, batch["view1"])
    x_k = ctx["augment"](r_k, batch["view2"])
    # Every network's key encoder at once (the cohort's EMA is per leaf), shuffle-BN as MoCo.
    k_out, ema = momentum_keys(params, state["ema"], x_k, ctx, jax.random.fold_in(r_drop, 1))
    k = k_out["embedding"]
    q_out, batch_stats = student_forward(params, state, x_q, ctx, rng=r_drop)
    queues = jnp.stack([state[f"queue_{i}"]["feats"] for i in range(m)])
    terms = losses.mcl_moco_losses(q_out["embedding"], k, queues, cfg.tau, cfg.kd_temp)
    updates = {"batch_stats": batch_stats,
               "ema": ema,
               **{f"queue_{i}": queue.enqueue(state[f"queue_{i}"], losses.l2_normalize(k[i]))
                  for i in range(m)}}
    return _weighted(cfg, terms), (dict(terms), updates)


def loss_fn(params, state, batch, rng, teacher_vars, ctx):
    if ctx["config"].loss.form == "moco":
        return _moco_loss(params, state, batch, rng, ctx)
    return _supervised_loss(params, state, batch, rng, ctx)


# ------------------------------------------------------------------------------ eval / export


def eval_outputs(ctx: dict, variables: dict, images: jax.Array) -> dict:
    """Network 0's features and embedding (kNN, probes, export) and every network's logits
    (`logits_nets`, (M, N, C)): MCL reports each network's top-1 and the best of them."""
    out = ctx["student"].apply(variables, images, train=False)
    res = {"features": out["features"], "embedding": out["embedding"][0]}
    if "logits" in out:
        res["logits"], res["logits_nets"] = out["logits"][0], out["logits"]
    return res


def export(config: Any, variables: dict) -> tuple[dict, dict]:
    """Network 0 as a plain encoder (backbone + classifier + its mcl_embed head; with a shared
    stem, the stem merged into its backbone)."""
    from disco_jax.methods import encoder_manifest  # the registry imports this module

    return plain_variables(variables, 0), encoder_manifest(config.student)


def loss_config(form: str = "in_batch", **overrides: Any) -> Any:
    """The official defaults of one form as a `loss` ConfigDict (configs start from this)."""
    import ml_collections as mlc

    if form not in FORM_DEFAULTS:
        raise ConfigError(f"loss.form must be one of {', '.join(FORMS)}, got {form!r}")
    return mlc.ConfigDict(LOSS_DEFAULTS | {"form": form} | FORM_DEFAULTS[form] | overrides)
