"""`linear`: the augmented linear probe of the papers' tables, on a frozen backbone.

facebookresearch/moco `main_lincls.py` (the protocol of the MoCo and SEED tables): the backbone
frozen and in eval mode (BN running statistics), a new fc initialised N(0, 0.01) with bias 0 on
the pooled features, SGD momentum 0.9, batch 256, weight decay 0, 100 epochs, cross-entropy;
train images RandomResizedCrop(224, scale (0.08, 1)) + horizontal flip, test images Resize 256
+ CenterCrop 224; the lr changes once per epoch. Presets:

- `moco`: lr 30, x0.1 at epochs 60 and 80 (MoCo's commands; SEED's README uses the same);
- `seed`: SEED's copy of `main_lincls.py`: lr 30 x batch/256 after a 5-epoch linear warm-up;
- `disco`: Yuting-Gao/DisCo-pytorch `DisCo/main_lincls.py` with its commands' `--lr 3`: the lr
  halved at epochs 5, 10, ..., 45, 60 and 80.

It trains for hours on ImageNet, so it checkpoints (orbax, under `<workdir>/<name>/`) and
resumes like training: the training stream is a pure function of (seed, step), and SIGTERM saves
and stops (`Preempted`). Metrics: top1 / top5 on the test split.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from disco_jax.errors import ConfigError
from disco_jax.eval import common

log = logging.getLogger("disco_jax")

VERSION = 1
DEFAULTS = {
    "preset": "moco",
    "epochs": 100,
    "lr": 30.0,
    "scale_with_batch": False,  # lr x probe_batch_size / 256
    "warmup_epochs": 0.0,  # linear warm-up from 0 over these epochs (SEED)
    "milestones": (60, 80),  # epochs at which the lr is multiplied by gamma
    "gamma": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    "probe_batch_size": 256,  # global
    "crop_scale": (0.08, 1.0),
    "flip_p": 0.5,
    "shuffle_buffer": 50_000,
    "log_every_steps": 100,
    "checkpoint_every_steps": 1000,
}
PRESETS = {
    "moco": {"preset": "moco", "lr": 30.0, "milestones": (60, 80), "gamma": 0.1,
             "scale_with_batch": False, "warmup_epochs": 0.0},
    "seed": {"preset": "seed", "lr": 30.0, "milestones": (60, 80), "gamma": 0.1,
             "scale_with_batch": True, "warmup_epochs": 5.0},
    "disco": {"preset": "disco", "lr": 3.0, "milestones": (5, 10, 15, 20, 25, 30, 35, 40, 45,
                                                         60, 80),
              "gamma": 0.5, "scale_with_batch": False, "warmup_epochs": 0.0},
}


class Preempted(Exception):
    """SIGTERM during a long protocol: its checkpoint is saved; run the same command again."""

    def __init__(self, step: int, where: str):
        super().__init__(f"preempted: saved step {step} of {where}")
        self.step, self.where = step, where


def deviations(cfg: Any) -> list[str]:
    """Settings that differ from the named preset (a reduced or modified protocol)."""
    preset = {**DEFAULTS, **PRESETS.get(cfg.get("preset", ""), {})}
    return sorted(k for k in preset if k in cfg and _norm(cfg[k]) != _norm(preset[k]))


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def validate_training(cfg: Any, where: str, presets: dict | None = None) -> None:
    """Checks shared by the protocols that train (linear, semi)."""
    presets = PRESETS if presets is None else presets
    if cfg.get("preset", "custom") not in (*presets, "custom"):
        raise ConfigError(f"{where}.preset must be one of {', '.join(presets)} or 'custom',"
                          f" got {cfg.preset!r}")
    if not (isinstance(cfg.epochs, int) and cfg.epochs > 0):
        raise ConfigError(f"{where}.epochs must be a positive integer, got {cfg.epochs!r}")
    if not cfg.lr > 0:
        raise ConfigError(f"{where}.lr must be positive, got {cfg.lr}")
    if not (isinstance(cfg.probe_batch_size, int) and cfg.probe_batch_size > 0):
        raise ConfigError(f"{where}.probe_batch_size must be a positive integer")
    if not 0 < cfg.gamma <= 1 or cfg.warmup_epochs < 0 or cfg.weight_decay < 0:
        raise ConfigError(f"{where}: need 0 < gamma <= 1, warmup_epochs >= 0, weight_decay >= 0")
    lo, hi = cfg.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"{where}.crop_scale must satisfy 0 < min <= max <= 1")


def validate(cfg: Any, env: Any, where: str) -> None:
    validate_training(cfg, where)
    train, test = common.splits(cfg, env)
    source = common.get_source(cfg, env, (train, test))
    if source.num_examples(train) < cfg.probe_batch_size:
        raise ConfigError(f"{where}: split {train!r} of {source.name} has"
                          f" {source.num_examples(train)} examples, fewer than"
                          f" probe_batch_size={cfg.probe_batch_size}; lower it")


# --------------------------------------------------------------------------- schedule


def epoch_lr(epoch: float, *, lr: float, batch: int, milestones: tuple, gamma: float,
             warmup_epochs: float = 0.0, scale_with_batch: bool = False) -> float:
    """The lr of (integer) `epoch`, as `adjust_learning_rate` in the official scripts."""
    base = lr * batch / 256 if scale_with_batch else lr
    if epoch < warmup_epochs:
        return base * (epoch + 1) / warmup_epochs
    return base * gamma ** sum(epoch >= m for m in milestones)


def schedule(cfg: Any, steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
    """`epoch_lr` as a jittable function of the optimizer step (per-epoch changes)."""
    base = cfg.lr * cfg.probe_batch_size / 256 if cfg.scale_with_batch else cfg.lr
    milestones = tuple(cfg.milestones)

    def lr(step: jax.Array) -> jax.Array:
        epoch = jnp.floor(jnp.asarray(step, jnp.float32) / steps_per_epoch)
        out = base * cfg.gamma ** sum((epoch >= m).astype(jnp.float32) for m in milestones)
        if cfg.warmup_epochs > 0:
            out = jnp.where(epoch < cfg.warmup_epochs,
                            base * (epoch + 1) / cfg.warmup_epochs, out)
        return out

    return lr


def optimizer(cfg: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    """torch.optim.SGD: L2 decay added to the gradient, then momentum, then the lr."""
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(schedule(cfg, steps_per_epoch), momentum=cfg.momentum or None,
                  nesterov=bool(cfg.nesterov)),
    )


# --------------------------------------------------------------------------- training loop


@dataclasses.dataclass
class Training:
    """A supervised loop on a frozen or trained network, checkpointed under `directory`.

    `step_fn(state, batch) -> (state, loss)` is jitted here with the state replicated and
    donated; `state` is a plain dict with `step`. Used by `linear` and `semi`.
    """

    name: str
    directory: str
    source: Any
    split: str
    cfg: Any
    env: Any
    size: int

    def steps_per_epoch(self) -> int:
        from disco_jax import data

        n = jax.process_count()
        return max(1, data.steps_per_epoch(self.source, split=self.split,
                                           local_batch=self.cfg.probe_batch_size // n,
                                           process_count=n))

    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch()

    def stream(self, start_step: int) -> Any:
        """The training batches from `start_step`: RandomResizedCrop + flip, one view."""
        from disco_jax import data

        n = jax.process_count()
        return data.train_dataset(
            self.source, split=self.split, views=1, image_size=self.size,
            crop_scale=tuple(self.cfg.crop_scale), flip_p=self.cfg.flip_p,
            local_batch=self.cfg.probe_batch_size // n, seed=self.env.seed,
            start_step=start_step, process_index=jax.process_index(), process_count=n,
            shuffle_buffer=self.cfg.shuffle_buffer)

    def run(self, state: dict, step_fn: Callable, args: tuple = (), tag: str = "") -> dict:
        """Train from the latest checkpoint (or `state`) to the end; returns the final state.

        `tag` identifies the evaluated weights: a checkpoint of other weights is refused."""
        from disco_jax import checkpoint, data, resilience, sharding

        mesh = self.env.mesh
        repl = sharding.replicated(mesh)
        total = self.total_steps()
        mngr = checkpoint.manager(self.directory, keep=2,
                                  every_steps=self.cfg.checkpoint_every_steps)
        abstract = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype, sharding=repl),
            state)
        settings = self.cfg.to_json_best_effort(sort_keys=True)
        latest = mngr.latest_step()
        if latest is not None:
            meta = checkpoint.restore_meta(mngr, latest)
            for key, now, what in (("model", tag, "weights"), ("settings", settings,
                                                                "settings")):
                if meta.get(key, now) != now:
                    mngr.close()
                    raise ConfigError(f"{mngr.directory} holds a {self.name} run of other"
                                      f" {what}; use another --workdir or delete it")
            state, _ = checkpoint.restore(mngr, latest, abstract)
            log.info("%s: resumed from %s at step %d/%d", self.name, mngr.directory, latest,
                     total)
        else:
            state = jax.device_put(state, repl)
        start = int(state["step"])
        if start >= total:
            mngr.close()
            return state
        jitted = jax.jit(step_fn, donate_argnums=(0,))
        batches = data.global_iterator(self.stream(start), mesh)
        progress = common.Progress(f"{self.name} training", total - start, unit="step")
        preemption = resilience.Preemption()
        try:
            for step in range(start + 1, total + 1):
                state, loss = jitted(state, next(batches), *args)
                progress.update()
                if step % self.cfg.log_every_steps == 0 or step == total:
                    log.info("%s: step %d/%d loss %.4f", self.name, step, total, float(loss))
                stop = preemption.should_stop(step)
                checkpoint.save(mngr, step, state,
                                {"evaluator": self.name, "model": tag, "settings": settings},
                                force=step == total or stop)
                if stop:
                    checkpoint.wait(mngr)
                    mngr.close()
                    raise Preempted(step, self.name)
        finally:
            preemption.close()
        progress.close()
        checkpoint.wait(mngr)
        mngr.close()
        return state


# --------------------------------------------------------------------------- the probe


def init_head(rng: jax.Array, dim: int, num_classes: int) -> dict:
    """The official fc init: weights N(0, 0.01), bias 0."""
    return {"w": 0.01 * jax.random.normal(rng, (dim, num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}


def probe_step(fn: Callable, tx: optax.GradientTransformation) -> Callable:
    """One SGD step of the fc on the frozen network's (eval-mode) pooled features."""

    def step(state: dict, batch: dict, variables: Any) -> tuple[dict, jax.Array]:
        feats = jax.lax.stop_gradient(fn(variables, batch["image"])["features"])
        feats = feats.astype(jnp.float32)

        def loss_fn(head):
            logits = feats @ head["w"] + head["b"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["head"])
        updates, opt = tx.update(grads, state["opt"], state["head"])
        return {"head": optax.apply_updates(state["head"], updates), "opt": opt,
                "step": state["step"] + 1}, loss

    return step


def train_probe(model: common.Model, training: Training, num_classes: int) -> dict:
    """Train the fc on `training`'s stream; returns the head {"w", "b"} (host arrays)."""
    probe = model.predict(_zeros(model, training.size))
    dim = int(probe["features"].shape[-1])
    tx = optimizer(training.cfg, training.steps_per_epoch())
    head = init_head(jax.random.PRNGKey(training.env.seed), dim, num_classes)
    state = {"head": head, "opt": tx.init(head), "step": jnp.zeros((), jnp.int32)}
    state = training.run(state, probe_step(model.fn, tx), (model.variables,), tag=model.tag)
    return jax.tree_util.tree_map(np.asarray, state["head"])


def test_scores(model: common.Model, head: dict, source: Any, split: str, size: int,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    out = common.extract(model, source, split, size=size, batch_size=batch_size)
    return out["features"] @ head["w"] + head["b"], out["label"]


def _zeros(model: common.Model, size: int) -> jax.Array:
    n = model.mesh.devices.size
    sh = jax.sharding.NamedSharding(model.mesh, jax.sharding.PartitionSpec("data"))
    return jax.device_put(jnp.zeros((n, size, size, 3), jnp.uint8), sh)


class Evaluator(common.Evaluator):
    def __init__(self, cfg: Any, env: Any, name: str):
        super().__init__(cfg, env, name)
        self.training = Training(name, os.path.join(env.workdir, name), self.source,
                                 self.train_split, cfg, env, self.size)

    def run(self, model: common.Model) -> dict[str, float]:
        head = train_probe(model, self.training, self.source.num_classes)
        scores, labels = test_scores(model, head, self.source, self.test_split, self.size,
                                     self.env.batch_size)
        return common.topk_accuracy(scores, labels)
