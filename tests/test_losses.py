"""Losses against independent NumPy (float64) implementations of the official PyTorch code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax import losses


def _np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_seed_loss(s, t, queue, ts, tt):
    """jacobswan1/SEED builder.py + soft_cross_entropy, transcribed to NumPy."""
    s, t = _np_normalize(s), _np_normalize(t)
    queue_dk = queue.T  # the official queue is stored (D, K)
    logit_stu = np.concatenate([(s * t).sum(1, keepdims=True), s @ queue_dk], axis=1) / ts
    logit_tea = np.concatenate([(t * t).sum(1, keepdims=True), t @ queue_dk], axis=1) / tt
    target = np.exp(_np_log_softmax(logit_tea))
    return -(target * _np_log_softmax(logit_stu)).sum() / s.shape[0]


def np_moco_loss(q, k, queue, temp):
    q, k = _np_normalize(q), _np_normalize(k)
    logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ queue.T], axis=1) / temp
    return -_np_log_softmax(logits)[:, 0].mean()


def _inputs(seed, n=8, d=16, k=64, scale=3.0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, d)) * scale
    t = rng.normal(size=(n, d)) * scale
    queue = _np_normalize(rng.normal(size=(k, d)))
    return s, t, queue


@pytest.mark.parametrize("teacher_temp", [1e-4, 0.01, 0.05, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_seed_loss_matches_numpy(seed, teacher_temp):
    s, t, queue = _inputs(seed)
    got = losses.seed_loss(
        jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(queue, jnp.float32),
        student_temp=0.2, teacher_temp=teacher_temp,
    )
    want = np_seed_loss(s, t, queue, 0.2, teacher_temp)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


def test_seed_loss_soft_target_matters_at_high_teacher_temp():
    # With a queue row equal to the teacher embedding and a warm teacher, the target is not
    # one-hot, so the loss differs from plain InfoNCE against column 0.
    s, t, queue = _inputs(3)
    queue[0] = _np_normalize(t[:1])[0]
    soft = np_seed_loss(s, t, queue, 0.2, 0.5)
    got = losses.seed_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(queue), 0.2, 0.5)
    np.testing.assert_allclose(float(got), soft, rtol=1e-5)
    assert abs(soft - np_moco_loss(s, t, queue, 0.2)) > 1e-3


def test_seed_loss_is_float32_for_bfloat16_inputs():
    s, t, queue = _inputs(4)
    got = losses.seed_loss(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16),
                           jnp.asarray(queue, jnp.float32), 0.2, 1e-4)
    assert got.dtype == jnp.float32
    assert np.isfinite(float(got))
    want = np_seed_loss(np.asarray(jnp.asarray(s, jnp.bfloat16), np.float64),
                        np.asarray(jnp.asarray(t, jnp.bfloat16), np.float64), queue, 0.2, 1e-4)
    np.testing.assert_allclose(float(got), want, rtol=1e-4)


@pytest.mark.parametrize("temp", [0.07, 0.2])
def test_moco_loss_matches_numpy(temp):
    q, k, queue = _inputs(5)
    got = losses.moco_loss(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), temp=temp)
    np.testing.assert_allclose(float(got), np_moco_loss(q, k, queue, temp), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_student():
    s, t, queue = (jnp.asarray(x, jnp.float32) for x in _inputs(6))
    gs, gt, gq = jax.grad(losses.seed_loss, argnums=(0, 1, 2))(s, t, queue, 0.2, 1e-4)
    assert float(jnp.abs(gs).sum()) > 0
    assert float(jnp.abs(gt).sum()) == 0 and float(jnp.abs(gq).sum()) == 0
    gq_, gk, gqueue = jax.grad(losses.moco_loss, argnums=(0, 1, 2))(s, t, queue, 0.2)
    assert float(jnp.abs(gq_).sum()) > 0
    assert float(jnp.abs(gk).sum()) == 0 and float(jnp.abs(gqueue).sum()) == 0


def test_seed_gradient_matches_finite_differences():
    s, t, queue = _inputs(7, n=4, d=8, k=16)
    g = np.asarray(jax.grad(losses.seed_loss)(jnp.asarray(s, jnp.float32), jnp.asarray(t),
                                              jnp.asarray(queue), 0.2, 0.05))
    eps, i, j = 1e-5, 1, 3
    sp, sm = s.copy(), s.copy()
    sp[i, j] += eps
    sm[i, j] -= eps
    fd = (np_seed_loss(sp, t, queue, 0.2, 0.05) - np_seed_loss(sm, t, queue, 0.2, 0.05)) / (2 * eps)
    np.testing.assert_allclose(g[i, j], fd, rtol=1e-3, atol=1e-5)
