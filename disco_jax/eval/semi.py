"""`semi`: semi-supervised evaluation with 1 % or 10 % of the labels.

Data: on ImageNet, TFDS's `imagenet2012_subset/1pct` / `/10pct` (SimCLR's subsets, the ones
DisCo's `data/1percent.txt` / `10percent.txt` list), tested on `validation`; on any other data,
a fixed class-balanced subset of the train split (`fraction` of each class, or `per_class`
examples), tested on the test split. Two modes:

- `linear` (Yuting-Gao/DisCo-pytorch `main_lincls_semi.py`): a linear classifier on the frozen
  backbone (eval mode), trained on the subset with the augmented probe's machinery: lr 3.0,
  100 epochs, halved at epochs 60 and 80, RandomResizedCrop + flip;
- `finetune` (SimCLR, Chen et al. 2020, appendix B.5): the whole network fine-tuned on the
  subset with a new fc: Nesterov momentum 0.9, lr 0.05 x batch/256, no weight decay, no
  warm-up, 60 epochs for 1 % and 30 for 10 %, RandomResizedCrop + flip, BN in train mode.

Metrics: top1 / top5 on the test split.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from disco_jax.errors import ConfigError
from disco_jax.eval import common, linear

VERSION = 1
SUBSETS = {"1pct": 0.01, "10pct": 0.10}
DEFAULTS = {
    **linear.DEFAULTS,
    "preset": "custom",
    "subset": "1pct",  # 1pct | 10pct; on ImageNet the TFDS subset, else that fraction per class
    "per_class": 0,  # > 0: this many labelled examples per class instead (non-ImageNet data)
    "mode": "linear",  # linear (frozen) | finetune (whole network)
    "epochs": 100,
    "lr": 3.0,
    "milestones": (60, 80),
    "gamma": 0.5,
}
PRESETS = {
    "disco": {"preset": "disco", "mode": "linear", "lr": 3.0, "epochs": 100,
              "milestones": (60, 80), "gamma": 0.5, "momentum": 0.9, "nesterov": False,
              "scale_with_batch": False},
    "simclr_1pct": {"preset": "simclr_1pct", "subset": "1pct", "mode": "finetune", "lr": 0.05,
                    "scale_with_batch": True, "epochs": 60, "milestones": (), "gamma": 1.0,
                    "momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
    "simclr_10pct": {"preset": "simclr_10pct", "subset": "10pct", "mode": "finetune",
                     "lr": 0.05, "scale_with_batch": True, "epochs": 30, "milestones": (),
                     "gamma": 1.0, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
}


def _is_imagenet(name: str) -> bool:
    return name.split("/")[0] in ("imagenet2012", "imagenet2012_subset")


def _data(cfg: Any, env: Any) -> tuple[dict, str, str]:
    """(data config, train split, test split): the TFDS subset on ImageNet."""
    dcfg = common.data_config(cfg, env)
    train, test = common.splits(cfg, env)
    if _is_imagenet(dcfg["name"]) and cfg.per_class <= 0:
        dcfg = {**dcfg, "name": f"imagenet2012_subset/{cfg.subset}"}
        return dcfg, "train", "validation"
    return dcfg, train, test


def validate(cfg: Any, env: Any, where: str) -> None:
    linear.validate_training(cfg, where, PRESETS)
    if cfg.mode not in ("linear", "finetune"):
        raise ConfigError(f"{where}.mode must be 'linear' or 'finetune', got {cfg.mode!r}")
    if cfg.per_class <= 0 and cfg.subset not in SUBSETS:
        raise ConfigError(f"{where}.subset {cfg.subset!r} does not exist; the semi-supervised"
                          f" subsets are {', '.join(SUBSETS)} (or set per_class > 0)")
    dcfg, train, test = _data(cfg, env)
    from disco_jax import data

    source = data.get_source(dcfg)
    for split in (train, test):
        if split not in source.splits:
            raise ConfigError(f"{where}: {source.name} has no split {split!r} (it has"
                              f" {', '.join(sorted(source.splits))})")
    if not (_is_imagenet(dcfg["name"]) and cfg.per_class <= 0):
        from disco_jax.data import sources

        ids = sources.per_class_subset(sources.split_labels(source, train),
                                       SUBSETS.get(cfg.subset, 0.0), cfg.per_class)
        if len(ids) < cfg.probe_batch_size:
            raise ConfigError(f"{where}: the {cfg.subset if cfg.per_class <= 0 else 'per_class'}"
                              f" subset of {source.name} has {len(ids)} examples, fewer than"
                              f" probe_batch_size={cfg.probe_batch_size}; lower it")
    if cfg.mode == "finetune" and not env.can_finetune:
        raise ConfigError(f"{where}: mode 'finetune' needs the network's weights, which this"
                          " caller does not provide")


def labelled_source(cfg: Any, env: Any) -> tuple[Any, str, str]:
    """(source, train split of the labelled subset, test split)."""
    from disco_jax import data
    from disco_jax.data import sources

    dcfg, train, test = _data(cfg, env)
    source = data.get_source(dcfg)
    if _is_imagenet(dcfg["name"]) and cfg.per_class <= 0:
        return source, train, test
    labels = sources.split_labels(source, train)
    ids = sources.per_class_subset(labels, SUBSETS.get(cfg.subset, 0.0), cfg.per_class,
                                   seed=env.seed)
    name = f"{train}_{cfg.per_class}per_class" if cfg.per_class > 0 else f"{train}_{cfg.subset}"
    return sources.subset(source, train, ids, name), name, test


class FineTuneNet(nn.Module):
    """The evaluated backbone (pooled features) and a new fc."""

    backbone: nn.Module
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict:
        feats = self.backbone(x, train=train, features=True)
        fc = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="fc")
        logits = fc(feats.astype(jnp.float32))
        return {"features": feats.astype(jnp.float32), "logits": logits}


def finetune_step(module: nn.Module, tx: optax.GradientTransformation, dtype: Any,
                  norm: tuple | None = None):
    def step(state: dict, batch: dict) -> tuple[dict, jax.Array]:
        rng = jax.random.fold_in(state["rng"], state["step"])
        images = common.normalize(batch["image"], dtype, norm)

        def loss_fn(params):
            out, mutated = module.apply({"params": params, "batch_stats": state["batch_stats"]},
                                        images, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": rng})
            loss = optax.softmax_cross_entropy_with_integer_labels(
                out["logits"].astype(jnp.float32), batch["label"]).mean()
            return loss, mutated["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {**state, "params": optax.apply_updates(state["params"], updates),
                "batch_stats": stats, "opt": opt, "step": state["step"] + 1}, loss

    return step


class Evaluator:
    def __init__(self, cfg: Any, env: Any, name: str):
        self.cfg, self.env, self.name = cfg, env, name
        self.source, self.train_split, self.test_split = labelled_source(cfg, env)
        self.size = common.image_size(cfg, env)
        self.training = linear.Training(name, os.path.join(env.workdir, name), self.source,
                                        self.train_split, cfg, env, self.size)

    def run(self, model: common.Model) -> dict[str, float]:
        n = self.source.num_examples(self.train_split)
        common.log.info("%s: %d labelled examples (%s) of %s", self.name, n, self.train_split,
                        self.source.name)
        if self.cfg.mode == "linear":
            head = linear.train_probe(model, self.training, self.source.num_classes)
            scores, labels = linear.test_scores(model, head, self.source, self.test_split,
                                                self.size, self.env.batch_size)
        else:
            scores, labels = self._finetune(model)
        return {**common.topk_accuracy(scores, labels), "labelled": float(n)}

    def _finetune(self, model: common.Model) -> tuple[np.ndarray, np.ndarray]:
        from disco_jax import models

        if model.encoder is None:
            raise ConfigError(f"{self.name}: mode 'finetune' needs the network's weights")
        _, enc_vars, manifest = model.encoder()
        dtype = self.env.dtype
        backbone = models.create(manifest["model"], num_classes=int(manifest.get("num_classes")
                                                                    or 0),
                                 dtype=dtype, **dict(manifest.get("model_kwargs", {})))
        net = FineTuneNet(backbone, self.source.num_classes)
        init = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros(
            (1, self.size, self.size, 3), dtype)))
        fc = linear.init_head(jax.random.PRNGKey(self.env.seed),
                              init["params"]["fc"]["kernel"].shape[0], self.source.num_classes)
        params = {"backbone": enc_vars["params"]["backbone"],
                  "fc": {"kernel": fc["w"], "bias": fc["b"]}}
        stats = {"backbone": enc_vars["batch_stats"]["backbone"]}
        tx = linear.optimizer(self.cfg, self.training.steps_per_epoch())
        state = {"params": params, "batch_stats": stats, "opt": tx.init(params),
                 "step": jnp.zeros((), jnp.int32),
                 "rng": jax.random.PRNGKey(self.env.seed + 1)}
        norm = common.norm_stats(self.env.data)  # the encoder's training normalisation
        state = self.training.run(state, finetune_step(net, tx, dtype, norm), tag=model.tag)
        tuned = common.Model(
            fn=lambda v, x: net.apply(v, common.normalize(x, dtype, norm), train=False),
            variables={"params": state["params"], "batch_stats": state["batch_stats"]},
            mesh=model.mesh, step=model.step, tag=f"{model.tag}+{self.name}")
        out = common.extract(tuned, self.source, self.test_split, size=self.size,
                             batch_size=self.env.batch_size, keys=("logits",))
        return out["logits"], out["label"]
