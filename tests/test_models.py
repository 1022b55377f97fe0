"""Model zoo tests: torchvision parameter counts, feature dims, tiny real train/eval steps, heads.

Shape-only checks use `jax.eval_shape`, so the full-size models are never allocated; only
width-0.25 variants on 16 px inputs are actually run (compilation dominates the time).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax import models
from disco_jax.errors import ConfigError
from tests.helpers import load_config, random_variables, sizes

# torchvision 1000-class parameter counts (parameters only, no BN buffers).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "mobilenet_v3_large": 5_483_032,
    "mobilenet_v3_small": 2_542_856,
}
FEATURE_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "mobilenet_v3_large": 1280,
    "mobilenet_v3_small": 1024,
}
# These tiny programs run once, so XLA's backend optimisations cost more than they save
# (about half of the compile time on CPU).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
CLASSIFIER = {"resnet": "fc", "mobilenet_v3": "classifier_3"}


def _classifier_name(name: str) -> str:
    return CLASSIFIER["resnet" if name.startswith("resnet") else "mobilenet_v3"]


def _shapes(model, x_shape, **kwargs):
    """(variables, output) shapes of init + apply without allocating anything."""
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(functools.partial(model.apply, **kwargs), variables, x)
    return variables, out


def _random_variables(model, x_shape):
    """Real, sensibly scaled variables built from init's shapes with numpy.

    Much faster than running ``model.init`` (whose random-number code XLA must compile); the
    real initialisation is checked separately in `test_resnet_init_is_torchvision_like`.
    """
    return random_variables(_shapes(model, x_shape)[0])


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _tiny(name: str, **kwargs):
    """Width-0.25 variant; ResNets get the cifar stem so 16 px inputs keep spatial extent."""
    if name.startswith("resnet"):
        kwargs.setdefault("stem", "cifar")
    return models.create(name, num_classes=10, width=0.25, **kwargs)


def test_registry_lists_every_architecture():
    assert set(TORCHVISION_PARAMS) <= set(models.list_models())
    assert sorted(models.list_heads()) == ["identity", "linear", "mcl_embed", "mlp", "mlp_bn",
                                          "mlp_bn_out"]


@pytest.mark.parametrize("name", sizes(sorted(TORCHVISION_PARAMS)))
def test_param_count_and_feature_dims(name):
    d = FEATURE_DIMS[name]
    model = models.create(name)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert _count(variables["params"]) == TORCHVISION_PARAMS[name]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 1000)
    feats = jax.eval_shape(functools.partial(model.apply, features=True), variables, x)
    assert feats.shape == (2, d)

    # num_classes=0: the same network minus the (d x 1000 + 1000) classifier.
    headless, out = _shapes(models.create(name, num_classes=0), (2, 32, 32, 3))
    assert out.shape == (2, d)
    assert _classifier_name(name) not in headless["params"]
    assert _count(headless["params"]) == TORCHVISION_PARAMS[name] - (d + 1) * 1000

    small, _ = _shapes(models.create(name, num_classes=0, width=0.25), (2, 32, 32, 3))
    assert _count(small["params"]) < _count(headless["params"]) / 4


def test_torchvision_module_names():
    r50, _ = _shapes(models.create("resnet50"), (1, 64, 64, 3))
    p = r50["params"]
    expected = "conv1 bn1 conv2 bn2 conv3 bn3 downsample_0 downsample_1".split()
    assert set(p["layer1_0"]) == set(expected)
    # v1.5: the stride sits on the 3x3 conv; the kernel layout is (kh, kw, in, out).
    assert p["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert set(r50["batch_stats"]["bn1"]) == {"mean", "var"}
    assert p["fc"]["kernel"].shape == (2048, 1000)

    mv3, _ = _shapes(models.create("mobilenet_v3_large"), (1, 64, 64, 3))
    p = mv3["params"]
    assert p["features_0_0"]["kernel"].shape == (3, 3, 3, 16)
    # features.4: expand 1x1, depthwise 5x5, SE (squeeze 24), project.
    blk = p["features_4"]
    assert blk["block_1_0"]["kernel"].shape == (5, 5, 1, 72)
    assert blk["block_2_fc1"]["kernel"].shape == (1, 1, 72, 24)
    assert blk["block_2_fc2"]["kernel"].shape == (1, 1, 24, 72)
    assert blk["block_3_0"]["kernel"].shape == (1, 1, 72, 40)
    assert p["classifier_0"]["kernel"].shape == (960, 1280)
    assert p["classifier_3"]["kernel"].shape == (1280, 1000)


def test_resnet_init_is_torchvision_like():
    model = _tiny("resnet18")
    variables = _jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 16, 16, 3)))
    kernel = variables["params"]["layer4_0"]["conv2"]["kernel"]  # (3, 3, 128, 128)
    fan_out = 3 * 3 * 128
    assert float(jnp.std(kernel)) == pytest.approx(np.sqrt(2 / fan_out), rel=0.05)
    # zero_init_residual=False: every BN starts at gamma 1, beta 0, mean 0, var 1.
    bn = variables["params"]["layer1_0"]["bn2"]
    np.testing.assert_array_equal(bn["scale"], 1.0)
    np.testing.assert_array_equal(bn["bias"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"]["layer1_0"]["bn2"]["var"], 1.0)


# ResNet-50 (bottlenecks): trained here rather than end to end, where the recipes' runs use a
# stand-in network or ResNet-18s and run the ResNet-50 as a frozen teacher (README: Tests).
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small",
                                  pytest.param("resnet50", marks=pytest.mark.slow)])
def test_tiny_train_step_and_eval(name):
    model = _tiny(name)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    variables = _random_variables(model, x.shape)
    params, stats = variables["params"], variables["batch_stats"]

    def loss_fn(params, stats):
        logits, updates = model.apply(
            {"params": params, "batch_stats": stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(2)},
        )
        return jnp.mean(logits**2), (logits, updates["batch_stats"])

    grads, (logits, new_stats) = _jit(jax.grad(loss_fn, has_aux=True))(params, stats)
    assert logits.shape == (4, 10)
    # numpy, not jnp, for the checks: each eager jnp op on a new shape is a new compile.
    grads, stats, new_stats = jax.device_get((grads, stats, new_stats))
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
    assert jax.tree.structure(new_stats) == jax.tree.structure(stats)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), stats, new_stats)
    assert all(jax.tree.leaves(changed))

    evaluate = _jit(lambda v: model.apply(v, x, train=False))
    new_vars = {"params": params, "batch_stats": new_stats}
    out1, out2 = evaluate(new_vars), evaluate(new_vars)
    assert np.isfinite(np.asarray(out1)).all()
    np.testing.assert_array_equal(out1, out2)


def test_bfloat16_compute_keeps_float32_params():
    model = _tiny("resnet18", dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    variables, _ = _shapes(model, x.shape)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    variables = _random_variables(model, x.shape)
    out = _jit(lambda v: model.apply(v, x))(variables)
    assert out.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out, np.float32)).all()

    # The same holds for MobileNetV3 (shape-level only, to keep the test fast).
    mv3 = _tiny("mobilenet_v3_small", dtype=jnp.bfloat16)
    mv3_vars, mv3_out = _shapes(mv3, (4, 16, 16, 3))
    assert mv3_out.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(mv3_vars))


def test_dropout_rng_only_needed_for_train_logits():
    model = _tiny("mobilenet_v3_small")
    variables, _ = _shapes(model, (2, 16, 16, 3))
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    train = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    # The pre-logit feature is taken before the dropout, so it needs no rng even in train mode.
    feats, _ = jax.eval_shape(functools.partial(train, features=True), variables, x)
    assert feats.shape == (2, 256)  # make_divisible(1024 * 0.25)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(train, variables, x)
    rngs = {"dropout": jax.random.key(0)}
    logits, _ = jax.eval_shape(functools.partial(train, rngs=rngs), variables, x)
    assert logits.shape == (2, 10)


def test_unknown_names_and_options_raise_config_error():
    with pytest.raises(ConfigError, match="resnet50.*") as err:
        models.create("resnet5")
    assert all(name in str(err.value) for name in models.list_models())
    with pytest.raises(ConfigError, match="identity, linear, mcl_embed, mlp, mlp_bn"):
        models.create_head("mlp3")
    with pytest.raises(ConfigError, match="stem"):
        models.create("mobilenet_v3_small", stem="cifar")
    with pytest.raises(ConfigError, match="imagenet"):
        _shapes(models.create("resnet18", stem="tiny"), (1, 32, 32, 3))


def test_heads():
    feats = jnp.ones((3, 48))
    mlp = models.create_head("mlp")
    params = mlp.init(jax.random.key(0), feats)["params"]
    assert params["fc_0"]["kernel"].shape == (48, 48)  # hidden_dim=None -> input width
    assert params["fc_2"]["kernel"].shape == (48, 128)
    assert mlp.apply({"params": params}, feats).shape == (3, 128)

    moco = models.create_head("mlp", out_dim=64, hidden_dim=2048)
    moco_params = jax.eval_shape(moco.init, jax.random.key(0), feats)["params"]
    assert moco_params["fc_0"]["kernel"].shape == (48, 2048)
    assert moco_params["fc_2"]["kernel"].shape == (2048, 64)

    linear = models.create_head("linear", out_dim=16)
    lin_params = linear.init(jax.random.key(0), feats)["params"]
    assert set(lin_params) == {"fc"}
    assert linear.apply({"params": lin_params}, feats).shape == (3, 16)

    identity = models.create_head("identity")
    assert identity.init(jax.random.key(0), feats) == {}
    np.testing.assert_array_equal(identity.apply({"params": {}}, feats), feats)


def test_encoder_returns_features_and_embedding():
    encoder = models.Encoder(models.create("resnet18", num_classes=10), models.create_head("mlp"))
    variables, out = _shapes(encoder, (2, 32, 32, 3))
    assert set(variables["params"]) == {"backbone", "head"}
    assert "fc" not in variables["params"]["backbone"]  # the classifier is never called
    assert variables["params"]["head"]["fc_0"]["kernel"].shape == (512, 512)
    assert out["features"].shape == (2, 512)
    assert out["embedding"].shape == (2, 128)
    train = functools.partial(encoder.apply, train=True, mutable=["batch_stats"])
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    out, updates = jax.eval_shape(train, variables, x)
    assert set(updates["batch_stats"]) == {"backbone"}


# ------------------------------------------------------------------ head_input (SEED's heads)


def _head_inputs(encoder, variables, x, train: bool, rng=None):
    """(pooled features, what the head was called with) of one jitted forward."""

    def fn(v, x, rng):
        seen = []

        def record(next_fun, args, kwargs, context):
            if context.module.name == "head" and context.method_name == "__call__":
                seen.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            out = encoder.apply(v, x, train=train, mutable=["batch_stats"] if train else False,
                                rngs=None if rng is None else {"dropout": rng})
        out = out[0] if train else out
        return out["features"], seen[0]

    return jax.device_get(_jit(fn)(variables, x, rng))


def test_seed_mbv3_recipe_head_sees_the_dropped_out_feature():
    """seed_mbv3: SEED's MobileNetV3, whose MLP replaces ``fc`` after Dropout(0.2) (SEED's
    mobilenetv3.py: classifier = Linear, h_swish, Dropout(0.2); then fc): in train mode the
    head's input is the dropped-out feature, in eval mode the feature itself."""
    cfg = load_config("seed_mbv3.py:smoke")
    assert cfg.student.model == "seed_mobilenetv3_large"
    encoder = models.build_encoder(cfg.student)
    assert encoder.head_dropout == 0.2
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    variables = random_variables(_shapes(encoder, x.shape)[0])
    feats, head_in = _head_inputs(encoder, variables, x, True, jax.random.key(2, impl="rbg"))
    assert feats.shape == (4, 320)  # make_divisible(1280 * 0.25)
    # Flax's Dropout: where(mask, x / keep, 0); XLA may divide as x * (1 / keep), two
    # float32 roundings instead of one.
    kept = head_in != 0
    np.testing.assert_allclose(head_in[kept], (feats / np.float32(0.8))[kept],
                               rtol=2 * np.finfo(np.float32).eps, atol=0)
    dropped = ~kept & (feats != 0)
    frac = dropped.sum() / (feats != 0).sum()
    # 0.2 of ~1280 Bernoulli draws: binomial sd ~0.011, so (0.1, 0.3) is ~9 sd wide.
    assert 0.1 < frac < 0.3, frac
    eval_feats, eval_in = _head_inputs(encoder, variables, x, False)
    np.testing.assert_array_equal(eval_in, eval_feats)


def test_head_input_option():
    net = {"model": "seed_mobilenetv3_small", "model_kwargs": {"width": 0.25}, "head": "mlp",
           "head_hidden": 0, "embed_dim": 8}
    # Manifests without the key (all written before it existed) keep the plain feature.
    assert models.build_encoder(net).head_dropout == 0.0
    assert models.build_encoder({**net, "head_input": "features"}).head_dropout == 0.0
    dropped = {**net, "head_input": "dropped"}
    assert models.build_encoder(dropped).head_dropout == 0.2
    assert models.build_encoder(
        {**dropped, "model_kwargs": {"width": 0.25, "dropout": 0.3}}).head_dropout == 0.3
    # lukemelas' EfficientNet: _dropout 0.2 before fc.
    assert models.build_encoder({**dropped, "model": "seed_efficientnet_b0"}).head_dropout == 0.2
    # A ResNet's fc has no dropout in front: the head sees the features as they are.
    assert models.build_encoder({**dropped, "model": "resnet18"}).head_dropout == 0.0
    with pytest.raises(ConfigError, match="head_input must be one of features, dropped"):
        models.build_encoder({**net, "head_input": "dropout"})
    with pytest.raises(ConfigError, match="num_classes=0"):
        models.build_encoder({**dropped, "num_classes": 10})
    # Exported manifests carry the key, so the trainer rebuilds the same network.
    from disco_jax import methods

    assert methods.encoder_manifest(dropped)["head_input"] == "dropped"
    assert "head_input" not in methods.encoder_manifest(net)
