"""Pure, jittable loss functions (public API).

Conventions shared by every function here:
- Embeddings come in NOT normalised; each function L2-normalises them itself (max(||x||, 1e-12),
  as torch.nn.functional.normalize does).
- Queues are `(K, D)` arrays of unit-norm rows, treated as constants (stop_gradient).
- Everything is computed in float32, whatever dtype the model ran in: SEED divides by a teacher
  temperature of 1e-4, so its logits reach 1e4 and must not be formed in bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """Row-wise L2 normalisation in float32, like torch.nn.functional.normalize."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _logits_with_positive(anchor: Array, positive: Array, queue: Array) -> Array:
    """[anchor . positive, anchor . queue] -> (N, 1 + K), positive in column 0."""
    pos = jnp.sum(anchor * positive, axis=-1, keepdims=True)
    neg = anchor @ queue.astype(jnp.float32).T
    return jnp.concatenate([pos, neg], axis=1)


def seed_loss(
    student_emb: Array,
    teacher_emb: Array,
    queue: Array,
    student_temp: float = 0.2,
    teacher_temp: float = 1e-4,
) -> Array:
    """SEED soft cross-entropy (jacobswan1/SEED `seed/builder.py`).

    Student and teacher both score the current teacher embedding (column 0) and the queue of
    earlier teacher embeddings (columns 1..K); the student's log-softmax at `student_temp` is
    trained towards the teacher's softmax at `teacher_temp`. Batch mean of the sum over 1+K.
    Gradients reach only `student_emb`.
    """
    s = l2_normalize(student_emb)
    t = jax.lax.stop_gradient(l2_normalize(teacher_emb))
    q = jax.lax.stop_gradient(queue.astype(jnp.float32))
    student_logits = _logits_with_positive(s, t, q) / student_temp
    teacher_logits = _logits_with_positive(t, t, q) / teacher_temp
    target = jax.nn.softmax(teacher_logits, axis=-1)
    return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(student_logits, axis=-1), axis=-1))


def moco_loss(q: Array, k: Array, queue: Array, temp: float = 0.2) -> Array:
    """MoCo InfoNCE: cross-entropy with the key `k` in column 0 and the queue as negatives.

    Batch mean over the given rows. Gradients reach only `q` (keys come from the momentum
    encoder and the queue is a constant).
    """
    qn = l2_normalize(q)
    kn = jax.lax.stop_gradient(l2_normalize(k))
    logits = _logits_with_positive(qn, kn, jax.lax.stop_gradient(queue)) / temp
    return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])


def ssld_loss(
    student_logits: Array, teacher_logits: Array, temperature: float = 1.0, eps: float = 0.0
) -> Array:
    """SSLD's "JS divergence" (PaddleClas `JSDivLoss` 2020 / `DMLLoss` now): half the symmetric
    KL between the class distributions, batch mean of the class sum.

    L = 1/N sum_n sum_c 1/2 [p_t log((p_t+eps)/(p_s+eps)) + p_s log((p_s+eps)/(p_t+eps))],
    p = softmax(logits / temperature). eps=0 is the 2020 code, 1e-12 the current one (with eps=0
    log-probabilities are taken from log_softmax, so no probability underflows to log 0).
    The teacher is a constant (stop_gradient); the student receives gradients through both terms.
    """
    s = student_logits.astype(jnp.float32) / temperature
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    ps, pt = jax.nn.softmax(s, axis=-1), jax.nn.softmax(t, axis=-1)
    if eps:
        log_ratio = jnp.log(pt + eps) - jnp.log(ps + eps)
    else:
        log_ratio = jax.nn.log_softmax(t, axis=-1) - jax.nn.log_softmax(s, axis=-1)
    # pt log(pt/ps) + ps log(ps/pt) = (pt - ps) log(pt/ps)
    return jnp.mean(jnp.sum(0.5 * (pt - ps) * log_ratio, axis=-1))


def simclr_loss(z1: Array, z2: Array, temp: float = 0.1) -> Array:
    """SimCLR NT-Xent over the batch (google-research/simclr `objective.py: add_contrastive_loss`).

    For view-1 row i the positive is view-2 row i; the negatives are every other row of both
    views (2N - 2), its own similarity is masked out. Returns mean_i(loss_a_i + loss_b_i), the
    official reduction (the sum of the two directions' batch means). Under jit the batch is the
    global batch, which is what the official cross-replica all-gather builds.
    """
    h1, h2 = l2_normalize(z1), l2_normalize(z2)
    n = h1.shape[0]
    self_mask = jnp.eye(n, dtype=bool)
    neg_inf = jnp.finfo(jnp.float32).min

    def direction(a: Array, b: Array) -> Array:
        logits_ab = a @ b.T / temp
        logits_aa = jnp.where(self_mask, neg_inf, a @ a.T / temp)
        logp = jax.nn.log_softmax(jnp.concatenate([logits_ab, logits_aa], axis=1), axis=-1)
        return -jnp.diagonal(logp[:, :n])

    return jnp.mean(direction(h1, h2) + direction(h2, h1))


def byol_loss(p: Array, z: Array) -> Array:
    """BYOL regression loss: batch mean of 2 - 2 cos(p, z); the target `z` is a constant."""
    pn = l2_normalize(p)
    zn = jax.lax.stop_gradient(l2_normalize(z))
    return jnp.mean(2.0 - 2.0 * jnp.sum(pn * zn, axis=-1))
