"""MobileNetV3-Large/Small in Flax Linen, laid out like torchvision's MobileNetV3.

Naming rule (for a torchvision state_dict converter): joining the module components of a Flax
variable path with '_' gives the torchvision module path with '.' replaced by '_'. Each
inverted-residual block is a submodule named ``features_{i}``; inside it the names continue the
torch path, so ``params['features_4']['block_2_fc1']['kernel']`` is torch
``features.4.block.2.fc1.weight``, ``params['features_0_0']`` is the stem conv
``features.0.0`` and ``params['classifier_3']`` is ``classifier.3``. Leaf names map as in
`disco_jax.models.resnet`; depthwise kernels are (kh, kw, 1, C) vs torch's (C, 1, kh, kw).

The pre-logit feature (``features=True`` or ``num_classes=0``) is the output of
``classifier_0`` + Hardswish (1280-d Large, 1024-d Small), taken before the dropout. An encoder
with ``head_input="dropped"`` (`disco_jax.models.build_encoder`) feeds its head, in train mode,
the feature after that dropout, as SEED's student MLP sees it (see `SeedMobileNetV3`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from disco_jax.models import layers
from disco_jax.models.resnet import CONV_INIT

Dtype = Any
Activation = Callable[[jnp.ndarray], jnp.ndarray]

# torch momentum 0.01 -> Flax 0.99 (Flax weights the old running statistic).
BN_MOMENTUM = 0.99
BN_EPS = 1e-3
# torchvision initialises the classifier's Linear layers with N(0, 0.01) and zero bias.
LINEAR_INIT = nn.initializers.normal(0.01)


class BlockConfig(NamedTuple):
    """One inverted-residual block, in torchvision's ``InvertedResidualConfig`` order."""

    in_ch: int
    kernel: int
    expanded: int
    out_ch: int
    use_se: bool
    use_hs: bool  # Hardswish if True, else ReLU
    stride: int


_LARGE = (
    BlockConfig(16, 3, 16, 16, False, False, 1),
    BlockConfig(16, 3, 64, 24, False, False, 2),
    BlockConfig(24, 3, 72, 24, False, False, 1),
    BlockConfig(24, 5, 72, 40, True, False, 2),
    BlockConfig(40, 5, 120, 40, True, False, 1),
    BlockConfig(40, 5, 120, 40, True, False, 1),
    BlockConfig(40, 3, 240, 80, False, True, 2),
    BlockConfig(80, 3, 200, 80, False, True, 1),
    BlockConfig(80, 3, 184, 80, False, True, 1),
    BlockConfig(80, 3, 184, 80, False, True, 1),
    BlockConfig(80, 3, 480, 112, True, True, 1),
    BlockConfig(112, 3, 672, 112, True, True, 1),
    BlockConfig(112, 5, 672, 160, True, True, 2),
    BlockConfig(160, 5, 960, 160, True, True, 1),
    BlockConfig(160, 5, 960, 160, True, True, 1),
)
_SMALL = (
    BlockConfig(16, 3, 16, 16, True, False, 2),
    BlockConfig(16, 3, 72, 24, False, False, 2),
    BlockConfig(24, 3, 88, 24, False, False, 1),
    BlockConfig(24, 5, 96, 40, True, True, 2),
    BlockConfig(40, 5, 240, 40, True, True, 1),
    BlockConfig(40, 5, 240, 40, True, True, 1),
    BlockConfig(40, 5, 120, 48, True, True, 1),
    BlockConfig(48, 5, 144, 48, True, True, 1),
    BlockConfig(48, 5, 288, 96, True, True, 2),
    BlockConfig(96, 5, 576, 96, True, True, 1),
    BlockConfig(96, 5, 576, 96, True, True, 1),
)
ARCHS: dict[str, tuple[tuple[BlockConfig, ...], int]] = {
    "large": (_LARGE, 1280),
    "small": (_SMALL, 1024),
}


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of divisor, losing at most 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_act(
    x: jnp.ndarray,
    features: int,
    kernel: int,
    act: Activation | None,
    prefix: str,
    train: bool,
    dtype: Dtype,
    stride: int = 1,
    groups: int = 1,
    bn_momentum: float = BN_MOMENTUM,
) -> jnp.ndarray:
    """torchvision's ``Conv2dNormActivation``: ``{prefix}_0`` conv, ``{prefix}_1`` BN, act.

    Called from inside a compact method, so the layers become children of that module.
    """
    x = layers.conv(
        features, kernel, f"{prefix}_0", dtype, stride, groups, kernel_init=CONV_INIT
    )(x)
    x = layers.batch_norm(train, dtype, f"{prefix}_1", bn_momentum, BN_EPS)(x)
    return x if act is None else act(x)


def _squeeze_excite(x: jnp.ndarray, prefix: str, dtype: Dtype) -> jnp.ndarray:
    """The SE gate: pool -> 1x1 conv ``fc1`` -> ReLU -> 1x1 conv ``fc2`` -> Hardsigmoid."""
    channels = x.shape[-1]
    conv = lambda n, name: nn.Conv(
        n, (1, 1), kernel_init=CONV_INIT, dtype=dtype, param_dtype=jnp.float32, name=name
    )
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(conv(make_divisible(channels // 4), f"{prefix}_fc1")(s))
    return nn.hard_sigmoid(conv(channels, f"{prefix}_fc2")(s))


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise kxk -> optional squeeze-excite -> project 1x1."""

    cfg: BlockConfig  # channel counts already scaled by the width multiplier
    dtype: Dtype = jnp.float32
    bn_momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        cfg, dtype, m = self.cfg, self.dtype, self.bn_momentum
        act = nn.hard_swish if cfg.use_hs else nn.relu
        y = x
        # torch numbers the block's children consecutively, so the index depends on which
        # optional layers exist.
        j = 0
        if cfg.expanded != cfg.in_ch:
            y = _conv_bn_act(y, cfg.expanded, 1, act, f"block_{j}", train, dtype, bn_momentum=m)
            j += 1
        y = _conv_bn_act(
            y, cfg.expanded, cfg.kernel, act, f"block_{j}", train, dtype, cfg.stride, cfg.expanded,
            bn_momentum=m,
        )
        j += 1
        if cfg.use_se:
            y = y * _squeeze_excite(y, f"block_{j}", dtype)
            j += 1
        y = _conv_bn_act(y, cfg.out_ch, 1, None, f"block_{j}", train, dtype, bn_momentum=m)
        if cfg.stride == 1 and cfg.in_ch == cfg.out_ch:
            y = y + x
        return y


class MobileNetV3(nn.Module):
    """A torchvision-compatible MobileNetV3; ``num_classes=0`` drops the last Linear."""

    arch: str  # a key of ARCHS
    num_classes: int = 1000
    width: float = 1.0
    dropout: float = 0.2
    dtype: Dtype = jnp.float32
    # Flax convention (weight of the old statistic); 0.99 is torchvision's momentum 0.01.
    bn_momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, features: bool | str = False) -> Any:
        blocks, last_channel = ARCHS[self.arch]
        dtype, m = self.dtype, self.bn_momentum
        ch = lambda c: make_divisible(c * self.width)
        x = _conv_bn_act(
            x, ch(blocks[0].in_ch), 3, nn.hard_swish, "features_0", train, dtype, 2, bn_momentum=m
        )
        for i, b in enumerate(blocks, start=1):
            cfg = b._replace(in_ch=ch(b.in_ch), expanded=ch(b.expanded), out_ch=ch(b.out_ch))
            x = InvertedResidual(cfg, dtype, m, name=f"features_{i}")(x, train)
        # torchvision uses 6x the last block's channels here without re-rounding.
        last = f"features_{len(blocks) + 1}"
        x = _conv_bn_act(
            x, 6 * ch(blocks[-1].out_ch), 1, nn.hard_swish, last, train, dtype, bn_momentum=m
        )
        x = jnp.mean(x, axis=(1, 2))

        dense = lambda n, name: nn.Dense(
            n, kernel_init=LINEAR_INIT, dtype=dtype, param_dtype=jnp.float32, name=name
        )
        x = nn.hard_swish(dense(ch(last_channel), "classifier_0")(x))
        def classify(x: jnp.ndarray) -> jnp.ndarray:
            x = nn.Dropout(self.dropout, deterministic=not train, name="classifier_2")(x)
            return dense(self.num_classes, "classifier_3")(x)

        return layers.classifier_output(x, features, self.num_classes, classify)


mobilenet_v3_large = partial(MobileNetV3, arch="large")
mobilenet_v3_small = partial(MobileNetV3, arch="small")


# --------------------------------------------------------------------------------------------
# SEED's own MobileNetV3 (jacobswan1/SEED seed/architectures/mobilenet/mobilenetv3.py, a
# d-li14-style port), registered as seed_mobilenetv3_large/small.


class SeedBlock(nn.Module):
    """SEED's InvertedResidual: children ``conv_{k}`` of its ``self.conv`` Sequential.

    Without expansion: dw conv_0, BN conv_1, act, SE conv_3, pw conv_4, BN conv_5. With it:
    pw conv_0, BN conv_1, act, dw conv_3, BN conv_4, SE conv_5, act, pwl conv_7, BN conv_8 --
    note the SE *before* the activation here (torchvision applies it after). The SE is
    ``conv_{k}_fc_0`` / ``conv_{k}_fc_2`` Linear layers; a missing SE is an Identity that keeps
    its index.
    """

    cfg: BlockConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        cfg, dtype = self.cfg, self.dtype
        act = nn.hard_swish if cfg.use_hs else nn.relu
        conv = lambda n, k, name, stride=1, groups=1: layers.conv(
            n, k, name, dtype, stride, groups, kernel_init=CONV_INIT
        )
        bn = lambda name: layers.batch_norm(train, dtype, name)  # torch defaults: 0.1, 1e-5
        dense = lambda n, name: nn.Dense(
            n, kernel_init=LINEAR_INIT, dtype=dtype, param_dtype=jnp.float32, name=name
        )

        def se(y: jnp.ndarray, k: int) -> jnp.ndarray:
            if not cfg.use_se:
                return y
            c = y.shape[-1]
            s = nn.relu(dense(make_divisible(c // 4), f"conv_{k}_fc_0")(jnp.mean(y, axis=(1, 2))))
            return y * nn.hard_sigmoid(dense(c, f"conv_{k}_fc_2")(s))[:, None, None, :]

        dw = lambda y, k: conv(cfg.expanded, cfg.kernel, f"conv_{k}", cfg.stride, cfg.expanded)(y)
        if cfg.in_ch == cfg.expanded:
            y = act(bn("conv_1")(dw(x, 0)))
            y = bn("conv_5")(conv(cfg.out_ch, 1, "conv_4")(se(y, 3)))
        else:
            y = act(bn("conv_1")(conv(cfg.expanded, 1, "conv_0")(x)))
            y = act(se(bn("conv_4")(dw(y, 3)), 5))
            y = bn("conv_8")(conv(cfg.out_ch, 1, "conv_7")(y))
        return x + y if cfg.stride == 1 and cfg.in_ch == cfg.out_ch else y


class SeedMobileNetV3(nn.Module):
    """SEED's MobileNetV3: ``features_{i}`` blocks, ``conv`` head, ``classifier_0``, ``fc``.

    It differs from torchvision's in more than names: the SE of expanding blocks sits before
    the activation, SE layers are Linear, and BN is torch's default (eps 1e-5, momentum 0.1).
    Same channels and parameter count as torchvision's (5,483,032 Large, 2,542,856 Small). The
    pooled feature is ``classifier_0`` + Hardswish (1280 / 1024); SEED's ``classifier`` ends
    with Dropout(0.2) (``classifier_2``) and its student MLP replaces ``fc``, so in train mode
    the MLP sees the dropped-out feature: an encoder with ``head_input="dropped"``. ``width``
    scales every width, the 1280/1024 layer included (SEED keeps it fixed below width 1).
    """

    arch: str  # a key of ARCHS
    num_classes: int = 1000
    width: float = 1.0
    dropout: float = 0.2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, features: bool | str = False) -> Any:
        blocks, last_channel = ARCHS[self.arch]
        dtype = self.dtype
        ch = lambda c: make_divisible(c * self.width)
        dense = lambda n, name: nn.Dense(
            n, kernel_init=LINEAR_INIT, dtype=dtype, param_dtype=jnp.float32, name=name
        )
        x = layers.conv(ch(blocks[0].in_ch), 3, "features_0_0", dtype, 2, kernel_init=CONV_INIT)(x)
        x = nn.hard_swish(layers.batch_norm(train, dtype, "features_0_1")(x))
        for i, b in enumerate(blocks, start=1):
            cfg = b._replace(in_ch=ch(b.in_ch), expanded=ch(b.expanded), out_ch=ch(b.out_ch))
            x = SeedBlock(cfg, dtype, name=f"features_{i}")(x, train)
        x = layers.conv(ch(blocks[-1].expanded), 1, "conv_0", dtype, kernel_init=CONV_INIT)(x)
        x = nn.hard_swish(layers.batch_norm(train, dtype, "conv_1")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.hard_swish(dense(ch(last_channel), "classifier_0")(x))

        def classify(x: jnp.ndarray) -> jnp.ndarray:
            x = nn.Dropout(self.dropout, deterministic=not train, name="classifier_2")(x)
            return dense(self.num_classes, "fc")(x)

        return layers.classifier_output(x, features, self.num_classes, classify)


seed_mobilenetv3_large = partial(SeedMobileNetV3, arch="large")
seed_mobilenetv3_small = partial(SeedMobileNetV3, arch="small")
