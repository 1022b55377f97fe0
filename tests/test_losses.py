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


# --------------------------------------------------------------------------- DisCo, KD


def np_disco_loss(q, k, queue, qk, tq, tk, temp, weight, reduction):
    """DisCo-pytorch builder_kq_mse_largeembedding_2048 + main.py, transcribed to NumPy."""
    ce = np_moco_loss(q, k, queue, temp)
    dq = ((_np_normalize(tq) - _np_normalize(q)) ** 2).sum()  # MSELoss(reduction='sum')
    dk = ((_np_normalize(tk) - _np_normalize(qk)) ** 2).sum()
    if reduction == "mean":
        dq, dk = dq / q.shape[0], dk / q.shape[0]
    return {"contrastive": ce, "distill_q": dq, "distill_k": dk, "distill": dq + dk,
            "total": ce + weight * (dq + dk)}


def _disco_inputs(seed, n=8, d=16, k=64):
    rng = np.random.default_rng(seed)
    q, kk, qk, tq, tk = (rng.normal(size=(n, d)) * 3.0 for _ in range(5))
    queue = _np_normalize(rng.normal(size=(k, d)))
    return q, kk, queue, qk, tq, tk


@pytest.mark.parametrize("reduction,weight", [("sum", 1.0), ("sum", 0.125), ("mean", 32.0)])
def test_disco_loss_matches_numpy(reduction, weight):
    args = _disco_inputs(8)
    got = losses.disco_loss(*(jnp.asarray(a, jnp.float32) for a in args), temp=0.2,
                            distill_weight=weight, distill_reduction=reduction)
    want = np_disco_loss(*args, 0.2, weight, reduction)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_disco_sum_reduction_is_per_row_two_minus_two_cos_summed():
    # "sum" is the official reduction: for unit vectors sum_{n,c}(t-q)^2 = sum_n (2 - 2 cos);
    # doubling the batch (same rows twice) doubles it, while "mean" stays put.
    q, k, queue, qk, tq, tk = _disco_inputs(9)
    cos = (_np_normalize(q) * _np_normalize(tq)).sum(1)
    out = losses.disco_loss(*(jnp.asarray(a) for a in (q, k, queue, qk, tq, tk)))
    np.testing.assert_allclose(float(out["distill_q"]), (2 - 2 * cos).sum(), rtol=1e-5)
    twice = [np.concatenate([a, a]) for a in (q, k)] + [queue] + [
        np.concatenate([a, a]) for a in (qk, tq, tk)]
    for red, factor in (("sum", 2.0), ("mean", 1.0)):
        one = losses.disco_loss(*(jnp.asarray(a) for a in (q, k, queue, qk, tq, tk)),
                                distill_reduction=red)
        two = losses.disco_loss(*(jnp.asarray(a) for a in twice), distill_reduction=red)
        np.testing.assert_allclose(float(two["distill"]), factor * float(one["distill"]),
                                   rtol=1e-5)
        np.testing.assert_allclose(float(two["contrastive"]), float(one["contrastive"]),
                                   rtol=1e-5)


def test_disco_gradients_reach_only_q_and_qk():
    args = [jnp.asarray(a, jnp.float32) for a in _disco_inputs(10)]
    grads = jax.grad(lambda *a: losses.disco_loss(*a)["total"], argnums=tuple(range(6)))(*args)
    names = ("q", "k", "queue", "qk", "teacher_q", "teacher_k")
    norms = {n: float(jnp.abs(g).sum()) for n, g in zip(names, grads, strict=True)}
    assert norms["q"] > 0 and norms["qk"] > 0, norms
    assert norms["k"] == norms["queue"] == norms["teacher_q"] == norms["teacher_k"] == 0, norms
    # qk only gets the distillation gradient: zero when its teacher matches it exactly.
    args[5] = args[3] * 2.0
    g_qk = jax.grad(lambda qk: losses.disco_loss(*args[:3], qk, *args[4:])["total"])(args[3])
    np.testing.assert_allclose(np.asarray(g_qk), 0.0, atol=1e-6)


def test_disco_loss_rejects_unknown_reduction():
    args = [jnp.asarray(a, jnp.float32) for a in _disco_inputs(11)]
    with pytest.raises(ValueError, match="distill_reduction"):
        losses.disco_loss(*args, distill_reduction="avg")


def np_kd_loss(s, t, temp):
    log_pt, log_ps = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
    return temp**2 * (np.exp(log_pt) * (log_pt - log_ps)).sum(1).mean()


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_loss_matches_numpy_and_stops_teacher_gradient(temp):
    rng = np.random.default_rng(12)
    s, t = rng.normal(size=(8, 10)) * 3, rng.normal(size=(8, 10)) * 3
    got = losses.kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temp)
    np.testing.assert_allclose(float(got), np_kd_loss(s, t, temp), rtol=1e-5, atol=1e-6)
    gs, gt = jax.grad(losses.kd_loss, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t), temp)
    assert float(jnp.abs(gs).sum()) > 0 and float(jnp.abs(gt).sum()) == 0
    # Hinton: the gradient is T * (softmax(s/T) - softmax(t/T)) / N.
    p = lambda z: np.exp(_np_log_softmax(z / temp))  # noqa: E731
    np.testing.assert_allclose(np.asarray(gs), temp * (p(s) - p(t)) / 8, rtol=1e-4, atol=1e-6)
    assert float(losses.kd_loss(jnp.asarray(t), jnp.asarray(t), temp)) == pytest.approx(0, abs=1e-6)


def test_embedding_l2_and_cosine_losses_match_numpy():
    rng = np.random.default_rng(13)
    s, t = rng.normal(size=(8, 16)) * 2, rng.normal(size=(8, 16)) * 2
    sj, tj = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    np.testing.assert_allclose(float(losses.embedding_l2_loss(sj, tj)),
                               ((s - t) ** 2).sum(1).mean(), rtol=1e-5)
    cos = (_np_normalize(s) * _np_normalize(t)).sum(1)
    np.testing.assert_allclose(float(losses.cosine_loss(sj, tj)), (1 - cos).mean(), rtol=1e-5)
    for fn in (losses.embedding_l2_loss, losses.cosine_loss):
        gs, gt = jax.grad(fn, argnums=(0, 1))(sj, tj)
        assert float(jnp.abs(gs).sum()) > 0 and float(jnp.abs(gt).sum()) == 0
