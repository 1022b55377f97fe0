"""DisCo, shuffle-BN, KD baselines and SEED multi-crop: units, 8-vs-1 devices, smoke configs.

Teachers are the smoke variants' own untrained ones (`teacher.init="random"`, no teacher flag:
the method plumbing, not the teacher's quality, is under test). Each `train.run` compiles one
step (and the teacher's init).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from disco_jax import methods, sharding, train
from disco_jax.errors import ConfigError
from disco_jax.methods import common
from disco_jax.models import layers
from tests.helpers import (
    group_permutation,
    load_config,
    override,
    permute_batches,
    read_metrics,
)
from tests.test_train import final_state


def smoke_config(spec, data_dir, **overrides):
    cfg = load_config(spec, data_dir)  # its own untrained teacher: no teacher flag
    cfg.total_steps = 2
    cfg.checkpoint_every_steps = 2
    cfg.log_every_steps = 1
    cfg.eval.enabled = False
    return override(cfg, **overrides)


def run(cfg, workdir):
    train.run(cfg, str(workdir))
    return [r for r in read_metrics(str(workdir))], final_state(str(workdir))[1]


def run_permuted(cfg, workdir, perm, monkeypatch):
    """`run` with every batch reordered by `perm` (`helpers.permute_batches`)."""
    with monkeypatch.context() as m:
        permute_batches(m, perm)
        return run(cfg, workdir)


def no_augment(cfg):
    cfg.augment.jitter_p = cfg.augment.gray_p = cfg.augment.blur_p = 0.0
    return cfg


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)]).astype(
        np.float64)


def assert_same_training(a, b, p1, p8, perm):
    """8 devices (`a`) vs 1 device (`b`): the same training up to float32 noise of this CPU,
    measured in the same test: `p1` and `p8` repeat `b` and `a` with the batch rows reordered
    within their BN groups (`run_permuted`), the same math with the float32 sums over each
    group in another order. Parameters, BN statistics and queues of `a` must lie within 10x the
    larger of those two distances (+ one float32 rounding per entry). Both are needed: the
    8-device program is the more sensitive one (seen for disco_r18: params 2.6e-6 relative
    for p8 vs a, 2.5e-8 for p1 vs b, 1.6e-6 for a vs b), and a bug in the 8-device program is
    in `p8` too, so it cannot widen the bound. A sharding bug moves far more: BN groups of
    one device's 2 rows instead of 4 moved the parameters by 1.7e-3 and the BN statistics by
    1.9e-2 (tried); unaveraged gradients or a queue written per device, more still.

    The logged scalars (loss terms, gradient norm) at each step: within 10x the larger of their
    two noise samples (p1 vs b, p8 vs a) plus 1000 float32 roundings of the value, the
    worst-case error of a sum of ~1e3 terms (batch x queue entries in a loss), should both
    samples happen to agree bitwise. The step-2 gradient norm is the most sensitive: one SGD
    step through BN groups of tiny maps turns 1e-6 parameter noise into ~1e-2 (seen: 1.2e-2
    for p1 vs b, seed multi-crop); the losses stay within ~1e-4.
    """
    (rows_a, state_a), (rows_b, state_b), (rows_p, state_p), (rows_q, state_q) = a, b, p1, p8
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2]
    eps = float(np.finfo(np.float32).eps)
    for i in range(2):
        for key in rows_a[i]:
            if key in ("step", "steps_per_sec"):
                continue
            va, vb, vp, vq = (float(r[i][key]) for r in (rows_a, rows_b, rows_p, rows_q))
            tol = 10 * max(abs(vp - vb), abs(vq - va)) + 1e3 * eps * abs(vb)
            assert abs(va - vb) <= tol, (f"step {i + 1} {key}: 8 devices {va}, 1 device {vb},"
                                         f" noise samples {vp - vb:.2e}, {vq - va:.2e}")
    unperm, n = np.argsort(perm), len(perm)

    def queue_rows(state, name, permuted_run):
        feats = np.asarray(state[name]["feats"], np.float64)
        if not permuted_run:
            return feats
        blocks = [feats[i:i + n][unperm] if i + n <= int(state[name]["ptr"]) else feats[i:i + n]
                  for i in range(0, len(feats), n)]
        return np.concatenate(blocks)

    states = (state_a, state_b, state_p, state_q)
    permuted = (False, False, True, True)
    arrays = {key: [_flat(s[key]) for s in states] for key in ("params", "batch_stats")}
    for name in state_a:
        if name.startswith("queue"):
            arrays[name] = [queue_rows(s, name, perm_) for s, perm_ in
                            zip(states, permuted, strict=True)]
    for key, (fa, fb, fp, fq) in arrays.items():
        ref = np.linalg.norm(fb)
        noise = max(np.linalg.norm(fp - fb), np.linalg.norm(fq - fa)) + eps * ref
        diff = np.linalg.norm(fa - fb)
        assert diff <= 10 * noise, (f"{key}: 8 vs 1 device {diff / ref:.2e} relative L2,"
                                    f" reordered-group noise {noise / ref:.2e}")


# --------------------------------------------------------------------------- shuffle-BN


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(layers.batch_norm(train, jnp.float32, "bn")(nn.Dense(8)(x)))
        return {"embedding": nn.Dense(4)(h)}


def test_shuffle_bn_equals_per_device_statistics_by_hand():
    module, mesh = _Tiny(), sharding.make_mesh(8)
    x = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32) * 2 + 1
    variables = module.init(jax.random.PRNGKey(0), x[:2])
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree_util.tree_map(lambda a: a + 0.3,
                                                       variables["batch_stats"])}
    rng = jax.random.PRNGKey(3)
    cfg = mlc.ConfigDict({"loss": {"bn_group_size": 2}, "batch_size": 16})  # 8 groups
    ctx = {"config": cfg, "mesh": mesh}
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    shuffled = jax.jit(lambda v, a: common.key_forward(module, v, a, ctx, rng, "shuffle"))
    out, stats = shuffled(variables, xs)
    glob, glob_stats = common.key_forward(module, variables, x, ctx, rng, "global")

    # By hand: permute, apply each device's chunk of 2 separately, average the running
    # statistics, undo the permutation.
    perm = np.asarray(common.shuffle_permutation(rng, 16))
    chunks, chunk_stats = [], []
    for g in range(8):
        o, m = module.apply(variables, x[perm][2 * g:2 * g + 2], train=True,
                            mutable=["batch_stats"])
        chunks.append(np.asarray(o["embedding"]))
        chunk_stats.append(m["batch_stats"])
    want = np.concatenate(chunks)[np.argsort(perm)]
    np.testing.assert_allclose(np.asarray(out["embedding"]), want, rtol=1e-5, atol=1e-5)
    want_stats = jax.tree_util.tree_map(lambda *s: np.mean(s, axis=0), *chunk_stats)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           stats, want_stats)
    # Not the global-batch statistics, and not unshuffled per-device statistics either.
    assert np.abs(np.asarray(glob["embedding"]) - want).max() > 1e-2
    unshuffled, _ = common.grouped_forward(module, variables, x, 8)
    assert np.abs(np.asarray(unshuffled["embedding"]) - want).max() > 1e-2
    # Equal groups: the mean of group means is the global mean, the variances differ.
    np.testing.assert_allclose(glob_stats["bn"]["mean"], want_stats["bn"]["mean"], atol=1e-6)
    assert np.abs(glob_stats["bn"]["var"] - want_stats["bn"]["var"]).max() > 1e-3
    # The groups follow bn_group_size, not the device count: 4 groups of 4 on 8 devices.
    cfg.loss.bn_group_size = 4
    out4, _ = jax.jit(lambda v, a: common.key_forward(module, v, a, ctx, rng, "shuffle"))(
        variables, xs)
    o4 = [module.apply(variables, x[perm][4 * g:4 * g + 4], train=True,
                       mutable=["batch_stats"])[0]["embedding"] for g in range(4)]
    np.testing.assert_allclose(np.asarray(out4["embedding"]),
                               np.concatenate(o4)[np.argsort(perm)], rtol=1e-5, atol=1e-5)


def test_validation_errors_are_config_errors():
    def cfg(spec, **loss):
        c = load_config(spec)
        c.loss.update(loss)
        return c

    disco = methods.get("disco")
    for loss, match in [({"key_bn": "sync"}, "loss.key_bn"), ({"teacher_bn": "x"}, "teacher_bn"),
                        ({"bn_group_size": 3}, "bn_group_size"),
                        ({"bn_group_size": 0}, "key_bn='shuffle' needs"),
                        ({"distill_reduction": "avg"},
                                                          "distill_reduction"),
                        ({"distill_weight": -1.0}, "distill_weight"), ({"temp": 0.0}, "temp")]:
        with pytest.raises(ConfigError, match=match):
            disco.validate(cfg("disco_effb0.py", **loss))
    with pytest.raises(ConfigError, match="loss.key_bn"):
        methods.get("moco_v2").validate(cfg("moco_v2_r50.py", key_bn="shuffled"))
    kd = methods.get("kd")
    with pytest.raises(ConfigError, match="num_classes"):
        kd.validate(cfg("kd_r18.py", kind="logits"))
    with pytest.raises(ConfigError, match="loss.kind"):
        kd.validate(cfg("kd_r18.py", kind="mse"))
    kd.validate(cfg("kd_r18.py"))
    kd.validate(load_config("kd_r18.py:kind=logits"))
    with pytest.raises(ConfigError, match="small_crops"):
        methods.get("seed").validate(cfg("seed_multicrop_effb0.py", small_crops=-1))
    with pytest.raises(ConfigError, match="small_scale"):
        methods.get("seed").validate(cfg("seed_multicrop_effb0.py", small_scale=(0.2, 0.1)))
    assert load_config("disco_effb0.py:teacher=resnet101").teacher.model == "resnet101"


# --------------------------------------------------------------------------- methods end to end


R18 = {"student.model": "resnet18", "student.model_kwargs": {"width": 0.25, "stem": "cifar"}}


def test_disco_r18_smoke_shuffle_bn_8_devices_equals_1_device(tmp_path, data_dir, monkeypatch):
    # bn_group_size=4 fixes the BN groups, so the device count must not matter.
    cfgs = {n: no_augment(smoke_config("disco_r18.py:smoke", data_dir,
                                       **{"mesh.num_devices": n})) for n in (8, 1)}
    assert cfgs[1].loss.key_bn == "shuffle" and cfgs[1].loss.bn_group_size == 4
    perm = group_permutation(cfgs[1])
    runs = [run(cfgs[n], tmp_path / str(n)) for n in (8, 1)]
    runs += [run_permuted(cfgs[n], tmp_path / f"{n}p", perm, monkeypatch) for n in (1, 8)]
    rows = runs[0][0]
    assert {"contrastive", "distill_q", "distill_k", "loss"} <= set(rows[0])
    for r in rows:  # total = CE + (1/8) * (D_q + D_k), official "sum" reduction
        np.testing.assert_allclose(r["loss"], r["contrastive"] + (r["distill_q"] + r["distill_k"])
                                   / 8, rtol=1e-5)
        assert 0 < r["distill_q"] <= 4 * 16 and 0 < r["distill_k"] <= 4 * 16  # sum of 2-2cos
    assert_same_training(*runs, perm)
    state = runs[0][1]  # the queue holds 2 steps of student keys, the EMA encoder moved
    assert int(state["queue"]["ptr"]) == 32
    ema = np.concatenate([v.ravel() for v in jax.tree_util.tree_leaves(state["ema"]["params"])])
    cur = np.concatenate([v.ravel() for v in jax.tree_util.tree_leaves(state["params"])])
    assert 0 < np.abs(ema - cur).max()


@pytest.mark.parametrize("spec", ["disco_effb0.py:smoke", "disco_mbv3.py:smoke"])
def test_disco_smoke_configs_run_end_to_end(tmp_path, data_dir, spec):
    # Global key BN and eval-mode teacher here, so every BN option trains somewhere.
    overrides = {"loss.key_bn": "global", "loss.teacher_bn": "eval"} if "mbv3" in spec else {}
    cfg = smoke_config(spec, data_dir, **overrides)
    cfg.eval.enabled = "mbv3" in spec  # one full evaluation is enough
    res = train.run(cfg, str(tmp_path))
    assert res["step"] == 2
    assert all(np.isfinite(r["loss"]) for r in read_metrics(str(tmp_path)))


def test_seed_multicrop_8_devices_equals_1_device(tmp_path, data_dir, monkeypatch):
    # seed_multicrop_effb0:smoke with a ResNet-18 student (the EfficientNet compile is slow;
    # the shipped config runs in test_seed_smoke_configs_run_end_to_end).
    cfgs = {n: no_augment(smoke_config("seed_multicrop_effb0.py:smoke", data_dir,
                                       **{"mesh.num_devices": n}, **R18)) for n in (8, 1)}
    perm = group_permutation(cfgs[1])
    runs = [run(cfgs[n], tmp_path / str(n)) for n in (8, 1)]
    runs += [run_permuted(cfgs[n], tmp_path / f"{n}p", perm, monkeypatch) for n in (1, 8)]
    rows, state = runs[0]
    for r in rows:
        np.testing.assert_allclose(r["loss"], r["seed_main"] + r["seed_small"], rtol=1e-5)
    assert int(state["queue_small"]["ptr"]) == int(state["queue"]["ptr"]) == 32
    assert_same_training(*runs, perm)


@pytest.mark.parametrize(
    "spec", ["seed_effb0.py:smoke", "seed_r18.py:smoke", "seed_multicrop_effb0.py:smoke"])
def test_seed_smoke_configs_run_end_to_end(tmp_path, data_dir, spec):
    res = train.run(smoke_config(spec, data_dir), str(tmp_path))
    assert res["step"] == 2


def test_kd_logits_smoke_8_devices_equals_1_device(tmp_path, data_dir, monkeypatch):
    cfgs = {n: no_augment(smoke_config("kd_r18.py:smoke,kind=logits", data_dir,
                                       **{"mesh.num_devices": n})) for n in (8, 1)}
    perm = group_permutation(cfgs[1])
    runs = [run(cfgs[n], tmp_path / str(n)) for n in (8, 1)]
    runs += [run_permuted(cfgs[n], tmp_path / f"{n}p", perm, monkeypatch) for n in (1, 8)]
    rows = runs[0][0]
    for r in rows:  # KD + 1.0 x CE on the labels
        np.testing.assert_allclose(r["loss"], r["kd"] + r["ce"], rtol=1e-5)
        assert r["kd"] > 0 and r["ce"] > 0
    assert_same_training(*runs, perm)


def test_kd_cosine_smoke_runs(tmp_path, data_dir):
    res = train.run(smoke_config("kd_r18.py:smoke", data_dir), str(tmp_path))
    assert res["step"] == 2
    assert all(0 <= r["loss"] <= 2 for r in read_metrics(str(tmp_path)))
