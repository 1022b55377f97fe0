"""torch vs Flax equivalence and exact export round trips for the rest of the model zoo.

torchvision and timm are not installed, so the torch reference networks are written from their
sources with their exact parameter names: torchvision's EfficientNet and SEED's own MobileNetV3
and EfficientNet (lukemelas/EfficientNet-PyTorch with TF 'SAME' padding, head 'fc';
efficientnet_pytorch is not installed either) in `disco_jax.bench.torch_nets` (shared with the
benchmark's PyTorch peers, like the torchvision ResNet blocks), and below timm's EfficientNet
and MobileNetV3 (DepthwiseSeparableConv / InvertedResidual / SqueezeExcite blocks),
torchvision's wide ResNet and SwAV's widened ResNet (on torch_nets' Bottleneck), and MCL's
CIFAR ResNets and WRNs; ``pooled(x)`` is each network's pre-logit feature. Small widths and
16-48 px inputs keep every compile short; the architecture (block types, depths, names,
activations, SE placement) is the real one. Random weights and BN statistics, eval mode,
features and logits within 1e-4; then export -> strict load -> re-import exactly.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

from disco_jax import checkpoint, convert, models
from disco_jax.bench.torch_nets import (
    _B0,
    BasicBlock,
    Bottleneck,
    EfficientNet,
    LukeEfficientNet,
    SeedMobileNetV3,
)
from disco_jax.errors import ConfigError
from disco_jax.models import mobilenetv3
from disco_jax.models.mobilenetv3 import make_divisible
from tests.helpers import sizes
from tests.test_convert import TOL, _assert_trees_equal, _image, _jit, _nhwc, randomize

# ---------------------------------------------------------------- torch references: ResNets


class ResNetRef(nn.Module):
    """torchvision / SwAV / MCL-CIFAR ResNet: stem, stages, pool, classifier ``fc_name``."""

    def __init__(self, block, layers, nc, base, stem="imagenet", fc_name="fc", **block_kw):
        super().__init__()
        k, s, p = (7, 2, 3) if stem == "imagenet" else (3, 1, 1)
        self.conv1 = nn.Conv2d(3, base, k, s, p, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
        inp = base
        for i, n in enumerate(layers):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(inp, base * 2**i, stride, **block_kw))
                inp = base * 2**i * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.n_stages = len(layers)
        self.fc_name = fc_name
        setattr(self, fc_name, nn.Linear(inp, nc))

    def pooled(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return x.mean((2, 3))

    def forward(self, x):
        return getattr(self, self.fc_name)(self.pooled(x))


class WRNBlockRef(nn.Module):
    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inp)
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.equal = inp == out
        self.convShortcut = None if self.equal else nn.Conv2d(inp, out, 1, stride, bias=False)

    def forward(self, x):  # Zagoruyko's BasicBlock (dropRate 0)
        if not self.equal:
            x = torch.relu(self.bn1(x))
            out = x
        else:
            out = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(out))))
        return (x if self.equal else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):
    def __init__(self, n, inp, out, stride):
        super().__init__()
        self.layer = nn.Sequential(
            *[WRNBlockRef(inp if i == 0 else out, out, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class WRNRef(nn.Module):
    def __init__(self, depth, k, nc, width):
        super().__init__()
        n = (depth - 4) // 6
        ch = [max(1, round(c * width)) for c in (16, 16 * k, 32 * k, 64 * k)]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], nc)

    def pooled(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return torch.relu(self.bn1(x)).mean((2, 3))

    def forward(self, x):
        return self.fc(self.pooled(x))


# ---------------------------------------------------------------- timm EfficientNet/MobileNetV3


class TimmSE(nn.Module):
    def __init__(self, ch, rd, act, gate):
        super().__init__()
        self.conv_reduce, self.conv_expand = nn.Conv2d(ch, rd, 1), nn.Conv2d(rd, ch, 1)
        self.act1, self.gate = act(), gate()

    def forward(self, x):
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), True)))))


class TimmDS(nn.Module):
    """timm DepthwiseSeparableConv: conv_dw, bn1, act, se, conv_pw, bn2 (no pw act)."""

    def __init__(self, inp, out, k, stride, se_rd, act, se_act, gate):
        super().__init__()
        self.conv_dw = nn.Conv2d(inp, inp, k, stride, k // 2, groups=inp, bias=False)
        self.bn1, self.act = nn.BatchNorm2d(inp), act()
        self.se = TimmSE(inp, se_rd, se_act, gate) if se_rd else nn.Identity()
        self.conv_pw, self.bn2 = nn.Conv2d(inp, out, 1, bias=False), nn.BatchNorm2d(out)
        self.skip = stride == 1 and inp == out

    def forward(self, x):
        y = self.bn2(self.conv_pw(self.se(self.act(self.bn1(self.conv_dw(x))))))
        return y + x if self.skip else y


class TimmIR(nn.Module):
    """timm InvertedResidual: conv_pw, bn1, act, conv_dw, bn2, act, se, conv_pwl, bn3."""

    def __init__(self, inp, mid, out, k, stride, se_rd, act, se_act, gate):
        super().__init__()
        self.conv_pw, self.bn1 = nn.Conv2d(inp, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False)
        self.bn2, self.act = nn.BatchNorm2d(mid), act()
        self.se = TimmSE(mid, se_rd, se_act, gate) if se_rd else nn.Identity()
        self.conv_pwl, self.bn3 = nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out)
        self.skip = stride == 1 and inp == out

    def forward(self, x):
        y = self.act(self.bn1(self.conv_pw(x)))
        y = self.se(self.act(self.bn2(self.conv_dw(y))))
        y = self.bn3(self.conv_pwl(y))
        return y + x if self.skip else y


class TimmEfficientNetRef(nn.Module):
    def __init__(self, depth_mult, nc, width):
        super().__init__()
        ch = lambda c: make_divisible(c * width)  # noqa: E731
        self.conv_stem = nn.Conv2d(3, ch(32), 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch(32))
        inp, stages = ch(32), []
        for i, (e, k, s, _, o, n) in enumerate(_B0):
            blocks = []
            for j in range(int(math.ceil(n * depth_mult))):
                stride, out = s if j == 0 else 1, ch(o)
                if i == 0:
                    blocks.append(TimmDS(inp, out, k, stride, round(inp * 0.25), *_SILU))
                else:
                    mid = make_divisible(inp * e)
                    rd = round(mid * (0.25 / e))
                    blocks.append(TimmIR(inp, mid, out, k, stride, rd, *_SILU))
                inp = out
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(inp, ch(1280), 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch(1280))
        self.classifier = nn.Linear(ch(1280), nc)

    def pooled(self, x):
        x = self.blocks(nn.functional.silu(self.bn1(self.conv_stem(x))))
        return nn.functional.silu(self.bn2(self.conv_head(x))).mean((2, 3))

    def forward(self, x):
        return self.classifier(self.pooled(x))


_SILU = (nn.SiLU, nn.SiLU, nn.Sigmoid)
_TIMM_STAGES = {"large": (1, 2, 3, 4, 2, 3), "small": (1, 2, 3, 2, 3)}


class ConvBnAct(nn.Module):
    def __init__(self, inp, out):
        super().__init__()
        self.conv, self.bn1 = nn.Conv2d(inp, out, 1, bias=False), nn.BatchNorm2d(out)

    def forward(self, x):
        return nn.functional.hardswish(self.bn1(self.conv(x)))


class TimmMobileNetV3Ref(nn.Module):
    def __init__(self, arch, nc, width):
        super().__init__()
        cfgs, head = mobilenetv3.ARCHS[arch]
        ch = lambda c: make_divisible(c * width)  # noqa: E731
        stem = 16 if width < 0.75 else ch(16)  # timm's fix_stem
        self.conv_stem = nn.Conv2d(3, stem, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        inp, stages, it = stem, [], iter(cfgs)
        for i, n in enumerate(_TIMM_STAGES[arch]):
            blocks = []
            for _ in range(n):
                c = next(it)
                act = nn.Hardswish if c.use_hs else nn.ReLU
                acts = (act, nn.ReLU, nn.Hardsigmoid)
                out = ch(c.out_ch)
                if i == 0:
                    rd = make_divisible(inp * 0.25) if c.use_se else 0
                    blocks.append(TimmDS(inp, out, c.kernel, c.stride, rd, *acts))
                else:
                    mid = ch(c.expanded)
                    rd = make_divisible(mid * 0.25) if c.use_se else 0
                    blocks.append(TimmIR(inp, mid, out, c.kernel, c.stride, rd, *acts))
                inp = out
            stages.append(nn.Sequential(*blocks))
        stages.append(nn.Sequential(ConvBnAct(inp, 6 * inp)))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(6 * inp, ch(head), 1)  # with bias, no BN
        self.classifier = nn.Linear(ch(head), nc)

    def pooled(self, x):
        x = self.blocks(nn.functional.hardswish(self.bn1(self.conv_stem(x))))
        return torch.flatten(nn.functional.hardswish(self.conv_head(x.mean((2, 3), True))), 1)

    def forward(self, x):
        return self.classifier(self.pooled(x))


# ---------------------------------------------------------------- the cases

# name: (torch reference builder, model kwargs, num_classes, image size)
CASES = {
    "efficientnet_b0": (lambda: EfficientNet(1.0, 5, 0.25), {"width": 0.25}, 5, 32),
    "efficientnet_b1": (lambda: EfficientNet(1.1, 5, 0.25), {"width": 0.25}, 5, 32),
    "timm_efficientnet_b0": (lambda: TimmEfficientNetRef(1.0, 5, 0.25), {"width": 0.25}, 5, 32),
    "timm_efficientnet_b1": (lambda: TimmEfficientNetRef(1.1, 5, 0.25), {"width": 0.25}, 5, 32),
    "mobilenetv3_large_100": (
        lambda: TimmMobileNetV3Ref("large", 5, 0.25),
        {"width": 0.25},
        5,
        32,
    ),
    "mobilenetv3_small_100": (
        lambda: TimmMobileNetV3Ref("small", 5, 0.25),
        {"width": 0.25},
        5,
        32,
    ),
    "seed_mobilenetv3_large": (
        lambda: SeedMobileNetV3("large", 5, 0.25),
        {"width": 0.25},
        5,
        32,
    ),
    "seed_mobilenetv3_small": (
        lambda: SeedMobileNetV3("small", 5, 0.25),
        {"width": 0.25},
        5,
        32,
    ),
    "wide_resnet50_2": (
        lambda: ResNetRef(Bottleneck, (3, 4, 6, 3), 5, 8, "cifar", base_width=128),
        {"width": 0.125, "stem": "cifar"},
        5,
        16,
    ),
    # SwAV's widening (x2) on top of disco_jax's width 1/16: stem 8 channels, planes x2.
    "swav_resnet50w2": (
        lambda: ResNetRef(Bottleneck, (3, 4, 6, 3), 5, 8, "imagenet"),
        {"width": 0.0625},
        5,
        32,
    ),
    "resnet8": (
        lambda: ResNetRef(BasicBlock, (1, 1, 1), 7, 8, "cifar", "classifier"),
        {"width": 0.5},
        7,
        16,
    ),
    "resnet32": (
        lambda: ResNetRef(BasicBlock, (5, 5, 5), 7, 8, "cifar", "classifier"),
        {"width": 0.5},
        7,
        16,
    ),
    "resnet110": (
        lambda: ResNetRef(Bottleneck, (12, 12, 12), 7, 8, "cifar", "classifier"),
        {"width": 0.5},
        7,
        16,
    ),
    "wrn_16_2": (lambda: WRNRef(16, 2, 7, 0.5), {"width": 0.5}, 7, 16),
    "wrn_40_2": (lambda: WRNRef(40, 2, 7, 0.5), {"width": 0.5}, 7, 16),
    "wrn_28_4": (lambda: WRNRef(28, 4, 7, 0.25), {"width": 0.25}, 7, 16),
    "resnet56": (
        lambda: ResNetRef(BasicBlock, (9, 9, 9), 7, 8, "cifar", "classifier"),
        {"width": 0.5},
        7,
        16,
    ),
    # torchvision depths beyond the resnet18/50 of tests/test_convert.py (width 1/8).
    "resnet34": (
        lambda: ResNetRef(BasicBlock, (3, 4, 6, 3), 5, 8, "cifar"),
        {"width": 0.125, "stem": "cifar"},
        5,
        16,
    ),
    "resnet101": (
        lambda: ResNetRef(Bottleneck, (3, 4, 23, 3), 5, 8, "cifar"),
        {"width": 0.125, "stem": "cifar"},
        5,
        16,
    ),
    "resnet152": (
        lambda: ResNetRef(Bottleneck, (3, 8, 36, 3), 5, 8, "cifar"),
        {"width": 0.125, "stem": "cifar"},
        5,
        16,
    ),
    # SwAV x4 / x5 on width 1/16: stem 16 / 20 channels.
    "swav_resnet50w4": (
        lambda: ResNetRef(Bottleneck, (3, 4, 6, 3), 5, 16, "imagenet"),
        {"width": 0.0625},
        5,
        32,
    ),
    "swav_resnet50w5": (
        lambda: ResNetRef(Bottleneck, (3, 4, 6, 3), 5, 20, "imagenet"),
        {"width": 0.0625},
        5,
        32,
    ),
}


def calibrate(model: nn.Module, seed: int, size: int = 32) -> nn.Module:
    """Set every BN's running statistics to those of a random batch (then eval mode).

    Random statistics alone let activations shrink layer after layer in these deep nets, until
    the output no longer depends on the input; calibrated BN keeps every layer O(1). ``size``:
    the test's input size where padding makes the statistics size dependent (TF 'SAME').
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = 1.0  # running statistic := this batch's
    model.train()
    with torch.no_grad():
        model(_image((32, 3, size, size), seed=100 + seed))
    for m in bns:
        m.momentum = 0.1
        m.num_batches_tracked.fill_(123)
    return model.eval()


def _flax_outputs(model, variables, x):
    """(features, logits) in eval mode from one forward pass (one trace, one compile)."""
    out = _jit(functools.partial(model.apply, train=False, features="both"))(variables, x)
    return np.asarray(out["features"]), np.asarray(out["logits"])


def _assert_close(actual, expected):
    """Within 1e-4 of the output's scale: these random deep nets reach |x| ~ 50, where float32
    summation order alone moves the last digits by more than 1e-4 absolute."""
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=TOL["rtol"], atol=TOL["atol"] * scale)


# The larger members of each family (helpers.LARGER_SIZES: ResNet-101/152, the B1s, the large
# MobileNets, SwAV's w4/w5, ...) with the slow tests; the quick tier converts their smaller
# members, the same layouts with other block counts and widths.
@pytest.mark.parametrize("name", sizes(sorted(CASES)))
def test_zoo_matches_torch_and_round_trips(name):
    source = "timm" if name.startswith(("timm", "mobilenetv3")) else "torchvision"
    _matches_torch_and_round_trips(name, *CASES[name], sorted(CASES).index(name), source)


def _matches_torch_and_round_trips(name, build, kwargs, nc, size, seed, source, calib_size=32):
    tmodel = calibrate(randomize(build(), seed), seed, calib_size)
    x = _image((2, 3, size, size), seed=1)
    with torch.no_grad():
        t_feats, t_logits = tmodel.pooled(x).numpy(), tmodel(x).numpy()
    # The 1e-4 tolerance is meaningful: O(1) outputs that depend on the input.
    assert 0.1 < np.abs(t_logits).max() < 100
    assert np.abs(t_feats[0] - t_feats[1]).max() > 0.05

    variables = convert.from_torch(tmodel.state_dict(), name, source, num_classes=nc, **kwargs)
    model = models.create(name, num_classes=nc, **kwargs)
    feats, logits = _flax_outputs(model, variables, _nhwc(x))
    _assert_close(feats, t_feats)
    _assert_close(logits, t_logits)

    # Export (timm's module names keep their '_'), strict load, re-import: all exact.
    original = tmodel.state_dict()
    exported = convert.to_torch(variables, name, **kwargs)  # names rebuilt from the rule
    assert set(exported) == set(original)
    via_keys = convert.to_torch(variables, name, keys=list(original), **kwargs)
    assert list(via_keys) == list(exported)
    for key, value in original.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(exported[key], value), key
    tmodel.load_state_dict(exported, strict=True)
    _assert_trees_equal(convert.from_torch(exported, name, source, **kwargs), variables)


# SEED's EfficientNets, apart from CASES so that the seeds of the cases above stay as they were.
# (model, torch reference, kwargs, classes, input size, seed). The input sizes make the static
# padding matter: B0's pads are fixed for 224 px and B1's for 240 px (what SEED builds), and at
# 48 px B0's last stride-2 conv sees a 3 px map (padded (1, 2) as at 14 px, where TF 'SAME' pads
# (2, 2)); at 32 px B1's sees 2 px (padded (2, 2) as at 15 px, TF 'SAME' (1, 2)). Dynamic
# padding (image_size=None) at 34 px pads the stem (0, 1) and the later odd maps (1, 1) / (2, 2).
SEED_EFFICIENTNET_CASES = {
    "b0": ("seed_efficientnet_b0", lambda: LukeEfficientNet(1.0, 5, 0.25, 224), {}, 48, 40),
    "b1": ("seed_efficientnet_b1", lambda: LukeEfficientNet(1.1, 5, 0.25, 240), {}, 32, 41),
    "b0-dynamic": (
        "seed_efficientnet_b0",
        lambda: LukeEfficientNet(1.0, 5, 0.25, None),
        {"image_size": None},
        34,
        42,
    ),
}


@pytest.mark.parametrize("case", sizes(sorted(SEED_EFFICIENTNET_CASES),
                                        lambda case: SEED_EFFICIENTNET_CASES[case][0]))
def test_seed_efficientnet_matches_torch_and_round_trips(case):
    name, build, kwargs, size, seed = SEED_EFFICIENTNET_CASES[case]
    kwargs = {"width": 0.25, **kwargs}
    _matches_torch_and_round_trips(name, build, kwargs, 5, size, seed, "torchvision", size)


def test_seed_efficientnet_param_counts_are_lukemelas():
    """The full-size torch reference (lukemelas' definition, 1000 classes) has exactly the
    params of the Flax models (tests/test_models_zoo.py's table)."""
    from tests.test_models_zoo import ZOO

    for name, depth in (("seed_efficientnet_b0", 1.0), ("seed_efficientnet_b1", 1.1)):
        ref = LukeEfficientNet(depth, 1000, 1.0, None)
        assert sum(p.numel() for p in ref.parameters()) == ZOO[name][0], name


def test_seed_efficientnet_student_checkpoint(tmp_path, capsys):
    """A SEED training checkpoint ('module.student.*' with the --student_mlp fc, the teacher
    and the queue) converts via the 'seed' format, by API and by CLI, and exports back."""
    from disco_jax.convert.__main__ import main as convert_main

    student = LukeEfficientNet(1.0, 5, 0.25, 224)
    d = student.fc.in_features
    student.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 16))  # SEED's mlp=True
    student = calibrate(randomize(student, seed=43), seed=43)
    state = {f"module.student.{k}": v for k, v in student.state_dict().items()}
    state |= {"module.teacher.conv1.weight": torch.zeros(8, 3, 7, 7)}
    state |= {"module.queue": torch.zeros(16, 8), "module.queue_ptr": torch.zeros(1)}
    path = str(tmp_path / "seed_effb0.pth.tar")
    torch.save({"epoch": 200, "arch": "efficientnet_b0", "state_dict": state}, path)
    x = _image((2, 3, 32, 32), seed=44)
    with torch.no_grad():
        t_feats = student.pooled(x).numpy()
        t_embed = student(x).numpy()

    name, kwargs = "seed_efficientnet_b0", {"width": 0.25}
    result = convert.convert(convert.load_torch_file(path), name, "seed", **kwargs)
    assert (result.head, result.head_hidden, result.embed_dim) == ("mlp", d, 16)
    encoder = models.Encoder(
        backbone=models.create(name, num_classes=0, **kwargs),
        head=models.create_head("mlp", out_dim=16, hidden_dim=d),
    )
    out = _jit(functools.partial(encoder.apply, train=False))(result.variables, _nhwc(x))
    _assert_close(np.asarray(out["features"]), t_feats)
    _assert_close(np.asarray(out["embedding"]), t_embed)

    # Back under SEED's names, strict load into the student, re-import: exact.
    exported = convert.to_torch(result.variables, name, prefix="module.student.", **kwargs)
    assert "module.student._blocks.3._se_reduce.bias" in exported
    assert "module.student.fc.2.weight" in exported
    student.load_state_dict({k[len("module.student.") :]: v for k, v in exported.items()})
    _assert_trees_equal(convert.from_torch(exported, name, "seed", **kwargs), result.variables)

    # The CLI writes the same variables as an encoder directory.
    out_dir = str(tmp_path / "teacher")
    argv = ["seed", name, path, out_dir, "--model-kwarg", "width=0.25"]
    assert convert_main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    loaded, manifest = checkpoint.load_encoder(out_dir)
    assert (manifest["head"], manifest["head_hidden"], manifest["embed_dim"]) == ("mlp", d, 16)
    _assert_trees_equal(loaded, result.variables)

    # Strictness: a missing block key, a stray student key and a wrong shape, in one error.
    bad = dict(state)
    del bad["module.student._blocks.2._se_expand.bias"]
    bad["module.student._blocks.99._bn0.weight"] = torch.zeros(8)
    bad["module.student._conv_head.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ConfigError) as err:
        convert.from_torch(bad, name, "seed", **kwargs)
    msg = str(err.value)
    assert "missing 1 key(s): module.student._blocks.2._se_expand.bias" in msg
    assert "unexpected 1 key(s): module.student._blocks.99._bn0.weight" in msg
    assert "wrong shape for 1 key(s): module.student._conv_head.weight" in msg


def test_disco_student_with_timm_classifier_head(tmp_path):
    """DisCo's timm students carry their MLP as 'classifier.0/2' (d -> 2048 -> 128)."""
    student = TimmMobileNetV3Ref("small", 5, 0.25)
    d = student.classifier.in_features
    student.classifier = nn.Sequential(nn.Linear(d, 24), nn.ReLU(), nn.Linear(24, 16))
    student = calibrate(randomize(student, seed=20), seed=20)
    state = {f"module.encoder_q.{k}": v for k, v in student.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v.clone() for k, v in student.state_dict().items()}
    state |= {"module.teacher_encoder_q.conv1.weight": torch.zeros(1)}
    state |= {"module.queue": torch.zeros(16, 8), "module.queue_ptr": torch.zeros(1)}
    path = str(tmp_path / "disco_mbv3.pth.tar")
    torch.save({"epoch": 200, "state_dict": state}, path)
    x = _image((2, 3, 32, 32), seed=21)
    with torch.no_grad():
        t_feats = student.pooled(x).numpy()
        t_embed = student(x).numpy()

    kwargs = {"width": 0.25}
    name = "mobilenetv3_small_100"
    result = convert.convert(convert.load_torch_file(path), name, "disco", **kwargs)
    assert (result.head, result.head_hidden, result.embed_dim) == ("mlp", 24, 16)
    encoder = models.Encoder(
        backbone=models.create(name, num_classes=0, **kwargs),
        head=models.create_head("mlp", out_dim=16, hidden_dim=24),
    )
    out = _jit(functools.partial(encoder.apply, train=False))(result.variables, _nhwc(x))
    _assert_close(np.asarray(out["features"]), t_feats)
    _assert_close(np.asarray(out["embedding"]), t_embed)

    # Back under DisCo's names (head as 'classifier'), strict load into the student, re-import.
    exported = convert.to_torch(result.variables, name, head_module="classifier", **kwargs)
    student.load_state_dict(exported, strict=True)
    prefixed = {f"module.encoder_q.{k}": v for k, v in exported.items()}
    _assert_trees_equal(convert.from_torch(prefixed, name, "disco", **kwargs), result.variables)
