"""PyTorch checkpoint conversion: eval outputs equal torch's, exact round trips, clear errors.

torchvision cannot be imported here, so the torch reference networks (in
`disco_jax.bench.torch_nets`, shared with the benchmark's PyTorch peers) are written with
torchvision's module names and structure (ResNet v1.5 BasicBlock/Bottleneck, MobileNetV3 with
Conv2dNormActivation / SqueezeExcitation blocks); the MobileNetV3 block table is taken from
`disco_jax.models.mobilenetv3` (it is torchvision's, and its parameter counts are checked
against torchvision in test_models); ``pooled(x)`` is a network's pre-logit feature,
``forward`` its logits. Weights and BN running statistics are random but scaled so eval outputs
stay O(1), which makes a 1e-4 tolerance meaningful.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from disco_jax import checkpoint, convert, models
from disco_jax.bench.torch_nets import BasicBlock, Bottleneck, MobileNetV3, ResNet
from disco_jax.convert.__main__ import main as convert_main
from disco_jax.errors import ConfigError

# Tiny programs run once: XLA's backend optimisations cost more than they save.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
TOL = {"rtol": 1e-4, "atol": 1e-4}


# ---------------------------------------------------------------- random torch weights


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics, scaled so that deep eval outputs stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / fan_in**0.5)
                if mod.bias is not None:
                    mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
            elif isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
                n = mod.num_features
                mod.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=g))
                mod.bias.copy_(0.1 * torch.randn(n, generator=g))
                mod.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
                mod.num_batches_tracked.fill_(123)
    return model.eval()


# ---------------------------------------------------------------- helpers


def _image(shape_nchw, seed=0) -> torch.Tensor:
    return torch.randn(shape_nchw, generator=torch.Generator().manual_seed(seed))


def _nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _flax_outputs(model, variables, x):
    """(features, logits) in eval mode, in one compile."""

    @_jit
    def run(v, x):
        feats = model.apply(v, x, train=False, features=True)
        return feats, model.apply(v, x, train=False)

    return jax.tree_util.tree_map(np.asarray, run(variables, x))


def _assert_trees_equal(a, b):
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(fa, fb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def _check_round_trip(tmodel: nn.Module, variables: dict, name: str, **kwargs):
    exported = convert.to_torch(variables, name, **kwargs)
    original = tmodel.state_dict()
    assert set(exported) == set(original)
    for key, value in original.items():
        if not key.endswith("num_batches_tracked"):  # exported as zeros
            assert torch.equal(exported[key], value), key
    # strict=True: every torchvision key (num_batches_tracked included) and nothing else.
    missing, unexpected = tmodel.load_state_dict(exported, strict=True)
    assert not missing and not unexpected
    _assert_trees_equal(convert.from_torch(exported, name, **kwargs), variables)
    # Target names are taken verbatim when given (timm-style modules contain '_').
    renamed = [k.replace("layer1.", "layer1_") for k in original]
    via_keys = convert.to_torch(variables, name, keys=renamed, **kwargs)
    assert set(via_keys) == set(renamed)
    with pytest.raises(ConfigError, match="no target key for"):
        convert.to_torch(variables, name, keys=renamed[1:], **kwargs)


# ---------------------------------------------------------------- equivalence + round trip


RESNETS = {
    # name: (block, layers, kwargs, num_classes, image size)
    "resnet18": (BasicBlock, (2, 2, 2, 2), {"width": 0.25, "stem": "imagenet"}, 10, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), {"width": 0.125, "stem": "cifar"}, 7, 16),
}


@pytest.mark.parametrize("name", list(RESNETS))
def test_resnet_matches_torch_and_round_trips(name):
    block, layers, kwargs, nc, size = RESNETS[name]
    tmodel = randomize(ResNet(block, layers, nc, **kwargs), seed=1)
    x = _image((2, 3, size, size))
    with torch.no_grad():
        t_feats, t_logits = tmodel.pooled(x).numpy(), tmodel(x).numpy()
    assert 0.1 < np.abs(t_logits).max() < 100  # the tolerance below is meaningful

    variables = convert.from_torch(tmodel.state_dict(), name, **kwargs)  # num_classes inferred
    model = models.create(name, num_classes=nc, **kwargs)
    feats, logits = _flax_outputs(model, variables, _nhwc(x))
    np.testing.assert_allclose(feats, t_feats, **TOL)
    np.testing.assert_allclose(logits, t_logits, **TOL)
    _check_round_trip(tmodel, variables, name, **kwargs)


@pytest.mark.parametrize("arch", ["large", "small"])
def test_mobilenet_v3_matches_torch_and_round_trips(arch):
    name, nc = f"mobilenet_v3_{arch}", 5
    tmodel = randomize(MobileNetV3(arch, nc, width=0.5), seed=2)
    x = _image((2, 3, 64, 64))
    with torch.no_grad():
        t_feats, t_logits = tmodel.pooled(x).numpy(), tmodel(x).numpy()
    assert 0.1 < np.abs(t_logits).max() < 100

    variables = convert.from_torch(tmodel.state_dict(), name, num_classes=nc, width=0.5)
    model = models.create(name, num_classes=nc, width=0.5)
    feats, logits = _flax_outputs(model, variables, _nhwc(x))
    np.testing.assert_allclose(feats, t_feats, **TOL)
    np.testing.assert_allclose(logits, t_logits, **TOL)
    _check_round_trip(tmodel, variables, name, width=0.5)


# ---------------------------------------------------------------- MoCo + CLI


def _moco_checkpoint(path: str, width: float = 0.25, hidden: int = 48, seed: int = 3):
    """A MoCo-v2 training checkpoint: encoder_q/encoder_k with an MLP fc, the queue, extras."""
    enc = ResNet(BasicBlock, (2, 2, 2, 2), num_classes=0, width=width)
    enc.fc = nn.Sequential(nn.Linear(enc.feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, 16))
    randomize(enc, seed)
    state = {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v.clone() for k, v in enc.state_dict().items()}
    state |= {"module.queue": torch.randn(16, 32), "module.queue_ptr": torch.zeros(1)}
    ckpt = {"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {"lr": 0.03}}
    torch.save(ckpt, path)
    return enc


def test_moco_checkpoint_to_encoder_and_cli(tmp_path, capsys):
    path = str(tmp_path / "moco_v2.pth.tar")
    enc = _moco_checkpoint(path)
    x = _image((2, 3, 32, 32), seed=5)
    with torch.no_grad():
        t_feats = enc.pooled(x)
        t_embed = enc.fc(t_feats).numpy()

    variables = convert.from_torch(convert.load_torch_file(path), "resnet18", "moco", width=0.25)
    assert set(variables["params"]) == {"backbone", "head"}
    assert set(variables["batch_stats"]) == {"backbone"}
    encoder = models.Encoder(
        backbone=models.create("resnet18", num_classes=0, width=0.25),
        head=models.create_head("mlp", out_dim=16, hidden_dim=48),
    )
    out = _jit(functools.partial(encoder.apply, train=False))(variables, _nhwc(x))
    np.testing.assert_allclose(np.asarray(out["features"]), t_feats.numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(out["embedding"]), t_embed, **TOL)

    # Export back into MoCo's encoder_q layout and re-import: exact.
    exported = convert.to_torch(variables, "resnet18", prefix="module.encoder_q.", width=0.25)
    assert "module.encoder_q.fc.0.weight" in exported
    _assert_trees_equal(convert.from_torch(exported, "resnet18", "moco", width=0.25), variables)

    # The CLI writes an encoder directory the trainer can load as a teacher.
    out_dir = str(tmp_path / "teacher")
    argv = ["moco", "resnet18", path, out_dir, "--model-kwarg", "width=0.25"]
    assert convert_main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    loaded, manifest = checkpoint.load_encoder(out_dir)
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert manifest["source_sha256"] == sha
    assert manifest["source_format"] == "moco"
    assert manifest["source_file"] == os.path.abspath(path)
    assert (manifest["model"], manifest["model_kwargs"]) == ("resnet18", {"width": 0.25})
    assert (manifest["head"], manifest["head_hidden"], manifest["embed_dim"]) == ("mlp", 48, 16)
    _assert_trees_equal(loaded, jax.tree_util.tree_map(np.asarray, variables))


@pytest.mark.slow
def test_cli_torchvision_drops_classifier_and_errors(tmp_path, capsys):
    tmodel = randomize(ResNet(BasicBlock, (2, 2, 2, 2), 10, width=0.25, stem="cifar"), seed=4)
    path = str(tmp_path / "sup.pth")
    torch.save(tmodel.state_dict(), path)
    out_dir = str(tmp_path / "enc")
    argv = ["torchvision", "resnet18", path, out_dir]
    assert convert_main([*argv, "--model-kwarg", "width=0.25", "--model-kwarg", "stem=cifar"]) == 0
    loaded, manifest = checkpoint.load_encoder(out_dir)
    assert (manifest["head"], manifest["embed_dim"], manifest["source_num_classes"]) == (
        "identity",
        tmodel.feature_dim,
        10,
    )
    assert "fc" not in loaded["params"]["backbone"]  # the classifier was checked, then dropped
    direct = convert.from_torch(tmodel.state_dict(), "resnet18", width=0.25, stem="cifar")
    _assert_trees_equal(loaded["params"]["backbone"]["layer4_1"], direct["params"]["layer4_1"])

    # Wrong options: one `error:` line, exit status 2.
    assert convert_main([*argv, "--model-kwarg", "width=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "wrong shape" in err
    proc = subprocess.run(
        [sys.executable, "-m", "disco_jax.convert", "moco", "resnet18", "/nonexistent.pth", "o"],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: checkpoint file '/nonexistent.pth' not found"


# ---------------------------------------------------------------- mismatch errors


@pytest.fixture(scope="module")
def small_state():
    tmodel = randomize(ResNet(BasicBlock, (2, 2, 2, 2), 10, width=0.25), seed=6)
    return dict(tmodel.state_dict())


def _convert(state, **kw):
    return convert.from_torch(state, "resnet18", width=0.25, **kw)


def test_renamed_key_is_reported(small_state):
    state = dict(small_state)
    state["layer1.0.convX.weight"] = state.pop("layer1.0.conv1.weight")
    with pytest.raises(ConfigError, match=r"missing 1 key\(s\): layer1\.0\.conv1\.weight") as e:
        _convert(state)
    assert "unexpected 1 key(s): layer1.0.convX.weight" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_key_is_reported_unless_ignored(small_state):
    state = dict(small_state)
    del state["bn1.running_var"]
    with pytest.raises(ConfigError, match=r"missing 1 key\(s\): bn1\.running_var"):
        _convert(state)
    # Ignored on purpose: the variable keeps a fresh initialisation (ones for a variance).
    variables = _convert(state, ignore=["bn1.running_var"])
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], 1.0)


def test_wrong_shape_is_reported(small_state):
    state = dict(small_state)
    state["layer2.0.conv2.weight"] = torch.zeros(32, 32, 5, 5)
    with pytest.raises(ConfigError, match=r"wrong shape for 1 key\(s\): layer2\.0\.conv2\.weight"):
        _convert(state)
    with pytest.raises(ConfigError, match=r"checkpoint \(32, 32, 5, 5\), model \(32, 32, 3, 3\)"):
        _convert(state)


def test_every_problem_is_reported_once_in_one_error(tmp_path, small_state, capsys, monkeypatch):
    state = dict(small_state)
    del state["layer3.1.bn2.bias"]  # missing
    state["layer9.0.conv1.weight"] = torch.zeros(1)  # unexpected
    state["layer2.0.conv2.weight"] = torch.zeros(32, 32, 5, 5)  # wrong shape
    state["extra.proj.weight"] = torch.zeros(1)  # unsupported (by the format added below)
    fmt = convert.SourceFormat("torchvision names", unsupported=(("extra.*", "no extra heads"),))
    monkeypatch.setitem(convert.FORMATS, "tv_extra", fmt)
    with pytest.raises(ConfigError) as e:
        _convert(state, source="tv_extra")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("tv_extra checkpoint does not match resnet18(")
    assert "missing 1 key(s): layer3.1.bn2.bias;" in msg
    assert "unexpected 1 key(s): layer9.0.conv1.weight;" in msg
    assert "wrong shape for 1 key(s): layer2.0.conv2.weight (checkpoint (32, 32, 5, 5)" in msg
    assert "no extra heads: extra.proj.weight; pass ignore 'extra.*'" in msg
    for key in ("layer3.1.bn2.bias", "layer9.0.conv1.weight", "layer2.0.conv2.weight",
                "extra.proj.weight"):
        assert msg.count(key) == 1, key  # each named once, under one heading
    # The CLI: the same problems on one `error:` line, exit status 2, nothing written.
    path = str(tmp_path / "bad.pth")
    torch.save(state, path)
    out = tmp_path / "enc"
    assert convert_main(["torchvision", "resnet18", path, str(out), "--model-kwarg",
                         "width=0.25"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: torchvision checkpoint does not match") and "\n" not in err
    for part in ("missing 1 key(s)", "unexpected 2 key(s)", "wrong shape for 1 key(s)"):
        assert part in err, part
    assert not out.exists()


def test_long_lists_are_truncated_and_wrong_format_is_explained(small_state):
    state = {f"encoder.{k}": v for k, v in small_state.items()}
    with pytest.raises(ConfigError, match=r"and \d+ more.*no key matched at all") as e:
        _convert(state)
    assert len(str(e.value)) < 2000


def test_classifier_size_and_ignore_patterns(small_state):
    with pytest.raises(ConfigError, match=r"wrong shape for 2 key\(s\): fc\.bias .*fc\.weight"):
        _convert(small_state, num_classes=1000)
    # A new classifier on purpose: fresh fc, everything else from the checkpoint.
    variables = _convert(small_state, num_classes=1000, ignore=["fc.*"])
    assert variables["params"]["fc"]["kernel"].shape == (512 // 4, 1000)
    np.testing.assert_array_equal(
        variables["params"]["conv1"]["kernel"],
        small_state["conv1.weight"].numpy().transpose(2, 3, 1, 0),
    )


def test_unknown_format_is_reported(small_state):
    with pytest.raises(ConfigError, match="unknown source format 'simclr2'"):
        convert.from_torch(small_state, "resnet18", "simclr2")


# ---------------------------------------------------------------- SwAV, SEED, DisCo, SimCLR


def _tiny_resnet() -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=0, width=0.25, stem="cifar")


def _encoder_outputs(variables, head: str, embed: int, hidden: int, x):
    encoder = models.Encoder(
        backbone=models.create("resnet18", num_classes=0, width=0.25, stem="cifar"),
        head=models.create_head(head, out_dim=embed, hidden_dim=hidden),
    )
    out = _jit(functools.partial(encoder.apply, train=False))(variables, _nhwc(x))
    return np.asarray(out["features"]), np.asarray(out["embedding"])


def test_swav_checkpoint_gives_mlp_bn_teacher(tmp_path):
    """SwAV: 'module.*' backbone, projection_head Linear-BN1d-ReLU-Linear, prototypes dropped."""
    enc = _tiny_resnet()
    enc.projection_head = nn.Sequential(
        nn.Linear(enc.feature_dim, 40), nn.BatchNorm1d(40), nn.ReLU(), nn.Linear(40, 16)
    )
    enc.prototypes = nn.Linear(16, 30, bias=False)
    randomize(enc, seed=7)
    path = str(tmp_path / "swav_800ep_pretrain.pth.tar")
    torch.save({f"module.{k}": v for k, v in enc.state_dict().items()}, path)
    x = _image((2, 3, 16, 16), seed=8)
    with torch.no_grad():
        t_feats = enc.pooled(x)
        t_embed = enc.projection_head(t_feats).numpy()  # eval mode: BN1d running statistics

    kwargs = {"width": 0.25, "stem": "cifar"}
    result = convert.convert(convert.load_torch_file(path), "resnet18", "swav", **kwargs)
    assert (result.head, result.head_hidden, result.embed_dim) == ("mlp_bn", 40, 16)
    assert set(result.variables["batch_stats"]) == {"backbone", "head"}
    feats, embed = _encoder_outputs(result.variables, "mlp_bn", 16, 40, x)
    np.testing.assert_allclose(feats, t_feats.numpy(), **TOL)
    np.testing.assert_allclose(embed, t_embed, **TOL)

    # Export under SwAV's names and re-import: exact; prototypes are the only keys not back.
    exported = convert.to_torch(
        result.variables, "resnet18", prefix="module.", head_module="projection_head", **kwargs
    )
    original = {f"module.{k}" for k in enc.state_dict()}
    assert original - set(exported) == {"module.prototypes.weight"}
    _assert_trees_equal(
        convert.from_torch(exported, "resnet18", "swav", **kwargs), result.variables
    )

    out_dir = str(tmp_path / "teacher")
    argv = ["swav", "resnet18", path, out_dir, "--model-kwarg", "width=0.25"]
    assert convert_main([*argv, "--model-kwarg", "stem=cifar"]) == 0
    loaded, manifest = checkpoint.load_encoder(out_dir)
    assert (manifest["head"], manifest["head_hidden"], manifest["embed_dim"]) == ("mlp_bn", 40, 16)
    assert manifest["source_format"] == "swav"
    # The teacher the trainer builds from the manifest gives SwAV's head output.
    teacher = models.build_encoder(manifest)
    out = _jit(functools.partial(teacher.apply, train=False))(loaded, _nhwc(x))
    np.testing.assert_allclose(np.asarray(out["embedding"]), t_embed, **TOL)

    # A missing head BN statistic is reported under SwAV's own name.
    state = {f"module.{k}": v for k, v in enc.state_dict().items()}
    del state["module.projection_head.1.running_var"]
    with pytest.raises(ConfigError, match=r"missing 1 key\(s\): module\.projection_head\.1\.run"):
        convert.from_torch(state, "resnet18", "swav", **kwargs)


def _student_checkpoint(fmt: str, hidden: int, seed: int) -> tuple[ResNet, dict]:
    """A SEED or DisCo training checkpoint whose student is a tiny ResNet-18 with an MLP fc."""
    enc = _tiny_resnet()
    d = enc.feature_dim
    enc.fc = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 16))
    randomize(enc, seed)
    other = {k: torch.randn_like(v.float()) for k, v in enc.state_dict().items()}
    if fmt == "seed":  # seed/builder.py: student, teacher, queue (DDP 'module.')
        state = {f"module.student.{k}": v for k, v in enc.state_dict().items()}
        state |= {f"module.teacher.{k}": v for k, v in other.items()}
    else:  # DisCo builder: encoder_q (student), encoder_k, teacher_encoder_q/_k, queue
        state = {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}
        for sub in ("encoder_k", "teacher_encoder_q", "teacher_encoder_k"):
            state |= {f"module.{sub}.{k}": v for k, v in other.items()}
    state |= {"module.queue": torch.randn(16, 64), "module.queue_ptr": torch.zeros(1)}
    return enc, {"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {}}


@pytest.mark.parametrize(("fmt", "hidden"), [("seed", 32), ("disco", 48)])
def test_seed_and_disco_student_checkpoints(tmp_path, fmt, hidden):
    # SEED's student head is d -> d -> 128 (d = 32 here); DisCo's is d -> 2048 -> 128 (48 here).
    enc, ckpt = _student_checkpoint(fmt, hidden, seed=9)
    path = str(tmp_path / f"{fmt}.pth.tar")
    torch.save(ckpt, path)
    x = _image((2, 3, 16, 16), seed=10)
    with torch.no_grad():
        t_feats = enc.pooled(x)
        t_embed = enc.fc(t_feats).numpy()
    kwargs = {"width": 0.25, "stem": "cifar"}
    result = convert.convert(convert.load_torch_file(path), "resnet18", fmt, **kwargs)
    assert (result.head, result.head_hidden, result.embed_dim) == ("mlp", hidden, 16)
    feats, embed = _encoder_outputs(result.variables, "mlp", 16, hidden, x)
    np.testing.assert_allclose(feats, t_feats.numpy(), **TOL)
    np.testing.assert_allclose(embed, t_embed, **TOL)
    # The teacher / key encoder weights were dropped, not mixed in.
    prefix = "module.student." if fmt == "seed" else "module.encoder_q."
    np.testing.assert_array_equal(
        result.variables["params"]["backbone"]["conv1"]["kernel"],
        ckpt["state_dict"][f"{prefix}conv1.weight"].numpy().transpose(2, 3, 1, 0),
    )
    # A student key under another prefix is unexpected, and named.
    state = dict(ckpt["state_dict"])
    state["module.student_x.conv1.weight"] = state[f"{prefix}conv1.weight"]
    with pytest.raises(ConfigError, match=r"unexpected 1 key\(s\): module\.student_x\.conv1"):
        convert.from_torch(state, "resnet18", fmt, **kwargs)


def test_simclr_converted_checkpoints(tmp_path, small_state):
    # tonylins/simclr-converter: {'state_dict': torchvision names}; SEED's re-hosted copy:
    # {'model': 'module.module.module.' + torchvision names}.
    direct = _convert(small_state)
    for wrapped in (
        {"state_dict": small_state},
        {"model": {f"module.module.module.{k}": v for k, v in small_state.items()}},
    ):
        path = str(tmp_path / "simclr.pth")
        torch.save(wrapped, path)
        variables = convert.from_torch(
            convert.load_torch_file(path), "resnet18", "simclr", width=0.25
        )
        _assert_trees_equal(variables, direct)
    manifest = convert.convert_file(
        "simclr", "resnet18", path, str(tmp_path / "enc"), ignore=["fc.*"], width=0.25
    )
    assert (manifest["head"], manifest["source_format"]) == ("identity", "simclr")


# ---------------------------------------------------------------- detectron2 export


def _moco_detectron2_script(state: dict) -> dict:
    """MoCo's detection/convert-pretrain-to-detectron2.py loop, verbatim in its logic."""
    out = {}
    for k, v in state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue  # disco_jax leaves these out on purpose
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace("layer{}".format(t), "res{}".format(t + 1))  # noqa: UP032
        for t in [1, 2, 3]:
            k = k.replace("bn{}".format(t), "conv{}.norm".format(t))  # noqa: UP032
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        out[k] = v.numpy()
    return out


@pytest.mark.parametrize("name", list(RESNETS))
def test_detectron2_export_renames_like_moco(tmp_path, name):
    block, layers, kwargs, nc, _ = RESNETS[name]
    tmodel = randomize(ResNet(block, layers, nc, **kwargs), seed=11)
    variables = convert.from_torch(tmodel.state_dict(), name, **kwargs)
    obj = convert.to_detectron2(variables, name, **kwargs)
    assert obj["__author__"] == "disco_jax" and obj["matching_heuristics"] is True
    want = _moco_detectron2_script(tmodel.state_dict())
    assert set(obj["model"]) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(obj["model"][k], v, err_msg=k)
    names = set(obj["model"])
    assert {"stem.conv1.weight", "stem.conv1.norm.running_var", "res3.0.shortcut.weight"} <= names
    assert "res3.0.shortcut.norm.bias" in names
    if block is Bottleneck:
        assert "res5.2.conv3.norm.weight" in names and "res2.0.shortcut.weight" in names
    else:
        assert "res5.1.conv2.norm.weight" in names and "res2.0.shortcut.weight" not in names


def test_export_cli_torchvision_and_detectron2(tmp_path, capsys):
    import pickle

    tmodel = randomize(ResNet(BasicBlock, (2, 2, 2, 2), 10, width=0.25), seed=12)
    path = str(tmp_path / "sup.pth")
    torch.save(tmodel.state_dict(), path)
    enc_dir = str(tmp_path / "enc")
    argv = ["torchvision", "resnet18", path, enc_dir, "--model-kwarg", "width=0.25"]
    assert convert_main(argv) == 0
    pkl = str(tmp_path / "d2.pkl")
    assert convert_main(["export", enc_dir, pkl, "--to", "detectron2"]) == 0
    with open(pkl, "rb") as f:
        obj = pickle.load(f)
    want = _moco_detectron2_script(tmodel.state_dict())
    assert set(obj["model"]) == set(want)
    key = "res4.1.conv2.norm.running_mean"
    np.testing.assert_array_equal(obj["model"][key], want[key])
    pth = str(tmp_path / "backbone.pth")
    assert convert_main(["export", enc_dir, pth]) == 0
    loaded = torch.load(pth, weights_only=True)
    tmodel.fc = None  # the encoder has no classifier
    assert set(loaded) == set(tmodel.state_dict())
    tmodel.load_state_dict(loaded, strict=True)
    # Not a ResNet: one clear line.
    with pytest.raises(ConfigError, match="detectron2 export needs a torchvision-layout ResNet"):
        convert.to_detectron2({}, "mobilenet_v3_large")


# ---------------------------------------------------------------- unsafe / broken files


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pth")
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(str(marker))}, path)
    with pytest.raises(ConfigError, match="NOT executed"):
        convert.load_torch_file(path)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="NOT executed"):
        convert.convert_file("torchvision", "resnet18", path, str(tmp_path / "out"))
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        convert.load_torch_file(str(tmp_path / "nope.pth"))
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.zeros(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="truncated"):
        convert.load_torch_file(str(path))
