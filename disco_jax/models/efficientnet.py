"""EfficientNet-B0/B1 (torchvision, timm and SEED/lukemelas layouts) and timm's MobileNetV3.

Both are built from the same pieces (conv-BN-act, depthwise conv, squeeze-excite), which is
why timm's MobileNetV3 lives here: timm builds it with its EfficientNet builder.

Naming rule (for a state_dict converter): joining the module components of a Flax variable
path with '_' gives the torch module path with '.' replaced by '_'. Leaf names map as in
`disco_jax.models.resnet`; depthwise kernels are (kh, kw, 1, C) vs torch's (C, 1, kh, kw).

- torchvision ``efficientnet_b0/b1``: the stem is ``features_0_0`` (conv) / ``features_0_1``
  (BN); block j of stage s is a submodule ``features_{s}_{j}`` whose children continue the torch
  path (``block_{k}_0`` conv, ``block_{k}_1`` BN, ``block_{k}_fc1`` / ``block_{k}_fc2`` for the
  squeeze-excite), so ``params['features_2_0']['block_2_fc1']['bias']`` is torch
  ``features.2.0.block.2.fc1.bias``. The head conv is ``features_8_0/1`` and the classifier
  Linear ``classifier_1`` (``classifier.0`` is the dropout). BN eps 1e-5 and torch momentum 0.1
  (eps 1e-3 is only for B5-B7 and V2). The feature is the pooled 1280-d head output.
- timm ``mobilenetv3_large_100/small_100``: ``conv_stem``, ``bn1``, block j of stage i is
  ``blocks_{i}_{j}`` with timm's children (depthwise-separable first block: ``conv_dw``, ``bn1``,
  ``se_conv_reduce``, ``se_conv_expand``, ``conv_pw``, ``bn2``; inverted residuals: ``conv_pw``,
  ``bn1``, ``conv_dw``, ``bn2``, ``se_conv_reduce``, ``se_conv_expand``, ``conv_pwl``, ``bn3``;
  the last stage is a 1x1 ``conv`` + ``bn1``), then ``conv_head`` (a 1x1 conv *with bias* on
  the pooled map, kernel (1, 1, 960, 1280)) and ``classifier``. timm's BatchNormAct2d keeps the
  plain BN state_dict names. timm uses torch's default BN (eps 1e-5, momentum 0.1), not the
  eps 1e-3 / momentum 0.01 of torchvision's MobileNetV3. The feature is the 1280-d (Large) or
  1024-d (Small) ``conv_head`` + Hardswish output, before timm's dropout.

- SEED's ``efficientnet_b0/b1`` (lukemelas/EfficientNet-PyTorch): see `SeedEfficientNet`.
  lukemelas' names start with '_' (``_blocks.3._se_reduce``), so the Flax names do too:
  ``params['_blocks_3']['_se_reduce']`` joins to ``_blocks_3__se_reduce``.

Differences on purpose: ``width`` scales every channel count (timm keeps its 1280/1024 head
width fixed; here it scales too, so tiny test models stay tiny); torchvision's stochastic depth
defaults to off (torchvision uses 0.2 at train time, which would need a 'dropout' rng in every
train step); timm's classifier dropout defaults to 0 as in timm's constructor. SEED's
(lukemelas') drop-connect keeps its official 0.2: SEED's students train with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from disco_jax.errors import ConfigError
from disco_jax.models import layers
from disco_jax.models.mobilenetv3 import ARCHS, BlockConfig, make_divisible

Dtype = Any
Activation = Callable[[jnp.ndarray], jnp.ndarray]

# torch momentum 0.1 -> Flax 0.9; both torchvision EfficientNet-B0/B1 and timm MobileNetV3 use
# torch's BatchNorm2d defaults.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5
# torchvision EfficientNet: Linear weight U(+-1/sqrt(out_features)), bias 0.
EFFNET_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def _goog_conv_init(groups: int) -> nn.initializers.Initializer:
    """timm's ``_init_weight_goog`` conv init: N(0, 2 / fan_out) with fan_out divided by groups.

    Flax's fan_out of a depthwise kernel (kh, kw, 1, C) is kh*kw*C; timm divides by the groups.
    """

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        fan_out = shape[0] * shape[1] * shape[-1] // groups
        return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)

    return init


_conv = layers.conv


def _bn(train: bool, dtype: Dtype, name: str) -> layers.BatchNorm:
    return layers.batch_norm(train, dtype, name, BN_MOMENTUM, BN_EPS)


def _dropout_dense(rate: float, num_classes: int, init: nn.initializers.Initializer,
                   dtype: Dtype, train: bool, name: str, dropout_name: str | None = None):
    """The classifier every network here ends with: dropout, then a float32-param Dense.

    Call inside the parent's compact method, so both modules are its children under the
    given names (the source implementation's, for checkpoint conversion).
    """

    def classify(x: jnp.ndarray) -> jnp.ndarray:
        x = nn.Dropout(rate, deterministic=not train, name=dropout_name)(x)
        return nn.Dense(num_classes, kernel_init=init, dtype=dtype, param_dtype=jnp.float32,
                        name=name)(x)

    return classify


def _stochastic_depth(module: nn.Module, y: jnp.ndarray, prob: float, train: bool) -> jnp.ndarray:
    """Drop a residual branch per sample and rescale survivors by 1 / survival rate.

    torchvision's StochasticDepth(mode="row") and lukemelas' drop_connect (floor(keep + U) is a
    Bernoulli(keep) mask) are the same operation; only at train time with ``prob > 0`` does it
    need a 'dropout' rng.
    """
    if not train or prob <= 0:
        return y
    keep = 1.0 - prob
    shape = (y.shape[0],) + (1,) * (y.ndim - 1)
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, shape)
    return jnp.where(mask, y / keep, 0).astype(y.dtype)


# --------------------------------------------------------------------------------------------
# torchvision EfficientNet-B0/B1


class MBConvConfig(NamedTuple):
    """One stage, in torchvision's ``MBConvConfig`` order (before width/depth scaling)."""

    expand_ratio: int
    kernel: int
    stride: int
    in_ch: int
    out_ch: int
    num_layers: int


_B0_STAGES = (
    MBConvConfig(1, 3, 1, 32, 16, 1),
    MBConvConfig(6, 3, 2, 16, 24, 2),
    MBConvConfig(6, 5, 2, 24, 40, 2),
    MBConvConfig(6, 3, 2, 40, 80, 3),
    MBConvConfig(6, 5, 1, 80, 112, 3),
    MBConvConfig(6, 5, 2, 112, 192, 4),
    MBConvConfig(6, 3, 1, 192, 320, 1),
)
# name -> (width_mult, depth_mult); torchvision's classifier dropout is 0.2 for both.
EFFICIENTNET_ARCHS: dict[str, tuple[float, float]] = {"b0": (1.0, 1.0), "b1": (1.0, 1.1)}


class MBConv(nn.Module):
    """torchvision's MBConv: [expand 1x1] -> depthwise kxk -> SE -> project 1x1 (+ residual)."""

    expand_ratio: int
    kernel: int
    stride: int
    in_ch: int  # already width-scaled
    out_ch: int
    drop_prob: float = 0.0  # stochastic depth ("row" mode), only at train time
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        dtype = self.dtype
        expanded = make_divisible(self.in_ch * self.expand_ratio)
        y = x
        # torch numbers the block's children consecutively; the expand conv is optional.
        k = 0
        if expanded != self.in_ch:
            y = _conv(expanded, 1, f"block_{k}_0", dtype)(y)
            y = nn.silu(_bn(train, dtype, f"block_{k}_1")(y))
            k += 1
        y = _conv(expanded, self.kernel, f"block_{k}_0", dtype, self.stride, expanded)(y)
        y = nn.silu(_bn(train, dtype, f"block_{k}_1")(y))
        k += 1
        # The squeeze width comes from the block *input* channels, not the expanded ones.
        squeeze = max(1, self.in_ch // 4)
        s = jnp.mean(y, axis=(1, 2), keepdims=True)
        s = nn.silu(_conv(squeeze, 1, f"block_{k}_fc1", dtype, bias=True)(s))
        y = y * nn.sigmoid(_conv(expanded, 1, f"block_{k}_fc2", dtype, bias=True)(s))
        k += 1
        y = _conv(self.out_ch, 1, f"block_{k}_0", dtype)(y)
        y = _bn(train, dtype, f"block_{k}_1")(y)
        if self.stride == 1 and self.in_ch == self.out_ch:
            y = _stochastic_depth(self, y, self.drop_prob, train) + x
        return y


class EfficientNet(nn.Module):
    """A torchvision-compatible EfficientNet-B0/B1; ``num_classes=0`` drops ``classifier_1``."""

    arch: str  # a key of EFFICIENTNET_ARCHS
    num_classes: int = 1000
    width: float = 1.0
    dropout: float = 0.2
    # torchvision trains with 0.2; 0 keeps train steps free of a 'dropout' rng requirement.
    stochastic_depth_prob: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, features: bool | str = False) -> Any:
        width_mult, depth_mult = EFFICIENTNET_ARCHS[self.arch]
        dtype = self.dtype
        ch = lambda c: make_divisible(c * width_mult * self.width)
        depths = [int(math.ceil(s.num_layers * depth_mult)) for s in _B0_STAGES]
        total = sum(depths)

        x = _conv(ch(_B0_STAGES[0].in_ch), 3, "features_0_0", dtype, stride=2)(x)
        x = nn.silu(_bn(train, dtype, "features_0_1")(x))
        block_id = 0
        for s, (cfg, depth) in enumerate(zip(_B0_STAGES, depths, strict=True), start=1):
            for j in range(depth):
                x = MBConv(
                    cfg.expand_ratio,
                    cfg.kernel,
                    cfg.stride if j == 0 else 1,
                    ch(cfg.in_ch) if j == 0 else ch(cfg.out_ch),
                    ch(cfg.out_ch),
                    # torchvision ramps the drop rate linearly over all blocks.
                    self.stochastic_depth_prob * block_id / total,
                    dtype,
                    name=f"features_{s}_{j}",
                )(x, train)
                block_id += 1
        last = f"features_{len(_B0_STAGES) + 1}"
        x = _conv(4 * ch(_B0_STAGES[-1].out_ch), 1, f"{last}_0", dtype)(x)
        x = nn.silu(_bn(train, dtype, f"{last}_1")(x))
        x = jnp.mean(x, axis=(1, 2))
        classify = _dropout_dense(self.dropout, self.num_classes, EFFNET_LINEAR_INIT, dtype, train,
                                  "classifier_1", dropout_name="classifier_0")

        return layers.classifier_output(x, features, self.num_classes, classify)


efficientnet_b0 = partial(EfficientNet, arch="b0")
efficientnet_b1 = partial(EfficientNet, arch="b1")


# --------------------------------------------------------------------------------------------
# timm MobileNetV3 (mobilenetv3_large_100 / mobilenetv3_small_100)

# Blocks per timm stage (the arch_def rows of ``_gen_mobilenet_v3``); the block configs are
# torchvision's (`mobilenetv3.ARCHS`), which timm's arch strings decode to exactly: timm's
# mid = make_divisible(in * exp_ratio) gives the same 64, 72, 120, 240, 200, 184, 480, 672, 960
# (Large) and 16, 72, 88, 96, 240, 120, 144, 288, 576 (Small), and its SE width
# make_divisible(mid * 0.25) equals torchvision's make_divisible(mid // 4).
TIMM_STAGES: dict[str, tuple[int, ...]] = {
    "large": (1, 2, 3, 4, 2, 3),
    "small": (1, 2, 3, 2, 3),
}
# timm ``_init_weight_goog``: Linear U(+-1/sqrt(out_features)), bias 0.
TIMM_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


class TimmBlock(nn.Module):
    """timm's DepthwiseSeparableConv (``depthwise=True``) or InvertedResidual block."""

    cfg: BlockConfig  # channel counts already width-scaled
    depthwise: bool = False
    dtype: Dtype = jnp.float32
    # timm EfficientNet instead of MobileNetV3: SiLU everywhere (SE included), a sigmoid gate
    # and this SE width (round(in_ch * 0.25), from the block input, not make_divisible).
    efficientnet_se: int = 0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        cfg, dtype = self.cfg, self.dtype
        effnet = self.efficientnet_se > 0
        act = nn.silu if effnet else nn.hard_swish if cfg.use_hs else nn.relu
        conv = lambda n, k, name, stride=1, groups=1: _conv(
            n, k, name, dtype, stride, groups, kernel_init=_goog_conv_init(groups)
        )
        y = x
        bn = 1
        if not self.depthwise:
            y = act(_bn(train, dtype, "bn1")(conv(cfg.expanded, 1, "conv_pw")(y)))
            bn = 2
        y = conv(cfg.expanded, cfg.kernel, "conv_dw", cfg.stride, cfg.expanded)(y)
        y = act(_bn(train, dtype, f"bn{bn}")(y))
        if cfg.use_se:
            # timm SqueezeExcite with force_act_layer=ReLU and a hard-sigmoid gate.
            se = lambda n, name: _conv(n, 1, name, dtype, bias=True, kernel_init=_goog_conv_init(1))
            s = jnp.mean(y, axis=(1, 2), keepdims=True)
            if effnet:
                s = nn.silu(se(self.efficientnet_se, "se_conv_reduce")(s))
                y = y * nn.sigmoid(se(cfg.expanded, "se_conv_expand")(s))
            else:
                s = nn.relu(se(make_divisible(cfg.expanded * 0.25), "se_conv_reduce")(s))
                y = y * nn.hard_sigmoid(se(cfg.expanded, "se_conv_expand")(s))
        # No activation after the projection in either block type (timm's pw_act=False).
        y = conv(cfg.out_ch, 1, "conv_pw" if self.depthwise else "conv_pwl")(y)
        y = _bn(train, dtype, f"bn{bn + 1}")(y)
        if cfg.stride == 1 and cfg.in_ch == cfg.out_ch:
            y = y + x
        return y


class TimmMobileNetV3(nn.Module):
    """timm's MobileNetV3 with its module names; ``num_classes=0`` drops ``classifier``."""

    arch: str  # a key of TIMM_STAGES
    num_classes: int = 1000
    width: float = 1.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, features: bool | str = False) -> Any:
        blocks, num_features = ARCHS[self.arch]
        dtype = self.dtype
        ch = lambda c: make_divisible(c * self.width)
        goog = _goog_conv_init(1)
        # timm's fix_stem: below width 0.75 the stem stays at 16 channels.
        stem = 16 if self.width < 0.75 else ch(16)
        x = _conv(stem, 3, "conv_stem", dtype, stride=2, kernel_init=goog)(x)
        x = nn.hard_swish(_bn(train, dtype, "bn1")(x))
        i = 0
        for stage, n in enumerate(TIMM_STAGES[self.arch]):
            for j in range(n):
                b = blocks[i]
                in_ch = stem if i == 0 else ch(b.in_ch)
                # timm's first (depthwise-separable) block convolves its input width: with the
                # fixed 16-channel stem below width 0.75 that is not ch(16).
                expanded = in_ch if i == 0 else ch(b.expanded)
                cfg = b._replace(in_ch=in_ch, expanded=expanded, out_ch=ch(b.out_ch))
                x = TimmBlock(cfg, i == 0, dtype, name=f"blocks_{stage}_{j}")(x, train)
                i += 1
        last = f"blocks_{len(TIMM_STAGES[self.arch])}_0"
        x = _conv(6 * ch(blocks[-1].out_ch), 1, f"{last}_conv", dtype, kernel_init=goog)(x)
        x = nn.hard_swish(_bn(train, dtype, f"{last}_bn1")(x))
        # timm's "efficient head": pool first, then a 1x1 conv with bias and no BN.
        x = jnp.mean(x, axis=(1, 2), keepdims=True)
        head = _conv(ch(num_features), 1, "conv_head", dtype, bias=True, kernel_init=goog)
        x = nn.hard_swish(head(x)).reshape(x.shape[0], -1)
        classify = _dropout_dense(self.dropout, self.num_classes, TIMM_LINEAR_INIT, dtype, train,
                                  "classifier")  # timm's F.dropout

        return layers.classifier_output(x, features, self.num_classes, classify)


# Parameter counts (1000 classes) equal torchvision's MobileNetV3: 5,483,032 (Large) and
# 2,542,856 (Small), i.e. timm's reported 5.48M / 2.54M. Derivation: the blocks have the same
# channel counts (see TIMM_STAGES), every conv is bias-free except SE convs in both, every BN has
# 2C params in both, and timm's conv_head (960*1280 + 1280) has exactly the params of
# torchvision's classifier.0 Linear(960, 1280); only names and layouts differ.
mobilenetv3_large_100 = partial(TimmMobileNetV3, arch="large")
mobilenetv3_small_100 = partial(TimmMobileNetV3, arch="small")


# --------------------------------------------------------------------------------------------
# timm EfficientNet-B0/B1 (registered as timm_efficientnet_b0/b1)


class TimmEfficientNet(nn.Module):
    """timm's ``efficientnet_b0/b1`` with its module names; ``num_classes=0`` drops ``classifier``.

    Same network as torchvision's EfficientNet (same channels, depths, SE widths, SiLU, BN eps
    1e-5; 5,288,548 / 7,794,184 params), laid out as timm: ``conv_stem``, ``bn1``, block j of
    stage i ``blocks_{i}_{j}`` (stage 0: DepthwiseSeparableConv ``conv_dw``, ``bn1``,
    ``se_conv_reduce``, ``se_conv_expand``, ``conv_pw``, ``bn2``; later stages
    InvertedResidual ``conv_pw``, ``bn1``, ``conv_dw``, ``bn2``, ``se_*``, ``conv_pwl``,
    ``bn3``), ``conv_head``, ``bn2``, ``classifier``. DisCo's students (``efficientb0/b1``) are
    this layout. Classifier dropout defaults to 0 as in timm's constructor.
    """

    arch: str  # a key of EFFICIENTNET_ARCHS
    num_classes: int = 1000
    width: float = 1.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, features: bool | str = False) -> Any:
        width_mult, depth_mult = EFFICIENTNET_ARCHS[self.arch]
        dtype = self.dtype
        ch = lambda c: make_divisible(c * width_mult * self.width)
        goog = _goog_conv_init(1)
        in_ch = ch(_B0_STAGES[0].in_ch)
        x = _conv(in_ch, 3, "conv_stem", dtype, stride=2, kernel_init=goog)(x)
        x = nn.silu(_bn(train, dtype, "bn1")(x))
        for i, st in enumerate(_B0_STAGES):
            for j in range(int(math.ceil(st.num_layers * depth_mult))):
                mid = in_ch if i == 0 else make_divisible(in_ch * st.expand_ratio)
                cfg = BlockConfig(
                    in_ch, st.kernel, mid, ch(st.out_ch), True, False, st.stride if j == 0 else 1
                )
                # timm divides the 0.25 SE ratio by the expansion (se_from_exp=False) and
                # rounds: the squeeze width follows the block input.
                se = round(mid * (0.25 / (1 if i == 0 else st.expand_ratio)))
                x = TimmBlock(cfg, i == 0, dtype, se, name=f"blocks_{i}_{j}")(x, train)
                in_ch = cfg.out_ch
        x = _conv(ch(1280), 1, "conv_head", dtype, kernel_init=goog)(x)
        x = nn.silu(_bn(train, dtype, "bn2")(x))
        x = jnp.mean(x, axis=(1, 2))

        classify = _dropout_dense(self.dropout, self.num_classes, TIMM_LINEAR_INIT, dtype, train,
                                  "classifier")

        return layers.classifier_output(x, features, self.num_classes, classify)


timm_efficientnet_b0 = partial(TimmEfficientNet, arch="b0")
timm_efficientnet_b1 = partial(TimmEfficientNet, arch="b1")


# --------------------------------------------------------------------------------------------
# SEED's EfficientNet-B0/B1 (lukemelas/EfficientNet-PyTorch, registered as seed_efficientnet_*)

# lukemelas' ``efficientnet_params`` resolution; ``EfficientNet.from_name`` (what SEED's
# ``efficientnet_b0/b1`` call) passes it as ``image_size``, which fixes every conv's padding.
LUKEMELAS_RESOLUTION: dict[str, int] = {"b0": 224, "b1": 240}
# torch's BatchNorm2d(momentum=0.01, eps=1e-3): TF's 0.99 decay, which lukemelas converts.
LUKEMELAS_BN_MOMENTUM = 0.99
LUKEMELAS_BN_EPS = 1e-3
# lukemelas leaves torch's default init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

Padding = str | tuple[tuple[int, int], tuple[int, int]]


def tf_same_padding(size: int | None, kernel: int, stride: int) -> Padding:
    """TF 'SAME' padding as lukemelas' Conv2d*SamePadding computes it.

    ``size`` given: Conv2dStaticSamePadding, whose pads are computed once for that input size
    and then applied to any input (so a B1 built for 240 px but fed 224 px pads its 15 -> 8
    stride-2 conv (2, 2) on a 14 px map, where TF would pad (1, 2)). ``None``:
    Conv2dDynamicSamePadding, i.e. lax's 'SAME' on the actual input: low = total // 2.
    """
    if size is None:
        return "SAME"
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    pad = (total // 2, total - total // 2)
    return (pad, pad)


class SeedMBConv(nn.Module):
    """lukemelas' MBConvBlock: [``_expand_conv``, ``_bn0``] -> ``_depthwise_conv``, ``_bn1`` ->
    ``_se_reduce`` / ``_se_expand`` -> ``_project_conv``, ``_bn2`` (+ residual)."""

    expand_ratio: int
    kernel: int
    stride: int
    in_ch: int  # already width-scaled (lukemelas' round_filters)
    out_ch: int
    in_size: int | None  # the static-padding input size of this block; None: dynamic
    drop_prob: float = 0.0  # drop_connect, only at train time
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        dtype = self.dtype
        conv = partial(_conv, dtype=dtype, kernel_init=TORCH_DEFAULT_INIT)
        bn = lambda name: layers.batch_norm(
            train, dtype, name, LUKEMELAS_BN_MOMENTUM, LUKEMELAS_BN_EPS
        )
        # No make_divisible here (torchvision has one): in * ratio as lukemelas computes it.
        mid = self.in_ch * self.expand_ratio
        y = x
        if self.expand_ratio != 1:  # lukemelas skips the module, not just its effect
            y = nn.silu(bn("_bn0")(conv(mid, 1, "_expand_conv")(y)))
        pad = tf_same_padding(self.in_size, self.kernel, self.stride)
        dw = conv(mid, self.kernel, "_depthwise_conv", stride=self.stride, groups=mid, padding=pad)
        y = nn.silu(bn("_bn1")(dw(y)))
        # Squeeze width from the block *input* channels: int(input_filters * se_ratio 0.25).
        squeeze = max(1, int(self.in_ch * 0.25))
        s = jnp.mean(y, axis=(1, 2), keepdims=True)
        s = nn.silu(conv(squeeze, 1, "_se_reduce", bias=True)(s))
        y = y * nn.sigmoid(conv(mid, 1, "_se_expand", bias=True)(s))
        y = bn("_bn2")(conv(self.out_ch, 1, "_project_conv")(y))
        if self.stride == 1 and self.in_ch == self.out_ch:  # every block has id_skip
            y = _stochastic_depth(self, y, self.drop_prob, train) + x
        return y


class SeedEfficientNet(nn.Module):
    """SEED's EfficientNet-B0/B1 (its copy of lukemelas' EfficientNet-PyTorch, head ``fc``).

    Module names are lukemelas' ('.' -> '_'): ``_conv_stem``, ``_bn0``, the flat block list
    ``_blocks_{N}`` (children as in `SeedMBConv`), ``_conv_head``, ``_bn1`` and the classifier
    ``fc`` (lukemelas calls it ``_fc``; SEED renamed it so its MLP head can replace it). The
    network equals torchvision's B0/B1 (same channels, depths, SE widths, SiLU; 5,288,548 /
    7,794,184 params) except for TF 'SAME' padding and BN eps 1e-3 / torch momentum 0.01.
    The feature is the pooled 1280-d ``_conv_head`` + ``_bn1`` + swish output, before the 0.2
    ``_dropout``; a SEED student's embedding is ``fc`` applied after that dropout (lukemelas'
    forward: ``_dropout`` then ``_fc``): Linear(1280, 128), or Linear(1280, 1280) -> ReLU ->
    Linear(1280, 128) with ``--student_mlp`` (an encoder with ``head_input="dropped"``).
    Drop-connect ``stochastic_depth_prob`` is lukemelas' 0.2 (every EfficientNet; its rate
    grows as 0.2 * block index / number of blocks), so train mode needs a 'dropout' rng.

    ``image_size`` fixes the padding (`tf_same_padding`): "native" is lukemelas' resolution
    (224 B0, 240 B1), what SEED builds and what its checkpoints were trained with (at 224 px);
    an int is another design size; None pads TF 'SAME' for the actual input.
    """

    arch: str  # a key of LUKEMELAS_RESOLUTION
    num_classes: int = 1000
    width: float = 1.0
    image_size: int | str | None = "native"
    dropout: float = 0.2
    # lukemelas' drop_connect_rate (0.2 for every EfficientNet); 0 turns it off.
    stochastic_depth_prob: float = 0.2
    dtype: Dtype = jnp.float32

    def _design_size(self) -> int | None:
        if self.image_size == "native":
            return LUKEMELAS_RESOLUTION[self.arch]
        if self.image_size is None or (isinstance(self.image_size, int) and self.image_size > 0):
            return self.image_size
        raise ConfigError(
            f"image_size must be 'native', a positive int or None, got {self.image_size!r}"
        )

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, features: bool | str = False) -> Any:
        width_mult, depth_mult = EFFICIENTNET_ARCHS[self.arch]
        dtype = self.dtype
        # lukemelas' round_filters is make_divisible (divisor 8) of filters * width.
        ch = lambda c: make_divisible(c * width_mult * self.width)
        bn = lambda name: layers.batch_norm(
            train, dtype, name, LUKEMELAS_BN_MOMENTUM, LUKEMELAS_BN_EPS
        )
        size = self._design_size()
        shrink = lambda size, stride: None if size is None else -(-size // stride)

        stem_pad = tf_same_padding(size, 3, 2)
        x = _conv(
            ch(32), 3, "_conv_stem", dtype, 2, kernel_init=TORCH_DEFAULT_INIT, padding=stem_pad
        )(x)
        x = nn.silu(bn("_bn0")(x))
        size = shrink(size, 2)
        depths = [int(math.ceil(st.num_layers * depth_mult)) for st in _B0_STAGES]
        total = sum(depths)
        n = 0
        for st, depth in zip(_B0_STAGES, depths, strict=True):
            for j in range(depth):
                stride = st.stride if j == 0 else 1
                x = SeedMBConv(
                    st.expand_ratio,
                    st.kernel,
                    stride,
                    ch(st.in_ch) if j == 0 else ch(st.out_ch),
                    ch(st.out_ch),
                    size,
                    # lukemelas scales drop_connect_rate by block index / number of blocks.
                    self.stochastic_depth_prob * n / total,
                    dtype,
                    name=f"_blocks_{n}",
                )(x, train)
                size = shrink(size, stride)
                n += 1
        x = _conv(ch(1280), 1, "_conv_head", dtype, kernel_init=TORCH_DEFAULT_INIT)(x)
        x = nn.silu(bn("_bn1")(x))
        x = jnp.mean(x, axis=(1, 2))

        classify = _dropout_dense(self.dropout, self.num_classes, TORCH_DEFAULT_INIT, dtype, train,
                                  "fc", dropout_name="_dropout")

        return layers.classifier_output(x, features, self.num_classes, classify)


seed_efficientnet_b0 = partial(SeedEfficientNet, arch="b0")
seed_efficientnet_b1 = partial(SeedEfficientNet, arch="b1")
