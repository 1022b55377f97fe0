"""Extended model zoo: EfficientNet, timm MobileNetV3, wide / SwAV ResNets, MCL's CIFAR nets.

Parameter counts and shapes come from `jax.eval_shape` (nothing is allocated); one tiny real
train step per new family runs at small width and resolution, since each compile (slower
with the 8 fake CPU devices of conftest.py) dominates the time.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax import models
from disco_jax.errors import ConfigError
from tests.helpers import load_config, random_variables, sizes, slow_where
from tests.test_models import TORCHVISION_PARAMS


def _bottleneck_resnet(stem: int, stages, inner_mult: int, classes: int, stem_kernel: int) -> int:
    """Parameters of a torchvision-style bottleneck ResNet, counted from its definition.

    Convs have no bias; each BN adds 2C; a stage's first block has a 1x1 conv + BN shortcut
    whenever the shape changes; the classifier is Linear(4 * last planes, classes).
    """
    p = 3 * stem_kernel**2 * stem + 2 * stem
    in_ch = stem
    for i, n in enumerate(stages):
        planes = stem * 2**i
        inner, out = planes * inner_mult, 4 * planes
        for j in range(n):
            p += in_ch * inner + 9 * inner * inner + inner * out + 2 * (2 * inner + out)
            if j == 0 and (in_ch != out or i > 0):
                p += in_ch * out + 2 * out
            in_ch = out
    return p + (in_ch + 1) * classes


def _basic_cifar_resnet(n: int, classes: int) -> int:
    """MCL resnet32/56: 3x3 stem (16), three stages of n BasicBlocks at 16/32/64 planes."""
    p = 27 * 16 + 2 * 16
    in_ch = 16
    for planes in (16, 32, 64):
        for _ in range(n):
            p += 9 * in_ch * planes + 9 * planes * planes + 4 * planes
            if in_ch != planes:  # 1x1 conv + BN downsample in each later stage's first block
                p += in_ch * planes + 2 * planes
            in_ch = planes
    return p + (64 + 1) * classes


def _wrn(depth: int, k: int, classes: int) -> int:
    """MCL WRN-depth-k: 3x3 stem (16), (depth-4)/6 pre-act blocks per stage at 16k/32k/64k."""
    n = (depth - 4) // 6
    p = 27 * 16
    in_ch = 16
    for out in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            # bn1 on the input, conv1 3x3, bn2, conv2 3x3, and a 1x1 shortcut if widths differ.
            p += 2 * in_ch + 9 * in_ch * out + 2 * out + 9 * out * out
            p += in_ch * out if in_ch != out else 0
            in_ch = out
    return p + 2 * in_ch + (in_ch + 1) * classes  # final BN + fc


def _lukemelas_efficientnet(depth_mult: float, classes: int) -> int:
    """Parameters of lukemelas' EfficientNet (width 1.0; SEED's copy), from its block strings.

    Bias-free convs, 2C per BN, SE 1x1 convs with bias (squeeze int(block input * 0.25)), no
    expand conv where the ratio is 1, head conv to 1280, Linear(1280, classes).
    """
    blocks = ((1, 3, 32, 16, 1), (6, 3, 16, 24, 2), (6, 5, 24, 40, 2), (6, 3, 40, 80, 3),
              (6, 5, 80, 112, 3), (6, 5, 112, 192, 4), (6, 3, 192, 320, 1))  # fmt: skip
    p = 3 * 9 * 32 + 2 * 32
    for e, k, inp, out, n in blocks:
        for j in range(int(math.ceil(depth_mult * n))):
            inp = inp if j == 0 else out
            mid, sq = inp * e, max(1, int(inp * 0.25))
            p += (inp * mid + 2 * mid) if e != 1 else 0
            p += k * k * mid + 2 * mid + (mid * sq + sq) + (sq * mid + mid)
            p += mid * out + 2 * out
    return p + 320 * 1280 + 2 * 1280 + (1280 + 1) * classes


# (parameter count, num_classes, feature dim, input size).
# efficientnet_b0/b1 and wide_resnet50_2 are torchvision's published counts. The rest are
# derived from the architecture definitions by the counters above, independent of the Flax code:
# timm mobilenetv3_*_100 have torchvision MobileNetV3's channels and the same number of params
# per layer (timm's conv_head 1x1 conv with bias == torchvision's Linear(960, 1280)), so they
# equal torchvision's 5,483,032 / 2,542,856 (timm reports 5.48M / 2.54M); SwAV RN50-wN widens
# every layer of ResNet-50 by N (backbone 93.9M for w2, SwAV README: 94M / 375M / 586M) plus a
# 1000-class fc; MCL's CIFAR nets are counted with their natural 100 classes (CIFAR-100):
# resnet8 0.08M, resnet32 0.47M, resnet56 0.86M, resnet110 (bottleneck) 1.17M, WRN-16-2 0.70M,
# WRN-40-2 2.26M, WRN-28-4 5.87M.
ZOO = {
    # torchvision's resnet18 (11,689,512) less its second basic block in each stage
    # (73,984 + 295,424 + 1,180,672 + 4,720,640 parameters).
    "resnet10": (5_418_792, 1000, 512, 224),
    "efficientnet_b0": (5_288_548, 1000, 1280, 224),
    "efficientnet_b1": (7_794_184, 1000, 1280, 224),
    "wide_resnet50_2": (68_883_240, 1000, 2048, 224),
    "mobilenetv3_large_100": (5_483_032, 1000, 1280, 224),
    "mobilenetv3_small_100": (2_542_856, 1000, 1024, 224),
    # timm's efficientnet_b0/b1: torchvision's network under timm's names (timm: 5.29M / 7.79M).
    "timm_efficientnet_b0": (5_288_548, 1000, 1280, 224),
    "timm_efficientnet_b1": (7_794_184, 1000, 1280, 224),
    # SEED's MobileNetV3: torchvision's channels, Linear SE layers (same params as 1x1 convs).
    "seed_mobilenetv3_large": (5_483_032, 1000, 1280, 224),
    "seed_mobilenetv3_small": (2_542_856, 1000, 1024, 224),
    # SEED's lukemelas EfficientNet: torchvision's network (same count) with TF padding, BN eps
    # 1e-3; counted by _lukemelas_efficientnet and by the torch reference in test_convert_zoo.
    "seed_efficientnet_b0": (5_288_548, 1000, 1280, 224),
    "seed_efficientnet_b1": (7_794_184, 1000, 1280, 224),
    "swav_resnet50w2": (98_004_072, 1000, 4096, 224),
    "swav_resnet50w4": (383_571_176, 1000, 8192, 224),
    "swav_resnet50w5": (596_691_240, 1000, 10240, 224),
    "resnet8": (83_892, 100, 64, 32),
    "resnet32": (472_756, 100, 64, 32),
    "resnet56": (861_620, 100, 64, 32),
    "resnet110": (1_170_868, 100, 256, 32),
    "wrn_16_2": (703_284, 100, 128, 32),
    "wrn_40_2": (2_255_156, 100, 128, 32),
    "wrn_28_4": (5_872_180, 100, 256, 32),
}
CLASSIFIER = {
    "timm": "classifier",
    "seed": "fc",
    "efficientnet": "classifier_1",
    "mobilenetv3": "classifier",
    "wide": "fc",
    "swav": "fc",
    "resnet10": "fc",  # torchvision's layout (the CIFAR resnet32/56/110 have `classifier`)
    "resnet": "classifier",
    "wrn": "fc",
}
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _classifier(name: str) -> str:
    return next(v for k, v in CLASSIFIER.items() if name.startswith(k))


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _shapes(model, x_shape, **kwargs):
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    return variables, jax.eval_shape(functools.partial(model.apply, **kwargs), variables, x)


def test_derived_counts_match_the_table():
    assert _bottleneck_resnet(64, (3, 4, 6, 3), 2, 1000, 7) == ZOO["wide_resnet50_2"][0]
    for w in (2, 4, 5):
        counted = _bottleneck_resnet(64 * w, (3, 4, 6, 3), 1, 1000, 7)
        assert counted == ZOO[f"swav_resnet50w{w}"][0]
    assert _bottleneck_resnet(64 * 2, (3, 4, 6, 3), 1, 0, 7) == 93_907_072  # perf.md: 93.9M
    assert _basic_cifar_resnet(1, 100) == ZOO["resnet8"][0]
    assert _basic_cifar_resnet(5, 100) == ZOO["resnet32"][0]
    assert _basic_cifar_resnet(9, 100) == ZOO["resnet56"][0]
    assert _bottleneck_resnet(16, (12, 12, 12), 1, 100, 3) == ZOO["resnet110"][0]
    assert _wrn(16, 2, 100) == ZOO["wrn_16_2"][0]
    assert _wrn(40, 2, 100) == ZOO["wrn_40_2"][0]
    assert _wrn(28, 4, 100) == ZOO["wrn_28_4"][0]
    assert _lukemelas_efficientnet(1.0, 1000) == ZOO["seed_efficientnet_b0"][0]
    assert _lukemelas_efficientnet(1.1, 1000) == ZOO["seed_efficientnet_b1"][0]


@pytest.mark.parametrize("name", sizes(sorted(ZOO)))
def test_param_count_feature_dims_and_headless(name):
    count, classes, d, size = ZOO[name]
    model = models.create(name, num_classes=classes)
    variables, logits = _shapes(model, (2, size, size, 3))
    assert _count(variables["params"]) == count
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    assert logits.shape == (2, classes)

    # num_classes=0 (the same code path as features=True): no classifier params, the pooled
    # d-dim features out; a small input keeps the trace cheap.
    headless, out = _shapes(models.create(name, num_classes=0), (2, 32, 32, 3))
    assert out.shape == (2, d)
    assert _classifier(name) not in headless["params"]
    assert _count(headless["params"]) == count - (d + 1) * classes


def test_registry_and_unknown_names():
    # The original zoo (tests/test_models.py) plus the new models, nothing else.
    assert sorted(models.list_models()) == sorted({*TORCHVISION_PARAMS, *ZOO})
    with pytest.raises(ConfigError, match="unknown model 'efficientnet_b7'") as err:
        models.create("efficientnet_b7")
    assert "wrn_40_2" in str(err.value) and "swav_resnet50w2" in str(err.value)
    with pytest.raises(ConfigError, match="stem"):
        models.create("efficientnet_b0", stem="cifar")
    with pytest.raises(ConfigError, match="widen"):
        models.create("resnet50", widen=2)  # SwAV widening is a name, not an option


def test_module_names_follow_the_source_layouts():
    eff, _ = _shapes(models.create("efficientnet_b0"), (1, 32, 32, 3))
    p = eff["params"]
    assert p["features_0_0"]["kernel"].shape == (3, 3, 3, 32)
    # features.1.0 has expand ratio 1 (no expand conv): depthwise, SE (squeeze 32 // 4), project.
    assert p["features_1_0"]["block_0_0"]["kernel"].shape == (3, 3, 1, 32)
    assert p["features_1_0"]["block_1_fc1"]["kernel"].shape == (1, 1, 32, 8)
    # features.2.0: expand 16 -> 96; the SE squeeze uses the block *input* width: 16 // 4.
    blk = p["features_2_0"]
    assert blk["block_0_0"]["kernel"].shape == (1, 1, 16, 96)
    assert blk["block_2_fc1"]["kernel"].shape == (1, 1, 96, 4)
    assert blk["block_3_0"]["kernel"].shape == (1, 1, 96, 24)
    assert p["features_8_0"]["kernel"].shape == (1, 1, 320, 1280)
    assert p["classifier_1"]["kernel"].shape == (1280, 1000)

    mv3, _ = _shapes(models.create("mobilenetv3_large_100"), (1, 32, 32, 3))
    p = mv3["params"]
    assert {"conv_stem", "bn1", "conv_head", "classifier"} <= set(p)
    assert set(p["blocks_0_0"]) == {"conv_dw", "bn1", "conv_pw", "bn2"}
    assert set(p["blocks_2_0"]) == {
        *"conv_pw bn1 conv_dw bn2 se_conv_reduce se_conv_expand conv_pwl bn3".split()
    }
    assert p["blocks_2_0"]["se_conv_reduce"]["kernel"].shape == (1, 1, 72, 24)
    assert {"blocks_6_0_conv", "blocks_6_0_bn1"} <= set(p)  # the final ConvBnAct
    assert p["conv_head"]["kernel"].shape == (1, 1, 960, 1280)
    assert p["conv_head"]["bias"].shape == (1280,)

    wide, _ = _shapes(models.create("wide_resnet50_2"), (1, 32, 32, 3))
    assert wide["params"]["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert wide["params"]["layer1_0"]["conv3"]["kernel"].shape == (1, 1, 128, 256)
    swav, _ = _shapes(models.create("swav_resnet50w2"), (1, 32, 32, 3))
    assert swav["params"]["conv1"]["kernel"].shape == (7, 7, 3, 128)
    assert swav["params"]["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert swav["params"]["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 1024, 4096)

    wrn, _ = _shapes(models.create("wrn_16_2", num_classes=100), (1, 32, 32, 3))
    assert set(wrn["params"]["block1_layer_0"]) == {"bn1", "conv1", "bn2", "conv2", "convShortcut"}
    assert "convShortcut" not in wrn["params"]["block1_layer_1"]
    r110, _ = _shapes(models.create("resnet110", num_classes=100), (1, 32, 32, 3))
    assert r110["params"]["layer1_0"]["downsample_0"]["kernel"].shape == (1, 1, 16, 64)
    assert r110["params"]["layer3_11"]["conv3"]["kernel"].shape == (1, 1, 64, 256)


# One small network per new family, run for real: a train-mode step (BN statistics update,
# dropout / stochastic depth rngs) and an eval forward with the updated statistics.
# The gradient is taken only where it is cheap enough to compile: MobileNetV3's timm blocks
# are the EfficientNet blocks' pieces, and the wide / SwAV ResNets differ from the tested
# ResNets only in channel counts, which the shape tests above check.
_TINY = {
    "efficientnet_b0": (dict(width=0.25, stochastic_depth_prob=0.2), True),
    "mobilenetv3_small_100": (dict(width=0.25, dropout=0.2), False),
    "resnet32": (dict(width=0.5), True),
    "wrn_16_2": (dict(width=0.5), True),
}


# EfficientNet-B0's gradient in the full run only: at 22 s (2 cores) it was the quick tier's
# slowest test. The quick tier keeps the network's forward against PyTorch's
# (tests/test_convert_zoo.py) and traces its train mode with stochastic depth
# (test_stochastic_depth_and_dropout_need_rng_only_when_active).
@pytest.mark.parametrize("name", slow_where(sorted(_TINY), lambda n: n == "efficientnet_b0"))
def test_tiny_train_step_and_eval(name):
    kwargs, with_grad = _TINY[name]
    model = models.create(name, num_classes=10, **kwargs)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    variables = random_variables(_shapes(model, x.shape)[0])

    def loss_fn(params, stats):
        out, updates = model.apply(
            {"params": params, "batch_stats": stats},
            x,
            train=True,
            mutable=["batch_stats"],
            # rbg keys: threefry's random-bit code is slow to compile on CPU.
            rngs={"dropout": jax.random.key(2, impl="rbg")},
        )
        return jnp.mean(out**2), (out, updates["batch_stats"])

    def step(variables):
        params, stats = variables["params"], variables["batch_stats"]
        if with_grad:
            return jax.grad(loss_fn, has_aux=True)(params, stats)
        return None, loss_fn(params, stats)[1]

    grads, (logits, new_stats) = jax.device_get(_jit(step)(variables))
    # A separate small program: fused with the gradient it compiled slower than on its own.
    evaluate = _jit(lambda v: model.apply(v, x, train=False))
    evals = np.asarray(evaluate({"params": variables["params"], "batch_stats": new_stats}))
    assert logits.shape == (4, 10) and evals.shape == (4, 10)
    assert np.isfinite(logits).all() and np.isfinite(evals).all()
    if with_grad:
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
        assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
    old = jax.device_get(variables["batch_stats"])
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), old, new_stats)
    assert all(jax.tree.leaves(changed))


def test_stochastic_depth_and_dropout_need_rng_only_when_active():
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    eff = models.create("efficientnet_b0", num_classes=10, width=0.25)
    variables, _ = _shapes(eff, x.shape)
    train = functools.partial(eff.apply, train=True, mutable=["batch_stats"])
    # Default stochastic_depth_prob=0: the train-mode feature path needs no rng.
    feats, _ = jax.eval_shape(functools.partial(train, features=True), variables, x)
    assert feats.shape == (2, 320)  # 4 * make_divisible(320 * 0.25)
    sd = models.create("efficientnet_b0", num_classes=10, width=0.25, stochastic_depth_prob=0.2)
    sd_train = functools.partial(sd.apply, train=True, mutable=["batch_stats"], features=True)
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(sd_train, variables, x)
    # Eval mode never needs one.
    assert jax.eval_shape(sd.apply, variables, x).shape == (2, 10)


def test_model_listing_uses_native_settings(capsys, monkeypatch):
    from disco_jax.models import __main__ as listing

    for name, (_, classes, _, size) in ZOO.items():
        assert listing.native_setting(name) == (size, classes), name
    assert listing.native_setting("resnet50") == (224, 1000)
    # The printout, restricted to two models (FLOPs skipped: cost analysis is what is slow).
    monkeypatch.setattr(listing, "list_models", lambda: ["resnet32", "mobilenet_v3_small"])
    monkeypatch.setattr(listing, "_flops", lambda *a: None)
    listing.main()
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["resnet32", "472,756"] and out[1].endswith("32 px, 100 classes")
    assert out[2].split()[:2] == ["mobilenet_v3_small", "2,542,856"]
    assert out[2].endswith("224 px, 1000 classes") and "32 px / 100 classes" in out[-1]



def test_seed_efficientnet_recipes_train_with_drop_connect():
    """SEED's EfficientNet student (lukemelas: drop_connect_rate 0.2) drops residual branches in
    train mode: the pooled features (before the head's dropout) differ between two dropout
    rngs; in eval mode they do not."""
    cfg = load_config("seed_effb0.py:smoke")
    # The small-patch recipe trains the same student.
    assert load_config("seed_multicrop_effb0.py:smoke").student == cfg.student
    assert cfg.student.model == "seed_efficientnet_b0"
    encoder = models.build_encoder(cfg.student)
    assert encoder.backbone.stochastic_depth_prob == 0.2 and encoder.head_dropout == 0.2
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    variables = random_variables(_shapes(encoder, x.shape)[0])

    def features(train, v, key):
        out = encoder.apply(v, x, train=train, mutable=["batch_stats"] if train else False,
                            rngs={"dropout": key})
        return (out[0] if train else out)["features"]

    keys = [jax.random.key(k, impl="rbg") for k in (2, 3, 2)]
    train = _jit(functools.partial(features, True))
    a, b, a2 = (np.asarray(train(variables, k)) for k in keys)
    np.testing.assert_array_equal(a, a2)  # the rng alone decides (without drop-connect: a == b)
    assert not np.array_equal(a, b)
    evaluate = _jit(functools.partial(features, False))
    np.testing.assert_array_equal(evaluate(variables, keys[0]), evaluate(variables, keys[1]))
