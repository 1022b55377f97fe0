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


# ------------------------------------------------------------------------------------------- MCL


def _np_kl(s, t, temp):
    """F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T**2."""
    log_t, log_s = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
    return (np.exp(log_t) * (log_t - log_s)).sum() / s.shape[0] * temp**2


def _np_supcon(anchor, contrast, labels, tau):
    """cifar_sup_mcl_loss.py SupCon: same masks (diagonal out) for any pair of networks."""
    n = anchor.shape[0]
    logits = anchor @ contrast.T / tau
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        log_den = np.log(np.exp(logits[i, others]).sum())
        pos = [j for j in others if labels[j] == labels[i]]
        total += np.mean([logits[i, j] - log_den for j in pos])
    return -total / n


def np_mcl_losses(emb, labels, tau, kd_temp):
    z = [_np_normalize(e) for e in emb]
    m = len(z)
    out = dict(vcl=0.0, icl=0.0, soft_vcl=0.0, soft_icl=0.0)
    for a in range(m):
        out["vcl"] += _np_supcon(z[a], z[a], labels, tau)
        for b in range(m):
            if a != b:
                out["soft_vcl"] += _np_kl(z[a] @ z[a].T / tau, z[b] @ z[b].T / tau, kd_temp)
            if a < b:
                out["icl"] += _np_supcon(z[a], z[b], labels, tau)
                out["icl"] += _np_supcon(z[b], z[a], labels, tau)
                ab, ba = z[a] @ z[b].T / tau, z[b] @ z[a].T / tau
                out["soft_icl"] += _np_kl(ab, ba, kd_temp) + _np_kl(ba, ab, kd_temp)
    return out


def _mcl_inputs(m, seed=0, n=8, d=16):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(m, n, d)) * 2.0
    labels = np.repeat(np.arange(n // 2), 2)[rng.permutation(n)]  # 2 per class, shuffled
    return emb, labels


def _assert_terms(got, want):
    assert set(got) == {"vcl", "icl", "soft_vcl", "soft_icl"}
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


@pytest.mark.parametrize("m", [2, 3])
def test_mcl_losses_match_numpy(m):
    emb, labels = _mcl_inputs(m)
    got = losses.mcl_losses(jnp.asarray(emb, jnp.float32), jnp.asarray(labels), 0.1, 3.0)
    _assert_terms(got, np_mcl_losses(emb, labels, 0.1, 3.0))


def test_mcl_losses_exclude_cross_network_diagonal_and_take_bfloat16():
    # Identical networks: the cross-network diagonal would be the strongest positive; the
    # official masks drop it, so ICL equals 2 x VCL/M exactly and the soft terms vanish.
    emb, labels = _mcl_inputs(1, seed=1)
    emb2 = np.concatenate([emb, emb])
    got = losses.mcl_losses(jnp.asarray(emb2, jnp.bfloat16), jnp.asarray(labels))
    assert got["vcl"].dtype == jnp.float32
    np.testing.assert_allclose(float(got["icl"]), float(got["vcl"]), rtol=1e-5)
    assert abs(float(got["soft_icl"])) < 1e-5 and abs(float(got["soft_vcl"])) < 1e-5


def test_mcl_gradients_flow_through_both_sides_and_not_into_kl_targets():
    emb, labels = _mcl_inputs(2, seed=2)
    emb, y = jnp.asarray(emb, jnp.float32), jnp.asarray(labels)

    def term(name, e0, e1):
        return losses.mcl_losses(jnp.stack([e0, e1]), y)[name]

    for name in ("vcl", "icl", "soft_vcl", "soft_icl"):
        g0, g1 = jax.grad(lambda a, b, k=name: term(k, a, b), argnums=(0, 1))(emb[0], emb[1])
        assert float(jnp.abs(g0).sum()) > 0 and float(jnp.abs(g1).sum()) > 0, name
    # ICL of the (0, 1) direction alone reaches both networks (anchor and contrast side).
    z = losses.l2_normalize
    g = jax.grad(lambda b: losses._masked_supcon(
        z(emb[0]) @ z(b).T / 0.1, (y[:, None] == y[None]) & ~jnp.eye(8, dtype=bool),
        ~jnp.eye(8, dtype=bool)))(emb[1])
    assert float(jnp.abs(g).sum()) > 0
    # KL target stop-gradient: d KL(s <- t) / dt == 0, while d / ds != 0.
    s, t = emb[0] @ emb[1].T, emb[1] @ emb[0].T
    g_s, g_t = jax.grad(losses.kl_div_t, argnums=(0, 1))(s, t, 3.0)
    assert float(jnp.abs(g_t).sum()) == 0.0 and float(jnp.abs(g_s).sum()) > 0


def np_mcl_bank_losses(emb, contrast, tau, kd_temp, pos_k):
    z = [_np_normalize(e) for e in emb]
    m = len(z)

    def sim(anchor, bank, start=0):
        return np.einsum("nd,nkd->nk", z[anchor], contrast[bank][:, start:]) / tau

    def ce(logits, p):
        return -_np_log_softmax(logits)[:, :p].mean(axis=1).mean()

    out = dict(vcl=0.0, icl=0.0, soft_vcl=0.0, soft_icl=0.0)
    for a in range(m):
        out["vcl"] += ce(sim(a, a, 1), pos_k)
        for b in range(m):
            if a != b:
                out["soft_vcl"] += _np_kl(sim(a, a, 1), sim(b, b, 1), kd_temp)
            if a < b:
                ab, ba = sim(b, a), sim(a, b)
                out["icl"] += ce(ab, 1 + pos_k) + ce(ba, 1 + pos_k)
                out["soft_icl"] += _np_kl(ab, ba, kd_temp) + _np_kl(ba, ab, kd_temp)
    return out


@pytest.mark.parametrize("m,pos_k", [(2, 1), (3, 2)])
def test_mcl_bank_losses_match_numpy(m, pos_k):
    rng = np.random.default_rng(m)
    emb = rng.normal(size=(m, 6, 16))
    s = 1.0 / np.sqrt(16 / 3)
    contrast = rng.uniform(-s, s, size=(m, 6, 1 + pos_k + 20, 16))  # bank rows, not normalised
    got = losses.mcl_bank_losses(jnp.asarray(emb, jnp.float32), jnp.asarray(contrast, jnp.float32),
                                 0.07, 3.0, pos_k)
    _assert_terms(got, np_mcl_bank_losses(emb, contrast, 0.07, 3.0, pos_k))


def test_bank_update_momentum_and_normalisation():
    rng = np.random.default_rng(0)
    bank = rng.uniform(-0.5, 0.5, size=(10, 4))
    z = rng.normal(size=(3, 4))
    idx = np.array([7, 2, 4])
    got = np.asarray(losses.bank_update(jnp.asarray(bank, jnp.float32), jnp.asarray(idx),
                                        jnp.asarray(z, jnp.float32), 0.5))
    want = bank.copy()
    want[idx] = _np_normalize(0.5 * bank[idx] + 0.5 * _np_normalize(z))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def np_mcl_moco_losses(q, k, queues, temp, kd_temp):
    q, k = [_np_normalize(x) for x in q], [_np_normalize(x) for x in k]
    m = len(q)

    def logits(a, b):
        return np.concatenate([(q[a] * k[b]).sum(1, keepdims=True), q[a] @ queues[b].T], 1) / temp

    def ce(x):
        return -_np_log_softmax(x)[:, 0].mean()

    out = dict(vcl=0.0, icl=0.0, soft_vcl=0.0, soft_icl=0.0)
    for a in range(m):
        out["vcl"] += ce(logits(a, a))
        for b in range(m):
            if a != b:
                out["soft_vcl"] += _np_kl(logits(a, a), logits(b, b), kd_temp)
            if a < b:
                out["icl"] += ce(logits(a, b)) + ce(logits(b, a))
                out["soft_icl"] += _np_kl(logits(a, b), logits(b, a), kd_temp)
                out["soft_icl"] += _np_kl(logits(b, a), logits(a, b), kd_temp)
    return out


@pytest.mark.parametrize("m", [2, 3])
def test_mcl_moco_losses_match_numpy_and_stop_key_gradients(m):
    rng = np.random.default_rng(10 + m)
    q, k = rng.normal(size=(m, 8, 16)), rng.normal(size=(m, 8, 16))
    queues = np.stack([_np_normalize(rng.normal(size=(32, 16))) for _ in range(m)])
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, queues)]
    _assert_terms(losses.mcl_moco_losses(*args, 0.07, 3.0),
                  np_mcl_moco_losses(q, k, queues, 0.07, 3.0))
    g_q, g_k = jax.grad(lambda a, b: sum(losses.mcl_moco_losses(a, b, args[2]).values()),
                        argnums=(0, 1))(args[0], args[1])
    assert float(jnp.abs(g_k).sum()) == 0.0 and float(jnp.abs(g_q).sum()) > 0
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
