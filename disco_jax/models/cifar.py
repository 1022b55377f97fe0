"""The CIFAR networks of MCL (winycg/MCL ``models/resnet.py`` and ``models/wrn.py``) in Flax Linen.

All take 32x32 inputs through a 3x3/1 stem with 16 channels and have three stages at 32, 16 and
8 px. BatchNorm is torch's default (eps 1e-5, momentum 0.1 -> Flax 0.9).

- ``resnet32`` / ``resnet56``: 5 / 9 BasicBlocks per stage, widths 16, 32, 64 (64-d feature).
  ``resnet8`` is the same net with 1 block per stage (6n + 2 layers, n = 1; not in MCL's zoo,
  CRD's ``resnet8`` has this layout): the smallest of the family, which the tests train
  where the network is not what they check.
- ``resnet110``: MCL builds it from *Bottleneck* blocks, 12 per stage (9 * 12 + 2 = 110 layers),
  planes 16, 32, 64 with 4x expansion, so its feature is 256-d (not the 64-d BasicBlock net of
  He et al.). Shape changes use a 1x1 conv + BN shortcut (``downsample``), as in torchvision.
- ``wrn_16_2`` / ``wrn_40_2`` / ``wrn_28_4``: WRN-depth-k with pre-activation blocks,
  (depth - 4) / 6 blocks per stage, widths 16, 16k, 32k, 64k, a final BN + ReLU before pooling.

Naming rule (for a state_dict converter): joining the module components of a Flax variable path
with '_' gives the torch module path of MCL's single network (``ResNet`` / ``WideResNet``; strip
the ``module_list.{i}.`` prefix of MCL's ``*_n`` ensembles) with '.' replaced by '_'. ResNets:
``conv1``, ``bn1``, ``layer{s}_{j}`` blocks with ``conv1``, ``bn1``, ..., ``downsample_0/1``
(as `disco_jax.models.resnet`), classifier ``classifier``. WRNs: ``conv1``,
``block{s}_layer_{j}`` blocks with ``bn1``, ``conv1``, ``bn2``, ``conv2``, ``convShortcut``,
final ``bn1`` and classifier ``fc``. Leaf names map as in `disco_jax.models.resnet`.

Differences on purpose: ``width`` scales the channel counts (tiny test models); linear biases
start at zero (MCL's ResNet leaves torch's uniform draw); the WRN dropout (0 in MCL) is omitted.
MCL's shared-trunk ``*_b`` variants (several branches on one stem) are built from the plain net's
``part`` argument by `disco_jax.models.cohort.SharedStemCohort`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from disco_jax.models import layers
from disco_jax.models.resnet import (
    LINEAR_INIT,
    BasicBlock,
    Bottleneck,
    _bn,
    _conv,
    check_part,
    check_stages,
    in_part,
    with_stages,
)

Dtype = Any


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features, kernel_init=LINEAR_INIT, dtype=dtype, param_dtype=jnp.float32, name=name
    )


class CifarResNet(nn.Module):
    """MCL's CIFAR ResNet: 3x3 stem, three stages of 16/32/64 planes, no max-pool."""

    block: type[BasicBlock] | type[Bottleneck]
    stage_sizes: Sequence[int]
    num_classes: int = 100
    width: float = 1.0
    dtype: Dtype = jnp.float32

    # MCL's ``resnet*_b`` cohorts (M >= 3) share conv1 + layer1 (methods.md §4.1).
    SHARED_STEM_STAGES: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, features: bool | str = False,
                 part: str = "all", stages: bool = False) -> Any:
        """``part``: "all", "stem" (conv1 + layer1, the feature map) or "branch" (the rest), as
        in `disco_jax.models.resnet.ResNet`: the names are the plain model's in every part.
        ``stages=True`` (part "all"): a dict of the pooled ``features``, the ``logits`` (if the
        net classifies) and ``stages``, the feature maps after every stage but the last (L-MCL's
        auxiliary branches start there)."""
        check_part(part)
        check_stages(stages, part)
        base = max(1, round(16 * self.width))
        if part != "branch":
            x = _conv(base, 3, 1, self.dtype, "conv1")(x)
            x = nn.relu(_bn(train, self.dtype, "bn1")(x))
        maps = []
        for i, num_blocks in enumerate(self.stage_sizes):
            if not in_part(i, part, self.SHARED_STEM_STAGES):
                continue
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                block = self.block(base * 2**i, stride, self.dtype, name=f"layer{i + 1}_{j}")
                x = block(x, train)
            maps.append(x)
        if part == "stem":
            return x
        x = jnp.mean(x, axis=(1, 2))
        classify = _dense(self.num_classes, self.dtype, "classifier")
        if stages:
            return with_stages(x, self.num_classes, classify, maps)
        return layers.classifier_output(x, features, self.num_classes, classify)


class WRNBlock(nn.Module):
    """MCL's (Zagoruyko's) pre-activation WRN block: BN-ReLU-conv3x3-BN-ReLU-conv3x3."""

    out_ch: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        dtype = self.dtype
        equal = x.shape[-1] == self.out_ch  # MCL's equalInOut ignores the stride
        out = nn.relu(_bn(train, dtype, "bn1")(x))
        if not equal:
            # The projection shortcut sees the pre-activated input; identity sees the raw one.
            x = out
        y = _conv(self.out_ch, 3, self.stride, dtype, "conv1")(out)
        y = nn.relu(_bn(train, dtype, "bn2")(y))
        y = _conv(self.out_ch, 3, 1, dtype, "conv2")(y)
        shortcut = x if equal else _conv(self.out_ch, 1, self.stride, dtype, "convShortcut")(x)
        return shortcut + y


class WideResNet(nn.Module):
    """MCL's WideResNet-depth-k for 32x32 inputs."""

    depth: int
    widen_factor: int
    num_classes: int = 100
    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, features: bool | str = False) -> Any:
        assert (self.depth - 4) % 6 == 0, "WRN depth must be 6n + 4"
        n = (self.depth - 4) // 6
        k = self.widen_factor
        ch = lambda c: max(1, round(c * self.width))
        x = _conv(ch(16), 3, 1, self.dtype, "conv1")(x)
        for s, out_ch in enumerate((16 * k, 32 * k, 64 * k), start=1):
            for j in range(n):
                stride = 2 if s > 1 and j == 0 else 1
                x = WRNBlock(ch(out_ch), stride, self.dtype, name=f"block{s}_layer_{j}")(x, train)
        x = nn.relu(_bn(train, self.dtype, "bn1")(x))
        x = jnp.mean(x, axis=(1, 2))
        classify = _dense(self.num_classes, self.dtype, "fc")
        return layers.classifier_output(x, features, self.num_classes, classify)


resnet8 = partial(CifarResNet, block=BasicBlock, stage_sizes=(1, 1, 1))
resnet32 = partial(CifarResNet, block=BasicBlock, stage_sizes=(5, 5, 5))
resnet56 = partial(CifarResNet, block=BasicBlock, stage_sizes=(9, 9, 9))
resnet110 = partial(CifarResNet, block=Bottleneck, stage_sizes=(12, 12, 12))
wrn_16_2 = partial(WideResNet, depth=16, widen_factor=2)
wrn_40_2 = partial(WideResNet, depth=40, widen_factor=2)
wrn_28_4 = partial(WideResNet, depth=28, widen_factor=4)
