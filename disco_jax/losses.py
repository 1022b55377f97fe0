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
