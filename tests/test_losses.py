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


# ----------------------------------------------------------------------- SSLD, SimCLR, BYOL


def _np_softmax(z):
    return np.exp(_np_log_softmax(z))


def np_ssld_loss(s, t, temperature=1.0, eps=0.0):
    """PaddleClas JSDivLoss (2020) / DMLLoss (eps=1e-12): mean over N*C of the elementwise
    half-symmetric KL, times C."""
    ps, pt = _np_softmax(s / temperature), _np_softmax(t / temperature)
    kl_ts = pt * np.log((pt + eps) / (ps + eps))
    kl_st = ps * np.log((ps + eps) / (pt + eps))
    return (kl_ts + kl_st).mean() / 2.0 * s.shape[1]


def np_simclr_loss(z1, z2, temp):
    """google-research/simclr objective.py add_contrastive_loss (LARGE_NUM masking)."""
    h1, h2 = _np_normalize(z1), _np_normalize(z2)
    n = h1.shape[0]
    mask = np.eye(n) * 1e9
    aa, bb = h1 @ h1.T / temp - mask, h2 @ h2.T / temp - mask
    ab, ba = h1 @ h2.T / temp, h2 @ h1.T / temp
    loss_a = -_np_log_softmax(np.concatenate([ab, aa], 1))[np.arange(n), np.arange(n)]
    loss_b = -_np_log_softmax(np.concatenate([ba, bb], 1))[np.arange(n), np.arange(n)]
    return np.mean(loss_a + loss_b)


def np_byol_loss(p, z):
    return np.mean(2 - 2 * (_np_normalize(p) * _np_normalize(z)).sum(1))


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-3])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ssld_loss_matches_numpy(eps, temperature):
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(6, 10)) * 3, rng.normal(size=(6, 10)) * 3
    got = losses.ssld_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                           temperature, eps)
    np.testing.assert_allclose(float(got), np_ssld_loss(s, t, temperature, eps),
                               rtol=1e-5, atol=1e-6)


def test_ssld_loss_eps_matters_when_probabilities_underflow_and_is_zero_at_equality():
    s = np.array([[0.0, 0.0, -40.0]], np.float32)  # p_s[2] ~ 4e-18: below eps=1e-3
    t = np.array([[0.0, -40.0, 0.0]], np.float32)
    l0 = float(losses.ssld_loss(s, t, eps=0.0))
    l3 = float(losses.ssld_loss(s, t, eps=1e-3))
    np.testing.assert_allclose(l3, np_ssld_loss(s.astype(np.float64), t, eps=1e-3), rtol=1e-5)
    assert l3 < l0  # eps caps the log ratio of underflowing probabilities
    assert float(losses.ssld_loss(s, s)) == pytest.approx(0.0, abs=1e-7)


def test_ssld_loss_gradient_reaches_only_student_and_bf16_inputs_run_in_float32():
    rng = np.random.default_rng(4)
    s, t = (jnp.asarray(rng.normal(size=(4, 7)), jnp.float32) for _ in range(2))
    gs, gt = jax.grad(lambda a, b: losses.ssld_loss(a, b, eps=1e-12), argnums=(0, 1))(s, t)
    assert float(jnp.abs(gs).sum()) > 0 and float(jnp.abs(gt).sum()) == 0.0
    # Numerical gradient of the NumPy loss w.r.t. the student logits (teacher fixed).
    s64, t64, h = np.asarray(s, np.float64), np.asarray(t, np.float64), 1e-6
    num = np.zeros_like(s64)
    for idx in np.ndindex(*s64.shape):
        d = np.zeros_like(s64)
        d[idx] = h
        num[idx] = (np_ssld_loss(s64 + d, t64) - np_ssld_loss(s64 - d, t64)) / (2 * h)
    np.testing.assert_allclose(np.asarray(gs), num, rtol=1e-4, atol=1e-6)
    out = losses.ssld_loss(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16))
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("temp", [0.1, 0.5])
def test_simclr_loss_matches_numpy_and_gradients_reach_both_views(temp):
    rng = np.random.default_rng(5)
    z1, z2 = rng.normal(size=(8, 16)) * 2, rng.normal(size=(8, 16)) * 2
    got = losses.simclr_loss(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), temp)
    np.testing.assert_allclose(float(got), np_simclr_loss(z1, z2, temp), rtol=1e-5, atol=1e-6)
    g1, g2 = jax.grad(losses.simclr_loss, argnums=(0, 1))(
        jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), temp)
    assert float(jnp.abs(g1).sum()) > 0
    assert float(jnp.abs(g2).sum()) > 0  # both views are the same trained network
    # A perfectly aligned, well separated batch has a lower loss than a random one.
    eye = np.eye(8, 16) * 5
    assert float(losses.simclr_loss(eye, eye, temp)) < float(got)


def test_byol_loss_matches_numpy_and_stops_target_gradient():
    rng = np.random.default_rng(6)
    p, z = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    got = losses.byol_loss(jnp.asarray(p, jnp.float32), jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(float(got), np_byol_loss(p, z), rtol=1e-5, atol=1e-6)
    gp, gz = jax.grad(losses.byol_loss, argnums=(0, 1))(jnp.asarray(p, jnp.float32),
                                                        jnp.asarray(z, jnp.float32))
    assert float(jnp.abs(gp).sum()) > 0 and float(jnp.abs(gz).sum()) == 0.0
    assert float(losses.byol_loss(p, 3 * p)) == pytest.approx(0.0, abs=1e-6)
