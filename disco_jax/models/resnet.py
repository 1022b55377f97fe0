"""ResNets in Flax Linen: torchvision ResNet-18/34/50/101/152 (v1.5), wide_resnet50_2, SwAV.

Also here: torchvision's ``wide_resnet50_2`` (only the bottleneck's inner 3x3 width doubled,
``width_per_group=128``) and SwAV's ``resnet50w2/w4/w5`` (facebookresearch/swav
``src/resnet50.py``: every width, stem included, times w; registered as ``swav_resnet50w{w}``).
SwAV's module names are torchvision's, so the same rule below maps them; its stem is a
``padding`` ConstantPad2d(1) followed by a 7x7/2 conv with padding 2, which is the same zero
padding of 3 that torchvision uses, so it is one padded conv here (``padding`` has no params).
SwAV checkpoints have no classifier; ``fc`` here is a linear-probe head like torchvision's.

Naming rule (for a torchvision state_dict converter): joining the module components of a Flax
variable path with '_' gives the torchvision module path with '.' replaced by '_'. For example
``params['layer1_0']['downsample_0']['kernel']`` is torch ``layer1.0.downsample.0.weight`` and
``batch_stats['bn1']['mean']`` is torch ``bn1.running_mean``. Leaf names map as: conv/linear
``kernel`` -> ``weight`` (conv (kh, kw, in, out) vs torch (out, in, kh, kw); linear transposed),
``bias`` -> ``bias``; BatchNorm ``scale`` -> ``weight``, ``bias`` -> ``bias``, ``mean`` ->
``running_mean``, ``var`` -> ``running_var`` (torch's ``num_batches_tracked`` has no counterpart).

Differences from torchvision that are on purpose: ``width`` scales the channel counts (tiny test
models), ``stem='cifar'`` replaces the 7x7/2 conv + max-pool by one 3x3/1 conv for small images,
and linear biases start at zero rather than torch's uniform draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from disco_jax.errors import unknown_name
from disco_jax.models import layers

Dtype = Any

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal.
CONV_INIT = layers.CONV_INIT
# torch.nn.Linear's default kaiming_uniform_(a=sqrt(5)) is U(+-1/sqrt(fan_in)).
LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# torch momentum 0.1 weights the new batch statistic; Flax momentum weights the old running one.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5

STEMS = ("imagenet", "cifar")


def _conv(features: int, kernel: int, stride: int, dtype: Dtype, name: str) -> nn.Conv:
    return layers.conv(features, kernel, name, dtype, stride)


def _bn(train: bool, dtype: Dtype, name: str) -> layers.BatchNorm:
    return layers.batch_norm(train, dtype, name, BN_MOMENTUM, BN_EPS)


def _shortcut(x: jnp.ndarray, out: int, stride: int, train: bool, dtype: Dtype) -> jnp.ndarray:
    """torchvision's ``downsample`` branch: a 1x1 conv + BN when the shape changes."""
    if stride == 1 and x.shape[-1] == out:
        return x
    x = _conv(out, 1, stride, dtype, "downsample_0")(x)
    return _bn(train, dtype, "downsample_1")(x)


PARTS = ("all", "stem", "branch")


def check_part(part: str) -> None:
    if part not in PARTS:
        raise unknown_name("part", part, PARTS)


def in_part(stage: int, part: str, stem_stages: int) -> bool:
    """Whether stage `stage` (0-based) runs in `part` of a network split after `stem_stages`."""
    return part == "all" or (stage < stem_stages) == (part == "stem")


def check_stages(stages: bool, part: str) -> None:
    if stages and part != "all":
        raise ValueError(f"stages=True needs the whole network (part='all'), got part={part!r}")


def with_stages(feats: jnp.ndarray, num_classes: int, classify: nn.Module,
                maps: Sequence[jnp.ndarray]) -> dict[str, Any]:
    """The ``stages=True`` output: pooled ``features``, ``logits`` when the net classifies, and
    ``stages``, the feature maps after every stage but the last (L-MCL, methods.md §4.4)."""
    out = {"features": feats, "stages": tuple(maps[:-1])}
    return out | ({"logits": classify(feats)} if num_classes else {})


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        y = _conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(_bn(train, self.dtype, "bn1")(y))
        y = _conv(self.planes, 3, 1, self.dtype, "conv2")(y)
        y = _bn(train, self.dtype, "bn2")(y)
        return nn.relu(y + _shortcut(x, self.planes, self.stride, train, self.dtype))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 with 4x expansion (ResNet-50/101/152)."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    expansion: ClassVar[int] = 4
    # torchvision's inner width is planes * width_per_group / 64 (128 for wide_resnet50_2).
    width_per_group: ClassVar[int] = 64

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        out = self.planes * self.expansion
        inner = self.planes * self.width_per_group // 64
        y = _conv(inner, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(_bn(train, self.dtype, "bn1")(y))
        y = _conv(inner, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(_bn(train, self.dtype, "bn2")(y))
        y = _conv(out, 1, 1, self.dtype, "conv3")(y)
        y = _bn(train, self.dtype, "bn3")(y)
        return nn.relu(y + _shortcut(x, out, self.stride, train, self.dtype))


class WideBottleneck(Bottleneck):
    """torchvision's wide_resnet50/101_2 block: the 1x1 -> 3x3 -> 1x1 inner width doubled."""

    width_per_group: ClassVar[int] = 128


class ResNet(nn.Module):
    """A torchvision-compatible ResNet; ``num_classes=0`` drops the classifier entirely."""

    block: type[BasicBlock] | type[Bottleneck]
    stage_sizes: Sequence[int]
    num_classes: int = 1000
    width: float = 1.0
    stem: str = "imagenet"
    dtype: Dtype = jnp.float32
    # SwAV's integer widening: stem and every stage width times this (unlike ``width`` it is
    # part of the architecture's name, so the registry fixes it rather than exposing it).
    widen: int = 1

    # MCL's shared-trunk ImageNet cohorts (M >= 3) share conv1 ... layer2 (methods.md §4.1).
    SHARED_STEM_STAGES: ClassVar[int] = 2

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, features: bool | str = False,
                 part: str = "all", stages: bool = False) -> Any:
        """``part``: "all" (the plain model), "stem" (conv1 ... layer{SHARED_STEM_STAGES}; returns
        the feature map) or "branch" (the remaining stages + classifier on a stem feature map).
        The sub-module names are the same in every part, so stem + branch params = plain params.
        ``stages=True`` (part "all") returns `with_stages`' dict: the pooled features, logits
        and the feature maps after layer1 ... layer{S-1}.
        """
        if self.stem not in STEMS:
            raise unknown_name("stem", self.stem, STEMS)
        check_part(part)
        check_stages(stages, part)
        base = max(1, round(64 * self.width * self.widen))
        if part == "branch":
            pass
        elif self.stem == "imagenet":
            x = _conv(base, 7, 2, self.dtype, "conv1")(x)
            x = nn.relu(_bn(train, self.dtype, "bn1")(x))
            # torch pads the max-pool with -inf, which is what Flax's max_pool does too.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = _conv(base, 3, 1, self.dtype, "conv1")(x)
            x = nn.relu(_bn(train, self.dtype, "bn1")(x))

        maps = []
        for i, num_blocks in enumerate(self.stage_sizes):
            if not in_part(i, part, self.SHARED_STEM_STAGES):
                continue
            planes = base * 2**i
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                block = self.block(planes, stride, self.dtype, name=f"layer{i + 1}_{j}")
                x = block(x, train)
            maps.append(x)
        if part == "stem":
            return x

        x = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(
            self.num_classes,
            kernel_init=LINEAR_INIT,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="fc",
        )
        if stages:
            return with_stages(x, self.num_classes, fc, maps)
        return layers.classifier_output(x, features, self.num_classes, fc)


# ``widen`` is bound in every constructor so that it is not a user option (`model_options`).
# One basic block per stage: the small 4-stage network of the demo (no torchvision weights).
resnet10 = partial(ResNet, block=BasicBlock, stage_sizes=(1, 1, 1, 1), widen=1)
resnet18 = partial(ResNet, block=BasicBlock, stage_sizes=(2, 2, 2, 2), widen=1)
resnet34 = partial(ResNet, block=BasicBlock, stage_sizes=(3, 4, 6, 3), widen=1)
resnet50 = partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3), widen=1)
resnet101 = partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 23, 3), widen=1)
resnet152 = partial(ResNet, block=Bottleneck, stage_sizes=(3, 8, 36, 3), widen=1)
wide_resnet50_2 = partial(ResNet, block=WideBottleneck, stage_sizes=(3, 4, 6, 3), widen=1)
# SwAV: resnet50 with widen=w; the backbone (no fc) has 23.5M (w1), 93.9M (w2), 375.4M (w4)
# and 586.5M (w5) parameters, matching SwAV's README (94M, 375M, 586M).
swav_resnet50w2 = partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3), widen=2)
swav_resnet50w4 = partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3), widen=4)
swav_resnet50w5 = partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3), widen=5)
