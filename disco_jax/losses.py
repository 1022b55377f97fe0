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


def disco_loss(
    q: Array,
    k: Array,
    queue: Array,
    q_on_key_view: Array,
    teacher_q: Array,
    teacher_k: Array,
    temp: float = 0.2,
    distill_weight: float = 1.0,
    distill_reduction: str = "sum",
) -> dict[str, Array]:
    """DisCo (Yuting-Gao/DisCo-pytorch `builder_kq_mse_largeembedding_2048.py`).

    MoCo InfoNCE of the query q against its momentum key k and the queue, plus the MSE between
    the unit-norm student and teacher embeddings of both views: q vs teacher_q and
    q_on_key_view (the query encoder on the key view) vs teacher_k.

    `distill_reduction="sum"` is the official `MSELoss(reduction='sum')`: summed over the rows
    given and the D dimensions (not averaged); "mean" divides that sum by the batch size.
    total = contrastive + distill_weight * (distill_q + distill_k). Gradients reach q and
    q_on_key_view only (k, the teachers and the queue are constants).
    """
    if distill_reduction not in ("sum", "mean"):
        raise ValueError(f"distill_reduction must be 'sum' or 'mean', got {distill_reduction!r}")
    contrastive = moco_loss(q, k, queue, temp)

    def mse(student: Array, teacher: Array) -> Array:
        diff = l2_normalize(student) - jax.lax.stop_gradient(l2_normalize(teacher))
        total = jnp.sum(diff * diff)
        return total / student.shape[0] if distill_reduction == "mean" else total

    distill_q = mse(q, teacher_q)
    distill_k = mse(q_on_key_view, teacher_k)
    distill = distill_q + distill_k
    return {
        "contrastive": contrastive,
        "distill_q": distill_q,
        "distill_k": distill_k,
        "distill": distill,
        "total": contrastive + distill_weight * distill,
    }


def kd_loss(student_logits: Array, teacher_logits: Array, temp: float = 4.0) -> Array:
    """Hinton KD: T^2 * mean_n KL(softmax(t/T) || softmax(s/T)); the teacher is a constant.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al. 2015).
    """
    log_p_t = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temp, axis=-1
    )
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temp, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return temp * temp * jnp.mean(kl)


def embedding_l2_loss(student_emb: Array, teacher_emb: Array) -> Array:
    """Plain regression of the raw teacher embedding: mean_n ||s - t||^2 (no normalisation)."""
    diff = student_emb.astype(jnp.float32) - jax.lax.stop_gradient(teacher_emb).astype(
        jnp.float32
    )
    return jnp.mean(jnp.sum(diff * diff, axis=-1))


def cosine_loss(student_emb: Array, teacher_emb: Array) -> Array:
    """mean_n (1 - cos(s, t)); the teacher is a constant."""
    s = l2_normalize(student_emb)
    t = jax.lax.stop_gradient(l2_normalize(teacher_emb))
    return jnp.mean(1.0 - jnp.sum(s * t, axis=-1))
