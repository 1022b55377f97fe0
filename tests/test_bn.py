"""The shared BatchNorm (`disco_jax.models.layers.BatchNorm`): torch's train-mode step.

torch normalises a batch with its biased variance but updates ``running_var`` with the
unbiased one (x n / (n - 1), n = N*H*W reduced elements); Flax's BatchNorm updates it with the
biased one. References below are torch's formulas in NumPy float64, and torch itself when it
is importable.

Tolerances: every float32 quantity here comes from sums of n <= 72 terms, whose relative
rounding error is at most n * eps32 (~1e-5 at n = 72, Higham's bound; pairwise summation is far
below it), then O(1) elementwise operations. The n / (n - 1) factor under test moves the
running variance by (1 - m) * var / (n - 1); each case checks that this is over 10x the
tolerance, so a biased update (Flax's) cannot pass.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax.models import layers

EPS32 = float(np.finfo(np.float32).eps)
# (input shape, Flax momentum, eps): a conv BN at torch's defaults, lukemelas' BN (torch
# momentum 0.01, eps 1e-3), and a BatchNorm1d (SwAV / BYOL heads) at batch 8.
CASES = [((4, 3, 3, 5), 0.9, 1e-5), ((2, 6, 6, 3), 0.99, 1e-3), ((8, 6), 0.9, 1e-5)]


def _data(shape, seed=0):
    """Input with a non-zero mean per channel, affine params and running stats that are not
    the init values (so every term of the formulas matters)."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.normal(size=shape) * rng.uniform(0.5, 3.0, c) + rng.normal(size=c)
    variables = {
        "params": {"scale": rng.uniform(0.5, 1.5, c), "bias": rng.normal(size=c)},
        "batch_stats": {"mean": rng.normal(size=c) * 0.1, "var": rng.uniform(0.5, 2.0, c)},
    }
    return x, variables


def _f32(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _torch_step(x, v, momentum, eps):
    """torch's train-mode batch_norm in float64: (output, new running mean, new running var)."""
    axes = tuple(range(x.ndim - 1))
    n = int(np.prod([x.shape[a] for a in axes]))
    mean = x.mean(axes)
    var = ((x - mean) ** 2).mean(axes)  # biased: the normalisation
    p = v["params"]
    y = (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]
    t = 1 - momentum  # torch's momentum
    s = v["batch_stats"]
    return y, (1 - t) * s["mean"] + t * mean, (1 - t) * s["var"] + t * var * n / (n - 1)


def _apply(bn, variables, x):
    out, mutated = bn.apply(_f32(variables), jnp.asarray(x, jnp.float32), mutable=["batch_stats"])
    return np.asarray(out), jax.tree.map(np.asarray, mutated["batch_stats"])


@pytest.mark.parametrize("shape, momentum, eps", CASES)
def test_train_step_matches_torch_formula(shape, momentum, eps):
    x, v = _data(shape)
    n = int(np.prod(shape[:-1]))
    tol = n * EPS32
    bn = layers.batch_norm(True, jnp.float32, "bn", momentum, eps)
    y, stats = _apply(bn, v, x)
    y_ref, mean_ref, var_ref = _torch_step(x, v, momentum, eps)
    biased = momentum * v["batch_stats"]["var"] + (1 - momentum) * x.var(tuple(range(x.ndim - 1)))
    assert (np.abs(biased - var_ref) / var_ref).max() > 10 * tol  # the test can tell them apart
    np.testing.assert_allclose(stats["var"], var_ref, rtol=tol)
    np.testing.assert_allclose(stats["mean"], mean_ref, rtol=tol, atol=tol)
    # Normalised with the biased variance; |y| is O(1) (scale <= 1.5, |bias| ~ 1).
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    # And exactly what Flax's BatchNorm (two-pass variance) computes, but for the running var.
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=momentum, epsilon=eps,
                           use_fast_variance=False, dtype=jnp.float32)
    y_flax, stats_flax = _apply(flax_bn, v, x)
    np.testing.assert_allclose(y, y_flax, rtol=2 * EPS32, atol=2 * EPS32)
    np.testing.assert_allclose(stats["mean"], stats_flax["mean"], rtol=2 * EPS32, atol=2 * EPS32)


@pytest.mark.parametrize("shape, momentum, eps", CASES[:1])
def test_eval_uses_the_running_statistics_and_init_leaves_them(shape, momentum, eps):
    x, v = _data(shape)
    bn = layers.batch_norm(False, jnp.float32, "bn", momentum, eps)
    y = np.asarray(bn.apply(_f32(v), jnp.asarray(x, jnp.float32)))
    p, s = v["params"], v["batch_stats"]
    ref = (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]
    np.testing.assert_allclose(y, ref, rtol=16 * EPS32, atol=16 * EPS32)
    # Train-mode init creates the variables with torch's initial values and no update.
    init = layers.batch_norm(True, jnp.float32, "bn").init(jax.random.key(0), jnp.asarray(x))
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, v)
    np.testing.assert_array_equal(init["batch_stats"]["mean"], 0)
    np.testing.assert_array_equal(init["batch_stats"]["var"], 1)
    np.testing.assert_array_equal(init["params"]["scale"], 1)
    np.testing.assert_array_equal(init["params"]["bias"], 0)


def test_vmapped_groups_use_their_own_count():
    """Grouped BN (vmap over groups, as `methods.common.train_forward` does): each group's
    running-variance update uses n = its own N*H*W."""
    x, v = _data((2, 4, 3, 3, 5))  # 2 groups of 4 images
    bn = layers.batch_norm(True, jnp.float32, "bn")

    def one(xg):
        return bn.apply(_f32(v), xg, mutable=["batch_stats"])

    ys, stats = jax.vmap(one)(jnp.asarray(x, jnp.float32))
    for g in range(2):
        y_ref, _, var_ref = _torch_step(x[g], v, 0.9, 1e-5)
        np.testing.assert_allclose(stats["batch_stats"]["var"][g], var_ref, rtol=36 * EPS32)
        np.testing.assert_allclose(ys[g], y_ref, rtol=36 * EPS32, atol=36 * EPS32)


def test_bfloat16_compute_keeps_float32_statistics():
    x, v = _data((4, 3, 3, 5))
    bn = layers.batch_norm(True, jnp.bfloat16, "bn")
    y, mutated = bn.apply(_f32(v), jnp.asarray(x, jnp.bfloat16), mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(mutated))
    # Statistics of the bf16-rounded input, in float32.
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    _, _, var_ref = _torch_step(xb, v, 0.9, 1e-5)
    np.testing.assert_allclose(mutated["batch_stats"]["var"], var_ref, rtol=36 * EPS32)


@pytest.mark.parametrize("shape, momentum, eps", CASES)
def test_train_step_matches_torch_batchnorm(shape, momentum, eps):
    """One train-mode step of torch.nn.BatchNorm1d/2d itself: output and running statistics."""
    torch = pytest.importorskip("torch")
    x, v = _data(shape, seed=1)
    c = shape[-1]
    cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    ref = cls(c, eps=eps, momentum=1 - momentum)  # torch's momentum weights the new statistic
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(v["params"]["scale"]))
        ref.bias.copy_(torch.tensor(v["params"]["bias"]))
        ref.running_mean.copy_(torch.tensor(v["batch_stats"]["mean"]))
        ref.running_var.copy_(torch.tensor(v["batch_stats"]["var"]))
    ref.train()
    xt = torch.tensor(x, dtype=torch.float32)
    if len(shape) == 4:
        xt = xt.permute(0, 3, 1, 2)  # NHWC -> NCHW
    with torch.no_grad():
        yt = ref(xt)
    if len(shape) == 4:
        yt = yt.permute(0, 2, 3, 1)
    bn = layers.batch_norm(True, jnp.float32, "bn", momentum, eps)
    y, stats = _apply(bn, v, np.asarray(x, np.float32))
    # Both sides are float32: twice the one-sided bound.
    tol = 2 * int(np.prod(shape[:-1])) * EPS32
    np.testing.assert_allclose(y, yt.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(stats["mean"], ref.running_mean.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(stats["var"], ref.running_var.numpy(), rtol=tol)
