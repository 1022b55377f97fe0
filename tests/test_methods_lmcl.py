"""L-MCL (winycg/L-MCL): the layer-wise losses and pair weights against NumPy (float64) references
written from the official code, the MetaSGD hypergradient against the official recursion and
the chain rule, the backbones' stage outputs, and each config's smoke variant end to end."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from disco_jax import checkpoint, data, losses, methods, models, optim, sharding, train
from disco_jax.errors import ConfigError
from disco_jax.methods import lmcl
from disco_jax.methods.common import output_batch_axes, train_forward
from disco_jax.models import cifar, heads, resnet
from disco_jax.models import lmcl as lmcl_models
from disco_jax.models.lmcl import (
    Aggregator,
    AuxiliaryBranches,
    LMCLCohort,
    LMCLNet,
    LossWeightNet,
    aux_plan,
    build_lmcl_cohort,
)
from tests.helpers import TINY_NET, load_config, read_metrics, tiny_nets

# float32 logits z_a.z_b / tau of unit vectors carry at most ~D * 2^-24 / tau absolute error
# (D = 16, tau = 0.1: 1e-5), and so do the log-softmax rows built from them; every term is a
# sum of <= 4 * P batch means of such rows (|term| >= 1 here), hence the relative tolerance.
RTOL32 = 2e-5


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _log_softmax(x):
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def _np_kl(ys, yt, w, t):
    """Official KLDiv(T)(y_s, y_t, weights): T^2 * sum(w * p_t * (log p_t - log p_s)) / N."""
    log_p_s, log_p_t = _log_softmax(ys / t), _log_softmax(yt / t)
    return t**2 * (w * np.exp(log_p_t) * (log_p_t - log_p_s)).sum() / ys.shape[0]


def _np_pairs(m, s):
    out = []
    for i in range(m):
        for j in range(m):
            if i == j:
                continue
            for k in range(s):
                for z in range(s):
                    out.append((i, k, j, z))
    return out


def _np_supmcl(ea, eb, labels, w, tau, t):
    """`SupMCL.forward` of losses/cifar_sup_layer_mcl_meta_loss.py, line by line."""
    n = len(labels)
    intra_mask = (labels[None, :] == labels[:, None]).astype(np.float64) - np.eye(n)
    diag_mask = 1.0 - np.eye(n)
    w = w[:, None]

    def con(logit):
        log_prob = logit - np.log((np.exp(logit) * diag_mask).sum(1, keepdims=True))
        return -((intra_mask * log_prob * w).sum(1) / intra_mask.sum(1)).mean()

    ij, ji = ea @ eb.T / tau, eb @ ea.T / tau
    aa, bb = ea @ ea.T / tau, eb @ eb.T / tau
    return (con(aa) + con(bb), _np_kl(aa, bb, w, t) + _np_kl(bb, aa, w, t),
            con(ij) + con(ji), _np_kl(ij, ji, w, t) + _np_kl(ji, ij, w, t))


def _np_lmcl(emb, labels, weights, tau, t):
    """`Sup_MCL_Loss_Meta.forward`: the pair loop over (i, j != i, k, z)."""
    e = _unit(emb.astype(np.float64))
    total = np.zeros(4)
    for p, (i, k, j, z) in enumerate(_np_pairs(e.shape[0], e.shape[1])):
        total += _np_supmcl(e[i, k], e[j, z], labels, weights[p].astype(np.float64), tau, t)
    return dict(zip(("vcl", "soft_vcl", "icl", "soft_icl"), total, strict=True))


def _np_contrast(ea, eb, a, b, memory, idx, w, tau, t, pos_k, quirk):
    """`ContrastMemory.forward` of losses/imagenet_sup_layer_mcl_meta_loss.py."""
    w = w[:, None]

    def con(logit, npos):
        mask = np.zeros_like(logit)
        mask[:, :npos] = 1.0
        log_prob = logit - np.log(np.exp(logit).sum(1, keepdims=True))
        return -((mask * log_prob * w).sum(1) / mask.sum(1)).mean()

    ij = np.einsum("nkd,nd->nk", memory[a][idx], eb) / tau
    ji = np.einsum("nkd,nd->nk", memory[b][idx], ea) / tau
    soft_icl = _np_kl(ij, ji, w, t) + _np_kl(ji, ij, w, t)
    icl = con(ij, pos_k + 1) + con(ji, pos_k + 1)
    rest = idx[:, 1:]
    va = np.einsum("nkd,nd->nk", memory[a][rest], ea) / tau
    vb = np.einsum("nkd,nd->nk", memory[a if quirk else b][rest], eb) / tau
    soft_vcl = _np_kl(va, vb, w, t) + _np_kl(vb, va, w, t)
    return con(va, pos_k) + con(vb, pos_k), soft_vcl, icl, soft_icl


# ------------------------------------------------------------------------------ losses


def test_in_batch_losses_match_the_official_pair_loop():
    rng = np.random.default_rng(0)
    m, s, n, d = 3, 2, 8, 16
    emb = rng.normal(size=(m, s, n, d)).astype(np.float32)
    labels = np.repeat(np.arange(4), 2)[rng.permutation(n)]  # the class sampler: 2 per class
    weights = rng.uniform(0.27, 0.73, size=(m * (m - 1) * s * s, n)).astype(np.float32)
    got = losses.lmcl_losses(jnp.asarray(emb), jnp.asarray(labels), jnp.asarray(weights),
                             0.1, 3.0)
    want = _np_lmcl(emb, labels, weights, 0.1, 3.0)
    for key in want:
        np.testing.assert_allclose(float(got[key]), want[key], rtol=RTOL32, err_msg=key)
    # The pair order matters: weights of another pair order give other terms.
    shuffled = losses.lmcl_losses(jnp.asarray(emb), jnp.asarray(labels),
                                  jnp.asarray(weights[::-1]), 0.1, 3.0)
    assert abs(float(shuffled["icl"]) - want["icl"]) > 100 * RTOL32 * abs(want["icl"])


def test_one_stage_with_unit_weights_is_twice_mcl():
    # S = 1, w = 1: each unordered network pair is summed twice (once per order) -> 2x MCL.
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(2, 1, 8, 16)).astype(np.float32)
    labels = jnp.asarray(np.repeat(np.arange(4), 2))
    got = losses.lmcl_losses(jnp.asarray(emb), labels, jnp.ones((2, 8)), 0.1, 3.0)
    ref = losses.mcl_losses(jnp.asarray(emb[:, 0]), labels, 0.1, 3.0)
    for key in ref:
        np.testing.assert_allclose(float(got[key]), 2 * float(ref[key]), rtol=RTOL32)


@pytest.mark.parametrize("vcl_bank", ["first", "own"])
def test_bank_losses_match_the_official_contrast_memory(vcl_bank):
    rng = np.random.default_rng(2)
    m, s, n, d, n_data, pos_k, neg_k = 2, 2, 6, 16, 30, 1, 5
    emb = rng.normal(size=(m, s, n, d)).astype(np.float32)
    memory = rng.uniform(-0.3, 0.3, size=(m, n_data, d)).astype(np.float32)  # not normalised
    idx = rng.integers(0, n_data, size=(n, 1 + pos_k + neg_k))
    weights = rng.uniform(0.27, 0.73, size=(m * (m - 1) * s * s, n)).astype(np.float32)
    contrast = jnp.stack([jnp.asarray(memory[b])[idx] for b in range(m)])
    got = losses.lmcl_bank_losses(jnp.asarray(emb), contrast, jnp.asarray(weights), 0.07, 3.0,
                                  pos_k, vcl_bank)
    e, mem = _unit(emb.astype(np.float64)), memory.astype(np.float64)
    total = np.zeros(4)
    for p, (i, k, j, z) in enumerate(_np_pairs(m, s)):
        total += _np_contrast(e[i, k], e[j, z], i, j, mem, idx, weights[p].astype(np.float64),
                              0.07, 3.0, pos_k, vcl_bank == "first")
    for key, want in zip(("vcl", "soft_vcl", "icl", "soft_icl"), total, strict=True):
        # tau 0.07 and |bank rows| <= 0.3 sqrt(D): the same float32 bound, 1.4x the 0.1 case.
        np.testing.assert_allclose(float(got[key]), want, rtol=2 * RTOL32, err_msg=key)


def test_weight_net_and_aggregator_match_numpy():
    rng = np.random.default_rng(3)
    m, s, n, d, c = 2, 3, 5, 6, 4
    feats = rng.normal(size=(m, s, n, d)).astype(np.float32)
    net = LossWeightNet(m, s)
    params = net.init(jax.random.PRNGKey(0), jnp.asarray(feats))["params"]
    got = np.asarray(net.apply({"params": params}, jnp.asarray(feats)))
    proj = [[feats[i, k].astype(np.float64) @ np.asarray(params[f"proj_{i}_{k}"]["kernel"])
             + np.asarray(params[f"proj_{i}_{k}"]["bias"]) for k in range(s)] for i in range(m)]
    want = [1 / (1 + np.exp(-np.sum(_unit(proj[i][k]) * _unit(proj[j][z]), -1)))
            for i, k, j, z in _np_pairs(m, s)]
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5)
    assert got.shape == (m * (m - 1) * s * s, n)

    logits = rng.normal(size=(m, s, n, c)).astype(np.float32)
    agg = Aggregator(m)
    p = agg.init(jax.random.PRNGKey(1), jnp.asarray(feats), jnp.asarray(logits))["params"]
    got = np.asarray(agg.apply({"params": p}, jnp.asarray(feats), jnp.asarray(logits)))
    for i in range(m):
        x = np.concatenate(list(feats[i]), axis=1).astype(np.float64)  # torch.cat(dim=1)
        h = np.maximum(x @ p[f"proj_head_{i}_0"]["kernel"] + p[f"proj_head_{i}_0"]["bias"], 0)
        a = h @ p[f"proj_head_{i}_2"]["kernel"] + p[f"proj_head_{i}_2"]["bias"]
        w = np.exp(a - a.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        want = sum(logits[i, k] * w[:, k:k + 1] for k in range(s))
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ meta step


def _toy():
    """The official `test_metaSGD` problem (losses/meta_optimizers.py)."""
    theta = {"v1": jnp.array([1.0, 3.0]), "v2": jnp.array([[-1.0, -2.0], [1.0, 0.0]])}
    lam = jnp.array([[0.3, -0.2], [0.5, 0.1]])

    def inner(th, lm):
        return jnp.mean(th["v1"] ** 2) + jnp.sum(lm * th["v2"] ** 2)

    def outer(th, lm):
        return jnp.mean(th["v1"] * th["v2"])

    return theta, lam, inner, outer


def _np_meta_sgd(theta, lam, steps, lr, mu, wd):
    """MetaSGD.step x steps on the inner objective, one on the outer, then meta_backward; the
    gradients and Hessian-vector products of the toy written out by hand."""
    v1, v2, lam = (np.asarray(theta["v1"], np.float64), np.asarray(theta["v2"], np.float64),
                   np.asarray(lam, np.float64))

    def grad(kind, v1, v2):  # d/dv1, d/dv2
        if kind == "inner":
            return v1.copy(), 2 * lam * v2  # mean(v1^2) over 2 entries; sum(lam v2^2)
        return v2.sum(0) / 4, np.broadcast_to(v1 / 4, v2.shape).copy()  # mean(v1 * v2)

    def hvp(kind, v1, v2, c1, c2):  # (H c)_v1, (H c)_v2, (d g / d lam)^T c
        if kind == "inner":
            return c1.copy(), 2 * lam * c2, 2 * v2 * c2
        return c2.sum(0) / 4, np.broadcast_to(c1 / 4, v2.shape).copy(), np.zeros_like(lam)

    kinds = ["inner"] * steps + ["outer"]
    saved, b1, b2 = [], None, None
    for kind in kinds:
        saved.append((v1.copy(), v2.copy()))
        g1, g2 = grad(kind, v1, v2)
        d1, d2 = g1 + wd * v1, g2 + wd * v2
        b1, b2 = (d1, d2) if b1 is None else (mu * b1 + d1, mu * b2 + d2)
        v1, v2 = v1 - lr * b1, v2 - lr * b2
    a = [list(grad("outer", v1, v2)), [np.zeros_like(v1), np.zeros_like(v2)]]
    lam_grad = np.zeros_like(lam)
    for kind, (s1, s2) in zip(reversed(kinds), reversed(saved), strict=True):
        c1, c2 = a[1][0] - lr * a[0][0], a[1][1] - lr * a[0][1]
        h1, h2, lg = hvp(kind, s1, s2, c1, c2)
        lam_grad += lg
        new0 = [a[0][0] * (1 - lr * wd) + a[1][0] + h1, a[0][1] * (1 - lr * wd) + a[1][1] + h2]
        new1 = [a[1][0] * mu - lr * mu * a[0][0], a[1][1] * mu - lr * mu * a[0][1]]
        a = [new0, new1]
    return lam_grad


def test_meta_hypergrad_is_the_official_recursion_and_exact_is_the_chain_rule():
    with jax.enable_x64(True):
        theta, lam, inner, outer = _toy()
        theta = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), theta)
        lam = lam.astype(jnp.float64)
        kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, steps=3)
        got = lmcl.meta_hypergrad(inner, outer, theta, lam, adjoint="official", **kw)
        np.testing.assert_allclose(got, _np_meta_sgd(theta, lam, 3, 0.1, 0.9, 0.01),
                                   rtol=1e-12, atol=1e-14)

        def unrolled(lm):  # the look-ahead itself, differentiated by JAX
            th, v = theta, jax.tree_util.tree_map(jnp.zeros_like, theta)
            for obj in [inner] * 3 + [outer]:
                g = jax.grad(obj)(th, lm)
                v = jax.tree_util.tree_map(lambda v_, g_, p: 0.9 * v_ + g_ + 0.01 * p, v, g, th)
                th = jax.tree_util.tree_map(lambda p, v_: p - 0.1 * v_, th, v)
            return outer(th, lm)

        exact = lmcl.meta_hypergrad(inner, outer, theta, lam, adjoint="exact", **kw)
        np.testing.assert_allclose(exact, jax.grad(unrolled)(lam), rtol=1e-12, atol=1e-14)
        # The official adjoint differs where momentum carries a1 (weight decay != 1).
        assert np.max(np.abs(np.asarray(exact) - np.asarray(got))) > 1e-4


def test_weight_optimizer_is_torch_nesterov_sgd_and_meta_steps_follow_batch_idx():
    params = {"w": jnp.array([1.0, -2.0])}
    state = {"params": params, "momentum": {"w": jnp.zeros(2)}}
    tx = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.9,
                                                                  nesterov=True))
    opt, p = tx.init(params), params
    for g in ([0.5, 1.0], [-0.2, 0.3], [0.1, 0.1]):
        grad = {"w": jnp.array(g)}
        state = lmcl.nesterov_sgd(state, grad, 0.1, 0.9, 0.01)
        upd, opt = tx.update(grad, opt, p)
        p = optax.apply_updates(p, upd)
    np.testing.assert_allclose(state["params"]["w"], p["w"], rtol=1e-6)
    # batch_idx % 50 == 0 after each update; an epoch of 120 batches: batches 0, 50, 100.
    due = [int(s) for s in range(1, 241) if lmcl.meta_due(jnp.asarray(s), 120, 50)]
    assert due == [1, 51, 101, 121, 171, 221]
    assert not lmcl.meta_due(jnp.asarray(0), 120, 50)


# ------------------------------------------------------------------------------ models


@pytest.mark.parametrize("model,n_stages", [("resnet32", 3), ("resnet18", 4)])
def test_backbone_stage_outputs_leave_the_default_outputs_unchanged(model, n_stages):
    net = models.create(model, num_classes=7, width=0.25,
                        **({"stem": "cifar"} if model == "resnet18" else {}))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 16, 3)), jnp.float32)
    variables = net.init(jax.random.PRNGKey(0), x)
    plain = net.apply(variables, x, features="both")
    staged = net.apply(variables, x, stages=True)
    for key in ("features", "logits"):
        np.testing.assert_array_equal(plain[key], staged[key])
    assert len(staged["stages"]) == n_stages - 1
    assert [a.shape[1] for a in staged["stages"]] == [16 // 2**i for i in range(n_stages - 1)]


def test_auxiliary_branches_copy_the_official_blocks():
    def names(model):
        cfg = {"model": model, "model_kwargs": {"width": 0.25}, "head": "mcl_embed",
               "head_hidden": 0, "embed_dim": 8, "num_classes": 5}
        cohort = build_lmcl_cohort(cfg, 2)
        v = jax.eval_shape(cohort.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
        return v["params"]["net_0"]

    cifar = names("resnet32")  # Auxiliary_Classifier: layer2 + layer3 copies, 5 blocks each
    assert sorted(k for k in cifar["aux"] if k.startswith("block_extractor1")) == sorted(
        [f"block_extractor1_0_{j}" for j in range(5)] + [f"block_extractor1_1_{j}"
                                                          for j in range(5)])
    assert {k for k in cifar["aux"] if not k.startswith("block")} == {"fc1", "fc2"}
    assert set(cifar) == {"backbone", "head", "aux", "aux_heads_0", "aux_heads_1"}
    imagenet = names("resnet34")  # layers = [1, 1, 1, 1] in the ImageNet copies
    blocks = sorted(k for k in imagenet["aux"] if k.startswith("block"))
    assert blocks == ["block_extractor1_0_0", "block_extractor1_1_0", "block_extractor1_2_0",
                      "block_extractor2_0_0", "block_extractor2_1_0", "block_extractor3_0_0"]


# ------------------------------------------------------------------------------ training

CONFIGS = ["lmcl_cifar_resnet32x2.py", "lmcl_r34x2.py"]


# The in-batch form end to end: the CIFAR recipe's run (data, schedule, loss, evaluator, export)
# on `TINY_NET` pairs (CIFAR ResNet-8s), whose 3 stages give 3 heads and 2 auxiliary branches
# per network. Its ResNet-32 pair (15 blocks and 15 auxiliary blocks per network against 3 and
# 3) compiled for ~50 s more on 2 cores than a ResNet-10 pair did; an L-MCL cohort of CIFAR
# ResNets trains at step level here (test_meta_step_in_the_train_step,
# test_bn_groups_cut_every_output_along_its_batch_axis) and the ResNet-32 at model level
# (tests/test_models_zoo.py). The memory-bank form (lmcl_r34x2) at step level
# (tests/test_steps.py, "lmcl_bank", and its 8-vs-1-device test): its run would check what this
# one and MCL's memory-bank run (tests/test_methods_mcl.py) check.
@pytest.mark.slow
def test_smoke_config_runs_end_to_end(tmp_path, data_dir):
    cfg = tiny_nets(load_config(f"{CONFIGS[0]}:smoke", data_dir))
    assert cfg.student.model == TINY_NET["model"] and cfg.student.head == "mcl_embed"
    cfg.log_every_steps = 1
    cfg.mesh.num_devices = 1  # the step on 8 devices: tests/test_steps.py (half the compile)
    # Only the classifier (kNN and the probe extract the train split through the whole cohort:
    # minutes on CPU); the features they would read are checked in test_meta_step_...
    cfg.evals = {"classifier": cfg.evals.classifier}
    cfg.evals.classifier.test_limit, cfg.eval.batch_size = 64, 32  # 2 batches of 32 test images
    seen = {}

    def keep(step, state):
        seen[step] = jax.device_get(state["loss_weight_net"]["params"])

    results = train.run(cfg, str(tmp_path / "w"), extra_actions=(keep,))
    assert results["step"] == 4
    rows = read_metrics(str(tmp_path / "w"))
    assert len(rows) == 4 and "meta" not in rows[0]
    # meta_freq = 0: the pair weights' network never moves (no meta step, no main gradient).
    for step in (2, 3, 4):
        for a, b in zip(jax.tree_util.tree_leaves(seen[1]), jax.tree_util.tree_leaves(seen[step]),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    c = cfg.loss
    for r in rows:
        assert all(r[k] > 0 for k in ("ce", "ce_agg", "vcl", "icl", "soft_vcl", "soft_icl"))
        total = (r["ce"] + r["ce_agg"] + r["logit_kd"] + c.alpha * r["vcl"]
                 + c.gamma * r["soft_vcl"] + c.beta * r["icl"] + c.lam * r["soft_icl"])
        np.testing.assert_allclose(r["loss"], total, rtol=1e-5)
        assert 0.0 < r["pair_weight"] < 1.0
    assert rows[-1]["loss"] != rows[0]["loss"]
    ev = results["evals"]  # eval_heads="all": every (network, stage) head
    n_heads = c.num_nets * 3  # a head per stage of each network (a CIFAR ResNet-8 has 3)
    heads = [ev[f"classifier/net{k}_top1"] for k in range(n_heads)]
    assert ev["classifier/top1"] == max(heads) and f"classifier/net{n_heads}_top1" not in ev
    # The export is network 0 as a plain encoder: it rebuilds and runs without the cohort.
    variables, manifest = checkpoint.load_encoder(str(tmp_path / "w" / "encoder"))
    assert set(variables["params"]) == {"backbone", "head"}
    out = models.build_encoder(manifest).apply(variables, np.zeros((2, 16, 16, 3), np.float32))
    assert out["embedding"].shape == (2, 128) and out["logits"].shape == (2, 10)


def _tiny_cohort(m: int = 2, classes: int = 4) -> LMCLCohort:
    """L-MCL peers on a CIFAR ResNet of one block per stage (3 + 3 auxiliary blocks)."""
    peers = []
    for _ in range(m):
        backbone = cifar.CifarResNet(block=resnet.BasicBlock, stage_sizes=(1, 1, 1),
                                     num_classes=classes, width=0.25)
        block, planes, blocks = aux_plan(backbone)
        peers.append(LMCLNet(backbone, heads.MCLEmbed(16),
                             AuxiliaryBranches(block, planes, blocks, classes),
                             (heads.MCLEmbed(16), heads.MCLEmbed(16))))
    return LMCLCohort(tuple(peers), Aggregator(m))


def test_bn_groups_cut_every_output_along_its_batch_axis():
    # Jitted, as in the train step: op by op, the cohort took ~5 s longer here (2 cores).
    student = _tiny_cohort()
    x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 8, 8, 3)), jnp.float32)
    variables = jax.jit(student.init)(jax.random.PRNGKey(0), x[:1])
    out, _ = jax.jit(functools.partial(train_forward, student, groups=2))(variables, x)
    half = jax.jit(lambda v, h: student.apply(v, h, train=True, mutable=["batch_stats"])[0])
    halves = [half(variables, x[i:i + 4]) for i in (0, 4)]
    for key, axis in output_batch_axes(student, out).items():
        want = np.concatenate([h[key] for h in halves], axis=axis)
        np.testing.assert_allclose(out[key], want, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_meta_step_in_the_train_step(data_dir):
    # The whole jitted train step on a tiny network, meta step every batch (meta_freq 1):
    # none before the first update, then one at the start of every later step. One virtual
    # SGD step per hypergradient (the recipes' 2 double the second-order graph, a minute more
    # of tracing and compiling here; the recursion over several steps is checked against the
    # official one by test_meta_hypergrad_is_the_official_recursion_and_exact_is_the_chain_rule).
    cfg = methods.resolve_loss(load_config(f"{CONFIGS[0]}:smoke", data_dir))
    cfg.loss.meta_freq, cfg.loss.meta_steps, cfg.batch_size, cfg.data.image_size = 1, 1, 8, 8
    method, student = methods.get("lmcl"), _tiny_cohort()
    schedule = optim.lr_schedule(base_lr=0.1, global_batch=8, steps_per_epoch=3, total_steps=6,
                                 scale_with_batch=False)
    tx = optim.make_optimizer(cfg.optimizer, schedule)
    ctx = {"student": student, "teacher": None, "config": cfg, "mesh": sharding.make_mesh(1),
           "augment": functools.partial(data.mocov2_augment, **cfg.augment,
                                        out_dtype=jnp.float32),
           "total_steps": 6, "steps_per_epoch": 3, "host": {}}
    v = student.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    sv = {"params": v["params"], "batch_stats": v["batch_stats"]}
    state = {**sv, "opt_state": tx.init(sv["params"]), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(1), **method.init_extra(cfg, jax.random.PRNGKey(2), sv, ctx)}
    step = jax.jit(train.make_train_step(method, tx, schedule, ctx))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
             "label": np.repeat(np.arange(4, dtype=np.int32), 2)}
    lams = [state["loss_weight_net"]]
    for want_meta in (0.0, 1.0, 1.0):
        state, met = step(state, batch, None)
        assert float(met["meta"]) == want_meta and np.isfinite(float(met["loss"]))
        lams.append(jax.device_get(state["loss_weight_net"]))
    leaves = [jax.tree_util.tree_leaves(w["params"]) for w in lams]
    assert all(np.array_equal(a, b) for a, b in zip(leaves[0], leaves[1], strict=True))
    for before, after in ((1, 2), (2, 3)):  # moved by the hypergradient, and momentum kept
        assert not all(np.array_equal(a, b)
                       for a, b in zip(leaves[before], leaves[after], strict=True))
    assert any(np.any(m != 0) for m in jax.tree_util.tree_leaves(lams[2]["momentum"]))
    # What the evaluators see: network 0's features / embedding / logits, and the heads.
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    x = jnp.zeros((5, 8, 8, 3))
    out = method.eval_outputs(ctx, variables, x)
    assert {k: v.shape for k, v in out.items()} == {
        "features": (5, 16), "embedding": (5, 16), "logits": (5, 4), "logits_nets": (6, 5, 4)}
    plain = models.Encoder(student.net[0].backbone.clone(parent=None),
                           student.net[0].head.clone(parent=None), classify=True)
    ref = plain.apply(lmcl_models.plain_variables(variables), x)
    for key in ("features", "embedding", "logits"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(out["logits_nets"][2], out["logits"], rtol=1e-6)  # net 0, S=3
    cfg.loss.eval_heads = "final"
    assert method.eval_outputs(ctx, variables, x)["logits_nets"].shape == (2, 5, 4)


def _smoke(name, data_dir, **overrides):
    cfg = load_config(f"{name}:smoke", data_dir)
    for k, v in overrides.items():
        cfg.loss[k] = v
    return cfg


@pytest.mark.parametrize("name,overrides,match", [
    (CONFIGS[0], {"form": "moco"}, "loss.form"),
    (CONFIGS[0], {"num_nets": 1}, "num_nets"),
    (CONFIGS[0], {"meta_steps": 0}, "meta_steps"),
    (CONFIGS[0], {"meta_freq": -1}, "meta_freq"),
    (CONFIGS[0], {"meta_adjoint": "approx"}, "meta_adjoint"),
    (CONFIGS[0], {"eval_heads": "last"}, "eval_heads"),
    (CONFIGS[0], {"per_class": 1}, "per_class"),
    (CONFIGS[0], {"tau": 0.0}, "tau"),
    (CONFIGS[0], {"alpha": -0.1}, "alpha"),
    (CONFIGS[0], {"bn_group_size": 5}, "bn_group_size"),
    (CONFIGS[1], {"neg_k": 0}, "neg_k"),
    (CONFIGS[1], {"vcl_bank": "second"}, "vcl_bank"),
    (CONFIGS[1], {"bank_momentum": 1.0}, "bank_momentum"),
])
def test_bad_settings_fail_before_compiling(data_dir, name, overrides, match):
    with pytest.raises(ConfigError, match=match):
        methods.get("lmcl").validate(_smoke(name, data_dir, **overrides))


def test_unsupported_student_and_too_few_classes(data_dir):
    cfg = _smoke(CONFIGS[0], data_dir)
    cfg.student.model = "wrn_16_2"
    with pytest.raises(ConfigError, match="auxiliary branches"):
        methods.get("lmcl").validate(cfg)
    cfg = _smoke(CONFIGS[0], data_dir)
    cfg.student.num_classes = 5
    with pytest.raises(ConfigError, match="num_classes=10"):
        methods.get("lmcl").validate(cfg)
