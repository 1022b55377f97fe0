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


# ------------------------------------------------------------------------------------------
# MCL (winycg/MCL): mutual contrastive learning of a cohort of M networks. Shapes: (M, N, D)
# embeddings, one row block per network. Every function returns the four unweighted terms
# {"vcl", "icl", "soft_vcl", "soft_icl"}; the method weights them.


def kl_div_t(student_logits: Array, target_logits: Array, temp: float) -> Array:
    """T^2 * batch mean of KL(softmax(t/T) || softmax(s/T)) over full rows; target detached.

    torch: F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T**2.
    """
    s = student_logits.astype(jnp.float32) / temp
    t = jax.lax.stop_gradient(target_logits.astype(jnp.float32)) / temp
    log_p_t = jax.nn.log_softmax(t, axis=-1)
    log_p_s = jax.nn.log_softmax(s, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return temp**2 * jnp.mean(kl)


def _masked_supcon(logits: Array, positives: Array, valid: Array) -> Array:
    """-(1/N) sum_n mean_{j in P(n)} [l_nj - log sum_{k valid} exp l_nk].

    An anchor with no positive contributes 0 (the official code gives NaN there; the class
    sampler makes that case impossible, the guard only keeps a stray batch finite).
    """
    masked = jnp.where(valid, logits, -jnp.inf)
    log_prob = logits - jax.nn.logsumexp(masked, axis=-1, keepdims=True)
    pos = positives.astype(jnp.float32)
    per_anchor = jnp.sum(jnp.where(positives, log_prob, 0.0), axis=-1)
    per_anchor = per_anchor / jnp.maximum(jnp.sum(pos, axis=-1), 1.0)
    return -jnp.mean(per_anchor)


def _first_columns_ce(logits: Array, num_pos: int) -> Array:
    """Contrastive loss whose positives are the first `num_pos` columns, denominator all."""
    log_prob = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.mean(log_prob[:, :num_pos], axis=-1))


def mcl_losses(
    embeddings: Array, labels: Array, tau: float = 0.1, kd_temp: float = 3.0
) -> dict[str, Array]:
    """In-batch supervised MCL terms (`losses/cifar_sup_mcl_loss.py`, methods.md §4.1).

    `embeddings` (M, N, D), not normalised; `labels` (N,). SupCon masks for every similarity
    matrix, within and across networks: positives are the other same-class samples, the
    denominator every j != n. So the cross-network diagonal (the same image in the other
    network) is in neither numerator nor denominator, as in the official code. VCL / ICL
    back-propagate through both sides; the soft terms (KL at `kd_temp`, over full rows with the
    diagonal, applied to logits already divided by `tau`) only through the student row.
    """
    z = l2_normalize(embeddings)
    m, n = z.shape[0], z.shape[1]
    eye = jnp.eye(n, dtype=bool)
    same = labels[:, None] == labels[None, :]
    positives, valid = same & ~eye, ~eye

    def sim(a: int, b: int) -> Array:
        return z[a] @ z[b].T / tau

    own = [sim(a, a) for a in range(m)]
    vcl = sum(_masked_supcon(own[a], positives, valid) for a in range(m))
    soft_vcl = sum(kl_div_t(own[a], own[b], kd_temp) for a in range(m) for b in range(m) if a != b)
    icl, soft_icl = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for a in range(m):
        for b in range(a + 1, m):
            ab, ba = sim(a, b), sim(b, a)
            icl += _masked_supcon(ab, positives, valid) + _masked_supcon(ba, positives, valid)
            soft_icl += kl_div_t(ab, ba, kd_temp) + kl_div_t(ba, ab, kd_temp)
    return {"vcl": vcl, "icl": icl, "soft_vcl": soft_vcl, "soft_icl": soft_icl}


def mcl_bank_losses(
    embeddings: Array, contrast: Array, tau: float = 0.07, kd_temp: float = 3.0, pos_k: int = 1
) -> dict[str, Array]:
    """Memory-bank MCL terms (`losses/imagenet_sup_mcl_loss.py`, methods.md §4.2).

    `embeddings` (M, N, D) anchors (normalised here); `contrast` (M, N, 1 + pos_k + neg_k, D):
    bank m's rows at idx = [own index | pos_k same-class | neg_k other-class], used as they are
    (bank rows are not re-normalised, and are constants). ICL for a < b: anchor z_b against
    bank a and z_a against bank b, positives = the first 1 + pos_k columns (own row included).
    VCL for m: z_m against bank m without the own row, positives = the first pos_k columns.
    """
    z = l2_normalize(embeddings)
    c = jax.lax.stop_gradient(contrast.astype(jnp.float32))
    m = z.shape[0]

    def sim(anchor: int, bank: int, start: int = 0) -> Array:
        return jnp.einsum("nd,nkd->nk", z[anchor], c[bank, :, start:]) / tau

    own = [sim(a, a, start=1) for a in range(m)]
    vcl = sum(_first_columns_ce(own[a], pos_k) for a in range(m))
    soft_vcl = sum(kl_div_t(own[a], own[b], kd_temp) for a in range(m) for b in range(m) if a != b)
    icl, soft_icl = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for a in range(m):
        for b in range(a + 1, m):
            ab, ba = sim(b, a), sim(a, b)
            icl += _first_columns_ce(ab, 1 + pos_k) + _first_columns_ce(ba, 1 + pos_k)
            soft_icl += kl_div_t(ab, ba, kd_temp) + kl_div_t(ba, ab, kd_temp)
    return {"vcl": vcl, "icl": icl, "soft_vcl": soft_vcl, "soft_icl": soft_icl}


def bank_update(bank: Array, index: Array, embedding: Array, momentum: float = 0.5) -> Array:
    """Row idx <- normalize(momentum * row + (1 - momentum) * z); z normalised first, detached."""
    z = jax.lax.stop_gradient(l2_normalize(embedding))
    rows = momentum * bank[index].astype(jnp.float32) + (1.0 - momentum) * z
    return bank.at[index].set(l2_normalize(rows).astype(bank.dtype))


def mcl_moco_losses(
    q: Array, k: Array, queues: Array, temp: float = 0.07, kd_temp: float = 3.0
) -> dict[str, Array]:
    """MCL on MoCo (`moco/builder_mcl.py`, methods.md §4.3).

    `q`, `k` (M, N, D) queries and momentum keys (normalised here), `queues` (M, K, D) unit
    rows. intra_m = [q_m.k_m, q_m.Q_m]/T, inter_ab = [q_a.k_b, q_a.Q_b]/T; VCL = sum_m CE(intra_m,
    0), ICL = sum_{a<b} CE(inter_ab, 0) + CE(inter_ba, 0); soft terms are KL at `kd_temp` between
    the corresponding rows (SoftVCL over ordered pairs a != b). Gradients reach only `q`.
    """
    qn = l2_normalize(q)
    kn = jax.lax.stop_gradient(l2_normalize(k))
    qs = jax.lax.stop_gradient(queues.astype(jnp.float32))
    m = qn.shape[0]

    def logits(a: int, b: int) -> Array:
        return _logits_with_positive(qn[a], kn[b], qs[b]) / temp

    intra = [logits(a, a) for a in range(m)]
    vcl = sum(_first_columns_ce(intra[a], 1) for a in range(m))
    soft_vcl = sum(
        kl_div_t(intra[a], intra[b], kd_temp) for a in range(m) for b in range(m) if a != b
    )
    icl, soft_icl = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for a in range(m):
        for b in range(a + 1, m):
            ab, ba = logits(a, b), logits(b, a)
            icl += _first_columns_ce(ab, 1) + _first_columns_ce(ba, 1)
            soft_icl += kl_div_t(ab, ba, kd_temp) + kl_div_t(ba, ab, kd_temp)
    return {"vcl": vcl, "icl": icl, "soft_vcl": soft_vcl, "soft_icl": soft_icl}
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


# ------------------------------------------------------------------------------------------
# L-MCL (winycg/L-MCL, TPAMI-23): the MCL terms between every stage of a network and every
# stage of another, each pair weighted per anchor. Shapes: (M, S, N, D) embeddings (network,
# stage, batch), (P, N) weights in `lmcl_pairs` order. Unweighted by alpha ... lam, like MCL's.


def lmcl_pairs(num_nets: int, num_stages: int) -> list[tuple[int, int, int, int]]:
    """(i, k, j, z): network i's stage k with network j's stage z, for every j != i and every
    k, z, in the official loop order (``Sup_MCL_Loss_Meta.forward``, ``LossWeightNetwork``)."""
    return [(i, k, j, z) for i in range(num_nets) for j in range(num_nets) if i != j
            for k in range(num_stages) for z in range(num_stages)]


def _kl_rows(student_logits: Array, target_logits: Array, temp: float) -> Array:
    """(..., N): T^2 KL(softmax(t/T) || softmax(s/T)) per row, over full rows; target detached."""
    s = student_logits.astype(jnp.float32) / temp
    t = jax.lax.stop_gradient(target_logits.astype(jnp.float32)) / temp
    log_p_t = jax.nn.log_softmax(t, axis=-1)
    return temp**2 * jnp.sum(jnp.exp(log_p_t) * (log_p_t - jax.nn.log_softmax(s, axis=-1)), -1)


def _supcon_rows(logits: Array, positives: Array, valid: Array) -> Array:
    """(..., N): mean over P(n) of [l_nj - log sum_{k valid} exp l_nk] (0 if P(n) is empty)."""
    masked = jnp.where(valid, logits, -jnp.inf)
    log_prob = logits - jax.nn.logsumexp(masked, axis=-1, keepdims=True)
    per_anchor = jnp.sum(jnp.where(positives, log_prob, 0.0), axis=-1)
    return per_anchor / jnp.maximum(jnp.sum(positives.astype(jnp.float32), axis=-1), 1.0)


def _first_columns_rows(logits: Array, num_pos: int) -> Array:
    """(..., N): mean log-softmax of the first `num_pos` columns (the positives)."""
    return jnp.mean(jax.nn.log_softmax(logits, axis=-1)[..., :num_pos], axis=-1)


def _pair_index(num_nets: int, num_stages: int) -> tuple[Array, Array]:
    """Flat (network * S + stage) indices of the first and second member of every pair."""
    pairs = lmcl_pairs(num_nets, num_stages)
    first = jnp.asarray([i * num_stages + k for i, k, _, _ in pairs])
    second = jnp.asarray([j * num_stages + z for _, _, j, z in pairs])
    return first, second


def _weighted_mean(w: Array, rows: Array) -> Array:
    """sum over pairs of the batch mean of w * rows; (P, N) each."""
    return jnp.sum(jnp.mean(w * rows, axis=-1))


def lmcl_losses(
    embeddings: Array, labels: Array, weights: Array, tau: float = 0.1, kd_temp: float = 3.0
) -> dict[str, Array]:
    """In-batch L-MCL terms (`losses/cifar_sup_layer_mcl_meta_loss.py`, methods.md §4.4).

    For every pair (i, k, j, z) with weights w (N,): MCL's in-batch VCL / SoftVCL / ICL /
    SoftICL (`mcl_losses`: SupCon masks within and across networks, the cross-network diagonal
    in neither numerator nor denominator; KL at `kd_temp` over full rows, target detached) of
    a = z_ik and b = z_jz, with VCL = VCL(a) + VCL(b) and SoftVCL both directions, and every
    anchor's term times w_n; normalisers unchanged (the batch mean, |P(n)|). Each ordered pair
    and its reverse are both summed, as the official double loop does. `weights` are used as
    given (the caller detaches them where the official code does). All pairs at once, as
    (P, N, N) blocks.
    """
    z = l2_normalize(embeddings)
    m, s, n, d = z.shape
    flat = z.reshape(m * s, n, d)
    first, second = _pair_index(m, s)
    w = weights.astype(jnp.float32)
    eye = jnp.eye(n, dtype=bool)
    positives, valid = (labels[:, None] == labels[None, :]) & ~eye, ~eye
    own = jnp.einsum("cnd,cmd->cnm", flat, flat) / tau  # (M S, N, N)
    own_rows = _supcon_rows(own, positives, valid)  # (M S, N)
    a, b = own[first], own[second]
    ab = jnp.einsum("pnd,pmd->pnm", flat[first], flat[second]) / tau
    ba = jnp.swapaxes(ab, 1, 2)  # z_b z_a^T
    return {
        "vcl": -_weighted_mean(w, own_rows[first]) - _weighted_mean(w, own_rows[second]),
        "soft_vcl": (_weighted_mean(w, _kl_rows(a, b, kd_temp))
                     + _weighted_mean(w, _kl_rows(b, a, kd_temp))),
        "icl": (-_weighted_mean(w, _supcon_rows(ab, positives, valid))
                - _weighted_mean(w, _supcon_rows(ba, positives, valid))),
        "soft_icl": (_weighted_mean(w, _kl_rows(ab, ba, kd_temp))
                     + _weighted_mean(w, _kl_rows(ba, ab, kd_temp))),
    }


def lmcl_bank_losses(
    embeddings: Array,
    contrast: Array,
    weights: Array,
    tau: float = 0.07,
    kd_temp: float = 3.0,
    pos_k: int = 1,
    vcl_bank: str = "first",
) -> dict[str, Array]:
    """Memory-bank L-MCL terms (`losses/imagenet_sup_layer_mcl_meta_loss.py`, §4.4).

    `embeddings` (M, S, N, D) anchors (normalised here); `contrast` (M, N, 1 + pos_k + neg_k,
    D): bank m's rows at [own | pos_k same-class | neg_k other-class], constants. For a pair
    (i, k, j, z) with a = z_ik, b = z_jz: ICL = CE(b vs bank i) + CE(a vs bank j), positives
    the first 1 + pos_k columns; SoftICL the KL between those two rows both ways; VCL over the
    columns without the own row, positives the first pos_k: a against bank i and b against
    bank i too (`vcl_bank="first"`, the official ``memory_ + str(a)`` on both lines) or its own
    bank j (`"own"`); SoftVCL the KL between those two rows both ways. Per-anchor weights as in
    `lmcl_losses`.
    """
    if vcl_bank not in ("first", "own"):
        raise ValueError(f"vcl_bank must be 'first' or 'own', got {vcl_bank!r}")
    z = l2_normalize(embeddings)
    c = jax.lax.stop_gradient(contrast.astype(jnp.float32))
    m, s, n, d = z.shape
    pairs = lmcl_pairs(m, s)
    first, second = _pair_index(m, s)
    net_i = jnp.asarray([i for i, _, _, _ in pairs])
    net_j = jnp.asarray([j for _, _, j, _ in pairs])
    w = weights.astype(jnp.float32)
    # Every (network, stage) embedding against every bank: (M S, M, N, K).
    sim = jnp.einsum("cnd,bnkd->cbnk", z.reshape(m * s, n, d), c) / tau
    ij, ji = sim[second, net_i], sim[first, net_j]
    va = sim[first, net_i, :, 1:]
    vb = sim[second, net_i if vcl_bank == "first" else net_j, :, 1:]
    return {
        "vcl": (-_weighted_mean(w, _first_columns_rows(va, pos_k))
                - _weighted_mean(w, _first_columns_rows(vb, pos_k))),
        "soft_vcl": (_weighted_mean(w, _kl_rows(va, vb, kd_temp))
                     + _weighted_mean(w, _kl_rows(vb, va, kd_temp))),
        "icl": (-_weighted_mean(w, _first_columns_rows(ij, 1 + pos_k))
                - _weighted_mean(w, _first_columns_rows(ji, 1 + pos_k))),
        "soft_icl": (_weighted_mean(w, _kl_rows(ij, ji, kd_temp))
                     + _weighted_mean(w, _kl_rows(ji, ij, kd_temp))),
    }
