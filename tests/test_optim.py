"""Schedule and optimizer against transcriptions of the official PyTorch code."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax import optim
from disco_jax.errors import ConfigError


def official_seed_lr(epoch, *, lr, lr_mult, warmup_epochs, epochs):
    """jacobswan1/SEED tools/utils.py adjust_learning_rate, cos=True."""
    out = lr * lr_mult
    if epoch < warmup_epochs:
        return lr + (lr * lr_mult - lr) / warmup_epochs * epoch
    return out * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def test_epoch_schedule_matches_official_seed():
    steps_per_epoch, epochs, batch = 10, 20, 1024
    sched = optim.lr_schedule(base_lr=0.03, global_batch=batch, steps_per_epoch=steps_per_epoch,
                              total_steps=epochs * steps_per_epoch, warmup_epochs=5)
    for step in range(epochs * steps_per_epoch):
        want = official_seed_lr(step // steps_per_epoch, lr=0.03, lr_mult=batch / 256,
                                warmup_epochs=5, epochs=epochs)
        np.testing.assert_allclose(float(sched(jnp.asarray(step))), want, rtol=1e-5, atol=1e-8)


def test_step_granularity_is_smooth():
    sched = optim.lr_schedule(base_lr=0.1, global_batch=256, steps_per_epoch=10, total_steps=100,
                              granularity="step")
    assert float(sched(jnp.asarray(1))) < float(sched(jnp.asarray(0)))
    assert float(sched(jnp.asarray(1))) != float(sched(jnp.asarray(2)))


def test_sgd_matches_torch_semantics():
    """torch.optim.SGD(momentum=0.9, weight_decay=wd): d = g + wd*p; b = m*b + d; p -= lr*b."""
    lr, wd, m = 0.5, 0.1, 0.9
    tx = optim.make_optimizer({"name": "sgd", "weight_decay": wd, "momentum": m}, lambda s: lr)
    p = {"w": jnp.asarray([1.0, -2.0]), "b": jnp.asarray([0.5])}
    state = tx.init(p)
    p_ref = {k: np.asarray(v, np.float64) for k, v in p.items()}
    buf = {k: np.zeros_like(v) for k, v in p_ref.items()}
    for i in range(3):
        g = {"w": jnp.asarray([0.3 * (i + 1), -0.1]), "b": jnp.asarray([0.2])}
        upd, state = tx.update(g, state, p)
        p = {k: p[k] + upd[k] for k in p}
        for k in p_ref:
            d = np.asarray(g[k]) + wd * p_ref[k]
            buf[k] = m * buf[k] + d
            p_ref[k] = p_ref[k] - lr * buf[k]
    for k in p:
        np.testing.assert_allclose(np.asarray(p[k]), p_ref[k], rtol=1e-6)


def test_bad_optimizer_names():
    with pytest.raises(ConfigError, match="valid optimizers"):
        optim.make_optimizer({"name": "sgdd"}, lambda s: 0.1)
    with pytest.raises(ConfigError, match="valid lr decays"):
        optim.lr_schedule(base_lr=0.1, global_batch=256, steps_per_epoch=1, total_steps=1,
                          decay="linear")


def test_lars_skips_bn_and_bias_in_trust_ratio_and_weight_decay_with_kernels_mask():
    """SimCLR/BYOL LARS: kernels get wd + trust-ratio scaling; BN scales and biases get plain
    momentum SGD (no wd, no adaptation)."""
    params = {"conv": {"kernel": jnp.full((3, 3), 2.0)},
              "bn": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)}}
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), params)
    lr, wd = 0.1, 0.01
    for mask in ("kernels", "all"):
        cfg = {"name": "lars", "weight_decay": wd, "weight_decay_mask": mask, "momentum": 0.9}
        tx = optim.make_optimizer(cfg, lambda step: lr)
        upd, _ = tx.update(grads, tx.init(params), params)
        # Non-kernels: -lr * (g [+ wd * w when the wd mask is "all"]), no trust ratio.
        g_bn = 0.5 + (wd * 2.0 if mask == "all" else 0.0)
        np.testing.assert_allclose(np.asarray(upd["bn"]["scale"]), -lr * g_bn, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(upd["bn"]["bias"]), -lr * g_bn, rtol=1e-6)
        # Kernel: g + wd * w, scaled by 1e-3 * ||w|| / ||g + wd w|| (eeta 1e-3).
        g = np.full((3, 3), 0.5 + wd * 2.0)
        trust = 1e-3 * np.linalg.norm(np.full((3, 3), 2.0)) / np.linalg.norm(g)
        np.testing.assert_allclose(np.asarray(upd["conv"]["kernel"]), -lr * trust * g, rtol=1e-5)
