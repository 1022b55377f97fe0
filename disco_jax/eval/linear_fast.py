"""`linear_fast`: a linear probe on cached frozen features (the quick monitor).

Not any paper's protocol (for that see `linear`, the augmented probe of MoCo / SEED / DisCo):

The backbone is frozen and in inference mode (as MoCo's `main_lincls.py`). Features are
extracted once (no augmentation), L2-normalised, and standardised with the training-set mean
and variance (a BatchNorm without affine parameters in front of the classifier, as MAE's
probe), then a
linear classifier (weights N(0, 0.01), bias 0, as the official probe) is trained with SGD,
momentum 0.9, no weight decay and a cosine schedule. On cached features this takes seconds,
which is what makes it usable as a periodic and end-of-run metric.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from disco_jax.errors import ConfigError
from disco_jax.eval import common
from disco_jax.losses import l2_normalize


def linear_probe_scores(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    *,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Test-set logits (float32, (n_test, num_classes)) of a linear classifier trained on the
    frozen training features."""
    # L2-normalise first so the standardisation below is scale-free: a backbone whose features
    # are tiny (e.g. an untrained MobileNetV3 in eval mode, ~1e-9) must not fall below the eps.
    x = np.asarray(l2_normalize(jnp.asarray(train_feats)))
    mean, std = x.mean(0), np.sqrt(x.var(0) + 1e-6)
    x = jnp.asarray((x - mean) / std)
    y = jnp.asarray(train_labels, jnp.int32)
    xt = jnp.asarray((np.asarray(l2_normalize(jnp.asarray(test_feats))) - mean) / std)
    n, d = x.shape
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    schedule = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
    tx = optax.sgd(schedule, momentum=0.9)
    rng = jax.random.PRNGKey(seed)
    params = {
        "w": 0.01 * jax.random.normal(rng, (d, num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }

    def loss_fn(p, xb, yb):
        logits = xb @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def epoch(p, opt, key):
        perm = jax.random.permutation(key, n)[: steps_per_epoch * batch_size]
        idx = perm.reshape(steps_per_epoch, batch_size)

        def step(carry, ids):
            p, opt = carry
            grads = jax.grad(loss_fn)(p, x[ids], y[ids])
            upd, opt = tx.update(grads, opt, p)
            return (optax.apply_updates(p, upd), opt), None

        (p, opt), _ = jax.lax.scan(step, (p, opt), idx)
        return p, opt

    opt = tx.init(params)
    for key in jax.random.split(jax.random.fold_in(rng, 1), epochs):
        params, opt = epoch(params, opt, key)
    return np.asarray(xt @ params["w"] + params["b"])


def linear_probe(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray, *, num_classes: int, **kwargs: Any) -> float:
    """Top-1 accuracy (in %) of a linear classifier trained on the frozen features."""
    scores = linear_probe_scores(train_feats, train_labels, test_feats,
                                 num_classes=num_classes, **kwargs)
    return float(100.0 * np.mean(scores.argmax(-1) == np.asarray(test_labels)))


# --------------------------------------------------------------------------- evaluator

VERSION = 1
DEFAULTS = {"epochs": 100, "lr": 0.1, "probe_batch_size": 256, "train_limit": 0,
            "test_limit": 0}


def validate(cfg: Any, env: Any, where: str) -> None:
    if not (isinstance(cfg.epochs, int) and cfg.epochs > 0):
        raise ConfigError(f"{where}.epochs must be a positive integer, got {cfg.epochs!r}")
    for key in ("lr", "probe_batch_size"):
        if not cfg[key] > 0:
            raise ConfigError(f"{where}.{key} must be positive, got {cfg[key]!r}")
    common.get_source(cfg, env, common.splits(cfg, env))


class Evaluator(common.Evaluator):
    """top1 / top5 of the cached-feature probe on the test split."""

    def run(self, model: common.Model) -> dict[str, float]:
        cfg = self.cfg
        tr = common.cached_features(self.env, model, self.source, self.train_split, self.size,
                                    cfg.train_limit)
        te = common.cached_features(self.env, model, self.source, self.test_split, self.size,
                                    cfg.test_limit)
        scores = linear_probe_scores(tr["features"], tr["label"], te["features"],
                                     num_classes=self.source.num_classes, epochs=cfg.epochs,
                                     batch_size=cfg.probe_batch_size, lr=cfg.lr,
                                     seed=self.env.seed)
        return common.topk_accuracy(scores, te["label"])
