"""PyTorch reference networks for the benchmark's peers (needs torch; torchvision/timm not).

The networks are written from the torchvision / SEED (its own MobileNetV3, lukemelas'
EfficientNet) sources with their exact parameter names and structure, plus disco_jax's
``width`` / ``stem`` options, so that ``disco_jax.convert.to_torch(variables, name,
**model_kwargs)`` of our Flax variables loads into them with ``strict=True``. They were first
written for the converter tests (tests/test_convert.py, tests/test_convert_zoo.py, where they are
checked against the Flax models); here each backbone also builds without its classifier
(``num_classes=0``) and exposes ``pooled(x)`` (the pre-logit feature, what our ``features``
is), ``dropout`` (the classifier dropout the feature goes through before the classifier, an
``nn.Identity`` for ResNets) and ``classify(feats)``; ``forward(x)`` is the reference network's
own, ``classify(pooled(x))`` (the logits, or the output of whatever replaced the classifier, as
MoCo/SEED put their MLP in ``fc``). The converter tests import them from here, so each network
has one definition.

``TorchEncoder`` is our ``models.Encoder``: backbone + projection head, the head registered on
the backbone under its to_torch name (``fc.0``/``fc.2`` for ``mlp``, ``proj_head.0/2`` for
``mcl_embed``), so one ``load_state_dict(to_torch(...), strict=True)`` fills both.

Drop-connect / stochastic depth are not implemented (the benchmark turns them off; building a
net with a non-zero rate is refused), classifier dropout is (it is 0 in the benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from disco_jax.errors import ConfigError
from disco_jax.models import mobilenetv3
from disco_jax.models.mobilenetv3 import make_divisible

# ---------------------------------------------------------------- torchvision ResNet


def _downsample(inp: int, out: int, stride: int) -> nn.Module | None:
    if stride == 1 and inp == out:
        return None
    return nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inp: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inp, planes, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5); ``base_width``: its ``width_per_group`` (128 for the
    wide ResNets: inner width ``planes * base_width / 64``)."""

    expansion = 4

    def __init__(self, inp: int, planes: int, stride: int, base_width: int = 64):
        super().__init__()
        inner = int(planes * (base_width / 64.0))
        self.conv1 = nn.Conv2d(inp, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride, 1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inp, planes * 4, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """torchvision's ResNet plus disco_jax's ``width`` and ``stem`` options."""

    def __init__(self, block, layers, num_classes=1000, width=1.0, stem="imagenet"):
        super().__init__()
        base = max(1, round(64 * width))
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(3, base, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ConfigError(f"ResNet stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        inp = base
        for i, n in enumerate(layers):
            planes = base * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(inp, planes, 2 if i > 0 and j == 0 else 1))
                inp = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inp, num_classes) if num_classes else None
        self.feature_dim = inp
        self.dropout = nn.Identity()  # no classifier dropout (no parameters, no state key)

    def pooled(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def classify(self, feats):
        return self.fc(feats)

    def forward(self, x):
        return self.classify(self.pooled(x))


# ---------------------------------------------------------------- torchvision MobileNetV3


def _cna(inp, out, k, stride=1, groups=1, act=None, eps=1e-3, momentum=0.01) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: children 0 (conv), 1 (BN), 2 (activation)."""
    layers = [
        nn.Conv2d(inp, out, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out, eps=eps, momentum=momentum),
    ]
    return nn.Sequential(*layers, *([act(inplace=True)] if act else []))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = gate()

    def forward(self, x):
        s = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(s) * x


class InvertedResidual(nn.Module):
    def __init__(self, cfg: mobilenetv3.BlockConfig):
        super().__init__()
        act = nn.Hardswish if cfg.use_hs else nn.ReLU
        layers = []
        if cfg.expanded != cfg.in_ch:
            layers.append(_cna(cfg.in_ch, cfg.expanded, 1, act=act))
        layers.append(
            _cna(cfg.expanded, cfg.expanded, cfg.kernel, cfg.stride, cfg.expanded, act=act)
        )
        if cfg.use_se:
            sq = make_divisible(cfg.expanded // 4, 8)
            layers.append(SqueezeExcitation(cfg.expanded, sq))
        layers.append(_cna(cfg.expanded, cfg.out_ch, 1))
        self.block = nn.Sequential(*layers)
        self.use_res = cfg.stride == 1 and cfg.in_ch == cfg.out_ch

    def forward(self, x):
        y = self.block(x)
        return y + x if self.use_res else y


class MobileNetV3(nn.Module):
    """torchvision's MobileNetV3 with its ``width_mult``; ``num_classes=0``: no last Linear."""

    def __init__(self, arch: str, num_classes=1000, width=1.0, dropout=0.2):
        super().__init__()
        blocks, last_channel = mobilenetv3.ARCHS[arch]
        ch = lambda c: make_divisible(c * width, 8)  # noqa: E731
        layers = [_cna(3, ch(blocks[0].in_ch), 3, 2, act=nn.Hardswish)]
        for b in blocks:
            cfg = b._replace(in_ch=ch(b.in_ch), expanded=ch(b.expanded), out_ch=ch(b.out_ch))
            layers.append(InvertedResidual(cfg))
        last = ch(blocks[-1].out_ch)
        layers.append(_cna(last, 6 * last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        head = [nn.Linear(6 * last, ch(last_channel)), nn.Hardswish(inplace=True),
                nn.Dropout(dropout)]
        if num_classes:
            head.append(nn.Linear(ch(last_channel), num_classes))
        self.classifier = nn.Sequential(*head)
        self.dropout = self.classifier[2]

    def pooled(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[1](self.classifier[0](x))

    def classify(self, feats):
        return self.classifier[3](self.classifier[2](feats))

    def forward(self, x):
        return self.classify(self.pooled(x))


# ---------------------------------------------------------------- torchvision EfficientNet

_B0 = [  # expand, kernel, stride, in, out, layers (torchvision's MBConvConfig for B0)
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]


def _tv_cna(inp, out, k, stride=1, groups=1, act=None) -> nn.Sequential:
    """Conv2dNormActivation with torch's default BN (EfficientNet-B0/B1)."""
    return _cna(inp, out, k, stride, groups, act, eps=1e-5, momentum=0.1)


class MBConv(nn.Module):
    def __init__(self, expand, k, stride, inp, out):
        super().__init__()
        mid = make_divisible(inp * expand)
        layers = [_tv_cna(inp, mid, 1, act=nn.SiLU)] if mid != inp else []
        layers += [
            _tv_cna(mid, mid, k, stride, mid, act=nn.SiLU),
            SqueezeExcitation(mid, max(1, inp // 4), nn.SiLU, nn.Sigmoid),
            _tv_cna(mid, out, 1),
        ]
        self.block = nn.Sequential(*layers)
        self.res = stride == 1 and inp == out

    def forward(self, x):
        return self.block(x) + x if self.res else self.block(x)


class EfficientNet(nn.Module):
    """torchvision's EfficientNet-B0/B1 (without stochastic depth); ``num_classes=0``: no
    ``classifier.1``."""

    def __init__(self, depth_mult, num_classes=1000, width=1.0, dropout=0.2):
        super().__init__()
        ch = lambda c: make_divisible(c * width)  # noqa: E731
        feats = [_tv_cna(3, ch(32), 3, 2, act=nn.SiLU)]
        for e, k, s, i, o, n in _B0:
            stage = []
            for j in range(int(math.ceil(n * depth_mult))):
                stage.append(MBConv(e, k, s if j == 0 else 1, ch(i) if j == 0 else ch(o), ch(o)))
            feats.append(nn.Sequential(*stage))
        feats.append(_tv_cna(ch(320), 4 * ch(320), 1, act=nn.SiLU))
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        head = [nn.Dropout(dropout)]
        if num_classes:
            head.append(nn.Linear(4 * ch(320), num_classes))
        self.classifier = nn.Sequential(*head)
        self.dropout = self.classifier[0]

    def pooled(self, x):
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def classify(self, feats):
        return self.classifier(feats)

    def forward(self, x):
        return self.classify(self.pooled(x))


# ---------------------------------------------------------------- SEED's MobileNetV3


class SELayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        rd = make_divisible(c // 4)
        self.fc = nn.Sequential(nn.Linear(c, rd), nn.ReLU(inplace=True), nn.Linear(rd, c),
                                nn.Hardsigmoid())

    def forward(self, x):
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]


class SeedIR(nn.Module):
    def __init__(self, inp, hidden, oup, k, s, use_se, use_hs):
        super().__init__()
        self.identity = s == 1 and inp == oup
        act = nn.Hardswish if use_hs else nn.ReLU
        se = SELayer(hidden) if use_se else nn.Identity()
        dw = nn.Conv2d(hidden, hidden, k, s, (k - 1) // 2, groups=hidden, bias=False)
        if inp == hidden:
            self.conv = nn.Sequential(
                dw, nn.BatchNorm2d(hidden), act(), se,
                nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup),
            )  # fmt: skip
        else:
            self.conv = nn.Sequential(
                nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act(),
                dw, nn.BatchNorm2d(hidden), se, act(),
                nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup),
            )  # fmt: skip

    def forward(self, x):
        return x + self.conv(x) if self.identity else self.conv(x)


class SeedMobileNetV3(nn.Module):
    """SEED's ``mobilenetv3.py`` (SE before the activation, Linear SE layers, BN eps 1e-5)."""

    def __init__(self, arch, num_classes=1000, width=1.0, dropout=0.2):
        super().__init__()
        cfgs, head = mobilenetv3.ARCHS[arch]
        ch = lambda c: make_divisible(c * width)  # noqa: E731
        layers = [
            nn.Sequential(
                nn.Conv2d(3, ch(16), 3, 2, 1, bias=False), nn.BatchNorm2d(ch(16)), nn.Hardswish()
            )
        ]
        for c in cfgs:
            layers.append(
                SeedIR(ch(c.in_ch), ch(c.expanded), ch(c.out_ch), c.kernel, c.stride, c.use_se,
                       c.use_hs)
            )  # fmt: skip
        self.features = nn.Sequential(*layers)
        last = ch(cfgs[-1].expanded)
        self.conv = nn.Sequential(
            nn.Conv2d(ch(cfgs[-1].out_ch), last, 1, bias=False), nn.BatchNorm2d(last),
            nn.Hardswish(),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(last, ch(head)), nn.Hardswish(),
                                        nn.Dropout(dropout))
        self.fc = nn.Linear(ch(head), num_classes) if num_classes else None
        self.dropout = self.classifier[2]

    def pooled(self, x):
        # Our `features` is the classifier's output before its Dropout.
        x = self.conv(self.features(x)).mean((2, 3))
        return self.classifier[1](self.classifier[0](x))

    def classify(self, feats):
        return self.fc(self.dropout(feats))

    def forward(self, x):
        return self.classify(self.pooled(x))


# ---------------------------------------------------------------- SEED's (lukemelas') EfficientNet


def _round_filters(filters: int, width: float) -> int:
    """lukemelas' ``round_filters`` (depth_divisor 8, min_depth None)."""
    filters *= width
    new = max(8, int(filters + 8 / 2) // 8 * 8)
    return int(new + 8 if new < 0.9 * filters else new)


def _shrink(size, stride):  # lukemelas' calculate_output_image_size
    return None if size is None else int(math.ceil(size / stride))


class SamePadConv2d(nn.Conv2d):
    """lukemelas' Conv2dStaticSamePadding (``image_size`` given: the pads are computed once for
    that size) or Conv2dDynamicSamePadding (None: computed from each input)."""

    def __init__(self, inp, out, k, stride=1, groups=1, bias=False, image_size=None):
        super().__init__(inp, out, k, stride, 0, groups=groups, bias=bias)
        self.image_size = image_size

    def forward(self, x):
        ih, iw = x.shape[-2:] if self.image_size is None else (self.image_size,) * 2
        (kh, kw), (sh, sw) = self.weight.shape[-2:], self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


def _luke_bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, momentum=0.01, eps=1e-3)


class LukeMBConv(nn.Module):
    """lukemelas' MBConvBlock (se_ratio 0.25, id_skip, no drop-connect), children in its
    registration order."""

    def __init__(self, expand, k, stride, inp, out, image_size):
        super().__init__()
        mid = inp * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = SamePadConv2d(inp, mid, 1, image_size=image_size)
            self._bn0 = _luke_bn(mid)
        self._depthwise_conv = SamePadConv2d(mid, mid, k, stride, mid, image_size=image_size)
        self._bn1 = _luke_bn(mid)
        sq = max(1, int(inp * 0.25))
        self._se_reduce = SamePadConv2d(mid, sq, 1, bias=True, image_size=1)
        self._se_expand = SamePadConv2d(sq, mid, 1, bias=True, image_size=1)
        self._project_conv = SamePadConv2d(mid, out, 1, image_size=_shrink(image_size, stride))
        self._bn2 = _luke_bn(out)
        self.skip = stride == 1 and inp == out

    def forward(self, x):
        y = F.silu(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        y = F.silu(self._bn1(self._depthwise_conv(y)))
        s = self._se_expand(F.silu(self._se_reduce(F.adaptive_avg_pool2d(y, 1))))
        y = self._bn2(self._project_conv(torch.sigmoid(s) * y))
        return y + x if self.skip else y


class LukeEfficientNet(nn.Module):
    """lukemelas' EfficientNet as SEED builds it (``from_name``: static padding for the
    model's resolution, or dynamic with ``image_size=None``) with SEED's ``fc``; ``width`` is
    lukemelas' width_coefficient."""

    def __init__(self, depth_mult, num_classes=1000, width=1.0, image_size=224, dropout=0.2):
        super().__init__()
        rf = lambda c: _round_filters(c, width)  # noqa: E731
        self._conv_stem = SamePadConv2d(3, rf(32), 3, 2, image_size=image_size)
        self._bn0 = _luke_bn(rf(32))
        size, blocks = _shrink(image_size, 2), []
        for e, k, s, i, o, n in _B0:
            for j in range(int(math.ceil(depth_mult * n))):  # round_repeats
                stride = s if j == 0 else 1
                blocks.append(LukeMBConv(e, k, stride, rf(i if j == 0 else o), rf(o), size))
                size = _shrink(size, stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(rf(320), rf(1280), 1, image_size=size)
        self._bn1 = _luke_bn(rf(1280))
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(rf(1280), num_classes) if num_classes else None
        self.dropout = self._dropout

    def pooled(self, x):
        x = F.silu(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.silu(self._bn1(self._conv_head(x)))
        return self._avg_pooling(x).flatten(1)

    def classify(self, feats):
        return self.fc(self._dropout(feats))

    def forward(self, x):
        return self.classify(self.pooled(x))


# ---------------------------------------------------------------- registry

# disco_jax's native resolutions of SEED's EfficientNets (lukemelas' `image_size` per model).
_LUKE_NATIVE = {"seed_efficientnet_b0": 224, "seed_efficientnet_b1": 240}
_RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def _no_drop_path(name: str, kwargs: dict) -> None:
    prob = kwargs.pop("stochastic_depth_prob", None)
    if name.startswith("seed_efficientnet") and prob is None:
        prob = 0.2  # disco_jax's default there is lukemelas' 0.2
    if prob:
        raise ConfigError(f"the torch {name} has no stochastic depth / drop-connect; build it"
                          f" with stochastic_depth_prob=0 (got {prob})")


def _resnet(name: str, nc: int, kw: dict) -> nn.Module:
    block, layers = _RESNETS[name]
    return ResNet(block, layers, nc, **kw)


def _luke(name: str, nc: int, kw: dict) -> nn.Module:
    size = kw.pop("image_size", "native")
    size = _LUKE_NATIVE[name] if size == "native" else size
    return LukeEfficientNet(1.0 if name.endswith("b0") else 1.1, nc, image_size=size, **kw)


BUILDERS: dict[str, Callable[[str, int, dict], nn.Module]] = {
    **{n: _resnet for n in _RESNETS},
    "mobilenet_v3_large": lambda n, nc, kw: MobileNetV3("large", nc, **kw),
    "mobilenet_v3_small": lambda n, nc, kw: MobileNetV3("small", nc, **kw),
    "efficientnet_b0": lambda n, nc, kw: EfficientNet(1.0, nc, **kw),
    "efficientnet_b1": lambda n, nc, kw: EfficientNet(1.1, nc, **kw),
    "seed_mobilenetv3_large": lambda n, nc, kw: SeedMobileNetV3("large", nc, **kw),
    "seed_mobilenetv3_small": lambda n, nc, kw: SeedMobileNetV3("small", nc, **kw),
    "seed_efficientnet_b0": _luke,
    "seed_efficientnet_b1": _luke,
}


def build_backbone(name: str, num_classes: int = 0, **model_kwargs: Any) -> nn.Module:
    """The torch twin of ``disco_jax.models.create(name, num_classes, **model_kwargs)``
    (``dtype`` is ignored: torch chooses precision by autocast)."""
    if name not in BUILDERS:
        raise ConfigError(f"no torch reference network for model {name!r}; available:"
                          f" {', '.join(sorted(BUILDERS))}")
    kw = {k: v for k, v in model_kwargs.items() if k != "dtype"}
    _no_drop_path(name, kw)
    try:
        return BUILDERS[name](name, num_classes, kw)
    except TypeError as e:  # an option the torch twin does not have
        raise ConfigError(f"torch {name} does not take {sorted(kw)}: {e}") from None


# ---------------------------------------------------------------- heads and the encoder


def build_head(kind: str, inp: int, out: int, hidden: int | None) -> tuple[str, nn.Module]:
    """(attribute name on the backbone, module) of a disco_jax head, named as to_torch
    exports it (`disco_jax.models.heads`)."""
    hidden = hidden or inp
    if kind == "mlp":
        return "fc", nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(inplace=True),
                                   nn.Linear(hidden, out))
    if kind == "mlp_bn":
        return "fc", nn.Sequential(nn.Linear(inp, hidden), nn.BatchNorm1d(hidden),
                                   nn.ReLU(inplace=True), nn.Linear(hidden, out))
    if kind == "linear":
        return "fc", nn.Linear(inp, out)
    if kind == "identity":
        return "", nn.Identity()
    if kind == "mcl_embed":  # MCL's Embed; the encoder L2-normalises its output
        return "proj_head", nn.Sequential(nn.Linear(inp, out), nn.ReLU(inplace=True),
                                          nn.Linear(out, out))
    raise ConfigError(f"no torch head {kind!r}; available: identity, linear, mcl_embed, mlp,"
                      " mlp_bn")


def _feature_dim(backbone: nn.Module) -> int:
    was = backbone.training
    backbone.eval()
    with torch.no_grad():  # 64 px: enough for every stride-32 network
        dim = int(backbone.pooled(torch.zeros(1, 3, 64, 64)).shape[1])
    backbone.train(was)
    return dim


class TorchEncoder(nn.Module):
    """Our ``models.Encoder`` in torch: ``forward(x)`` -> {features, embedding[, logits]}.

    ``net`` is the backbone with the head attached under its to_torch name, so
    ``encoder.net.load_state_dict(convert.to_torch(flax_vars, model, **kwargs), strict=True)``
    (`load`) fills everything. ``head_input="dropped"`` feeds the head the feature after the
    backbone's classifier dropout in train mode (SEED's students), as ``build_encoder`` does.
    """

    def __init__(self, net_cfg: Mapping[str, Any]):
        super().__init__()
        num_classes = int(net_cfg.get("num_classes", 0) or 0)
        self.net = build_backbone(net_cfg["model"], num_classes,
                                  **dict(net_cfg.get("model_kwargs", {})))
        dim = _feature_dim(self.net)
        self.head_attr, head = build_head(net_cfg["head"], dim, int(net_cfg["embed_dim"]),
                                          int(net_cfg.get("head_hidden", 0) or 0) or None)
        if self.head_attr == "fc" and getattr(self.net, "fc", None) is not None:
            raise ConfigError(f"{net_cfg['model']} has a classifier 'fc' and the head would"
                              " take its name; use num_classes=0")
        if self.head_attr:
            setattr(self.net, self.head_attr, head)
        else:
            self._identity = head
        self.classify = num_classes > 0
        self.normalize = net_cfg["head"] == "mcl_embed"  # F.normalize(x, dim=1) in Embed
        self.dropped = net_cfg.get("head_input", "features") == "dropped"

    def head(self) -> nn.Module:
        return getattr(self.net, self.head_attr) if self.head_attr else self._identity

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> TorchEncoder:
        self.net.load_state_dict(state_dict, strict=True)
        return self

    def forward(self, x):
        feats = self.net.pooled(x)
        head_in = self.net.dropout(feats) if self.dropped and self.training else feats
        emb = self.head()(head_in)
        out = {"features": feats, "embedding": F.normalize(emb, dim=1) if self.normalize else emb}
        if self.classify:
            out["logits"] = self.net.classify(feats)
        return out


def from_flax(net_cfg: Mapping[str, Any], variables: Mapping[str, Any]) -> TorchEncoder:
    """A TorchEncoder holding the Flax Encoder variables ``{"params", "batch_stats"}`` of
    ``models.build_encoder(net_cfg)`` (numpy or jax arrays), loaded with strict=True."""
    from disco_jax import convert

    enc = TorchEncoder(net_cfg)
    kwargs = {k: v for k, v in dict(net_cfg.get("model_kwargs", {})).items() if k != "dtype"}
    state = convert.to_torch(dict(variables), net_cfg["model"], **kwargs)
    return enc.load(state)
