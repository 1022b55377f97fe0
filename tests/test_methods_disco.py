"""DisCo, shuffle-BN, KD baselines and SEED multi-crop: units and the smoke configs end to end.

Their steps on 8 vs 1 device, the loss as the sum of its terms and the queues are checked at
step level in tests/test_steps.py. Teachers are the smoke variants' own untrained ones
(`teacher.init="random"`, no teacher flag: the method plumbing, not the teacher's quality, is
under test). Each `train.run` compiles one step (and the teacher's init).
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
from tests.helpers import load_config, override, read_metrics, tiny_nets


def smoke_config(spec, data_dir, **overrides):
    cfg = load_config(spec, data_dir)  # its own untrained teacher: no teacher flag
    # One device: these runs exercise the recipes end to end; every method's step on 8 devices
    # is checked at step level (tests/test_steps.py), and a 1-device program compiles in about
    # half the time (disco_effb0:smoke, 2 steps: 44 s against 81 s, measured here).
    cfg.mesh.num_devices = 1
    cfg.total_steps = 2
    cfg.checkpoint_every_steps = 2
    cfg.log_every_steps = 1
    cfg.eval.enabled = False
    return override(cfg, **overrides)


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


# DisCo's recipes end to end, on `TINY_NET` (on it the two smoke configs are equal key by key):
# disco_effb0 with the recipes' BN options (shuffle key BN, teacher BN in train mode),
# disco_mbv3 with the other two and the evaluators. Their networks take a train step at model
# level (EfficientNet-B0: tests/test_models_zoo.py; MobileNetV3: tests/test_models.py); the real
# MobileNetV3 pair here compiled for ~30 s more on 2 cores. DisCo's step on 8 devices:
# tests/test_steps.py.
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["disco_effb0.py:smoke", "disco_mbv3.py:smoke"])
def test_disco_smoke_configs_run_end_to_end(tmp_path, data_dir, spec):
    # Global key BN and eval-mode teacher here, so every BN option trains somewhere.
    overrides = {"loss.key_bn": "global", "loss.teacher_bn": "eval"} if "mbv3" in spec else {}
    cfg = tiny_nets(smoke_config(spec, data_dir, **overrides), teachers=None)
    cfg.eval.enabled = "mbv3" in spec  # one full evaluation is enough
    res = train.run(cfg, str(tmp_path))
    assert res["step"] == 2
    assert all(np.isfinite(r["loss"]) for r in read_metrics(str(tmp_path)))


# SEED's recipes end to end. The EfficientNet ones on `TINY_NET`: what is theirs here is the run
# (multi-crop's small crops through the pipeline, the queues, the head on the dropped-out
# feature). seed_mbv3 is left out: on `TINY_NET` it is seed_effb0's config; shrunk, it is the
# config of the resilience runs (tests/robust_util.py). SEED's variants of the networks at model
# level: EfficientNet-B0 with drop-connect (tests/test_models_zoo.py), MobileNetV3's head on
# the dropped-out feature (tests/test_models.py).
@pytest.mark.slow
@pytest.mark.parametrize("spec,tiny", [
    ("seed_effb0.py:smoke", True), ("seed_r18.py:smoke", False),
    ("seed_multicrop_effb0.py:smoke", True)])
def test_seed_smoke_configs_run_end_to_end(tmp_path, data_dir, spec, tiny):
    cfg = smoke_config(spec, data_dir)
    res = train.run(tiny_nets(cfg, teachers=None) if tiny else cfg, str(tmp_path))
    assert res["step"] == 2


@pytest.mark.slow
def test_kd_cosine_smoke_runs(tmp_path, data_dir):
    res = train.run(smoke_config("kd_r18.py:smoke", data_dir), str(tmp_path))
    assert res["step"] == 2
    assert all(0 <= r["loss"] <= 2 for r in read_metrics(str(tmp_path)))
