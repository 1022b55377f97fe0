"""BN statistics per fixed group of `loss.bn_group_size` images (the official per-GPU BN):
the student's forward, a cohort's stacked outputs, and the teacher in train mode, each against
the same network applied to every group by hand."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from disco_jax import config_lib, methods, sharding
from disco_jax.errors import ConfigError
from disco_jax.methods import common
from disco_jax.models import layers
from disco_jax.models.cohort import COHORT_BATCH_AXIS

# float32 sums of the same numbers in another order: a few ulp of values of order 1.
TOL = {"rtol": 1e-5, "atol": 1e-5}


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(layers.batch_norm(train, jnp.float32, "bn")(nn.Dense(8)(x)))
        return {"features": h, "embedding": nn.Dense(4)(h)}


class _Pair(nn.Module):
    """Two networks stacked in front of the batch, as a cohort: (2, N, ...) outputs."""

    OUTPUT_BATCH_AXIS = COHORT_BATCH_AXIS

    @nn.compact
    def __call__(self, x, train=False):
        a, b = _Tiny(name="net_0")(x, train), _Tiny(name="net_1")(x, train)
        return {"features": a["features"], "embedding": jnp.stack([a["embedding"],
                                                                   b["embedding"]])}


def _setup(module, n=16):
    x = np.random.default_rng(0).normal(size=(n, 5)).astype(np.float32) * 2 + 1
    variables = module.init(jax.random.PRNGKey(0), x[:2])
    return x, variables


def _by_hand(module, variables, x, size):
    outs, stats = [], []
    for g in range(len(x) // size):
        o, m = module.apply(variables, x[g * size:(g + 1) * size], train=True,
                            mutable=["batch_stats"])
        outs.append(o)
        stats.append(m["batch_stats"])
    return outs, jax.tree_util.tree_map(lambda *s: np.mean(s, axis=0), *stats)


def _ctx(size, batch=16, mesh=None):
    cfg = mlc.ConfigDict({"loss": {"bn_group_size": size}, "batch_size": batch})
    return {"config": cfg, "mesh": mesh or sharding.make_mesh(8)}


@pytest.mark.parametrize("size", [4, 2])
def test_student_bn_uses_fixed_groups_on_any_mesh(size):
    module = _Tiny()
    x, variables = _setup(module)
    outs, want_stats = _by_hand(module, variables, x, size)
    want = np.concatenate([o["embedding"] for o in outs])
    for n_dev in (8, 1):
        ctx = _ctx(size, mesh=sharding.make_mesh(n_dev))
        ctx["student"] = module
        xs = jax.device_put(x, NamedSharding(ctx["mesh"], P("data")))
        out, stats = jax.jit(lambda p, s, a, c=ctx: common.student_forward(p, s, a, c))(
            variables["params"], {"batch_stats": variables["batch_stats"]}, xs)
        np.testing.assert_allclose(np.asarray(out["embedding"]), want, **TOL)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
                               stats, want_stats)
    # Global BN (bn_group_size=0) is a different computation: the test can tell them apart.
    glob, _ = common.student_forward(variables["params"], variables, x, {**_ctx(0),
                                                                        "student": module})
    assert np.abs(np.asarray(glob["embedding"]) - want).max() > 1e-2


def test_student_groups_carry_gradients():
    module = _Tiny()
    x, variables = _setup(module)
    ctx = {**_ctx(4), "student": module}

    def loss(params, ctx):
        out, _ = common.student_forward(params, variables, x, ctx)
        return jnp.sum(out["embedding"] ** 2)

    grouped = jax.grad(loss)(variables["params"], ctx)

    def by_hand(params):
        total = 0.0
        for g in range(4):
            o, _ = module.apply({**variables, "params": params}, x[4 * g:4 * g + 4],
                                train=True, mutable=["batch_stats"])
            total += jnp.sum(o["embedding"] ** 2)
        return total

    want = jax.grad(by_hand)(variables["params"])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           grouped, want)


def test_cohort_outputs_keep_their_batch_axis():
    module = _Pair()
    x, variables = _setup(module)
    outs, _ = _by_hand(module, variables, x, 4)
    ctx = {**_ctx(4), "student": module}
    out, _ = common.student_forward(variables["params"], variables, x, ctx)
    assert out["embedding"].shape == (2, 16, 4) and out["features"].shape == (16, 8)
    np.testing.assert_allclose(np.asarray(out["embedding"]),
                               np.concatenate([o["embedding"] for o in outs], axis=1), **TOL)
    np.testing.assert_allclose(np.asarray(out["features"]),
                               np.concatenate([o["features"] for o in outs], axis=0), **TOL)
    # Shuffle-BN keys of a cohort: unshuffled along the batch axis of each output.
    rng = jax.random.PRNGKey(1)
    keys, _ = common.key_forward(module, variables, x, ctx, rng, "shuffle")
    perm = np.asarray(common.shuffle_permutation(rng, 16))
    shuffled, _ = _by_hand(module, variables, x[perm], 4)
    inv = np.argsort(perm)
    np.testing.assert_allclose(
        np.asarray(keys["embedding"]),
        np.concatenate([o["embedding"] for o in shuffled], axis=1)[:, inv], **TOL)


def test_train_mode_teacher_uses_the_groups():
    module = _Tiny()
    x, variables = _setup(module)
    outs, _ = _by_hand(module, variables, x, 8)
    got = common.teacher_forward(module, variables, x, _ctx(8), jax.random.PRNGKey(0), "train")
    np.testing.assert_allclose(np.asarray(got["embedding"]),
                               np.concatenate([o["embedding"] for o in outs]), **TOL)
    ev = common.teacher_forward(module, variables, x, _ctx(8), jax.random.PRNGKey(0), "eval")
    np.testing.assert_allclose(np.asarray(ev["embedding"]),
                               np.asarray(module.apply(variables, x)["embedding"]), **TOL)


def test_paper_recipes_default_to_the_official_per_gpu_batch():
    # 8 GPUs x 32 images (MoCo, SEED, DisCo); a group size must divide the batch.
    for name in ("moco_v2", "seed", "disco"):
        c = config_lib.base_config(name)
        assert c.loss.bn_group_size == 32 and c.batch_size // 32 == 8
        methods.get(name).validate(c)
    c = config_lib.base_config("seed")
    c.loss.bn_group_size = 48  # 256 is no multiple of 48
    with pytest.raises(ConfigError, match="bn_group_size=48 must be 0"):
        common.check_bn_groups(c)
