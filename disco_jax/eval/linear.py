"""Linear probe on cached frozen features.

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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from disco_jax.losses import l2_normalize


def linear_probe(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    seed: int = 0,
) -> float:
    """Top-1 accuracy (in %) of a linear classifier trained on the frozen features."""
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
    preds = np.asarray(jnp.argmax(xt @ params["w"] + params["b"], axis=-1))
    return float(100.0 * np.mean(preds == np.asarray(test_labels)))
