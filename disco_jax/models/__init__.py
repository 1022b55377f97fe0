"""Model zoo: backbones and projection heads by name.

``create(name, num_classes, **kwargs)`` builds a Flax Linen backbone called as
``model.apply({"params": p, "batch_stats": bs}, x, train=False, features=False)`` on NHWC
float images; it returns logits (N, num_classes), or the pooled pre-logit features (N, d) when
``features=True`` or ``num_classes=0``. Options: ``width`` (channel multiplier), ``dtype``
(compute dtype; params stay float32), ResNet ``stem`` ('imagenet' or 'cifar'), MobileNetV3
``dropout``, EfficientNet ``dropout`` / ``stochastic_depth_prob``, ``seed_efficientnet_*``
``image_size`` (the size its TF 'SAME' padding is fixed for). Module names mirror the
source implementation's state_dict paths ('.' -> '_'): torchvision's for ResNets,
wide_resnet50_2, MobileNetV3 and EfficientNet, SEED's for ``seed_mobilenetv3_*`` and
``seed_efficientnet_b0/b1`` (lukemelas' EfficientNet-PyTorch names), SwAV's
(torchvision-like) for ``swav_resnet50w*``, timm's for ``mobilenetv3_*_100`` and
``timm_efficientnet_b0/b1`` (timm's ``efficientnet_b0/b1``, prefixed so they do not clash with
torchvision's names), and winycg/MCL's for the CIFAR nets (``resnet8/32/56/110``, ``wrn_*``;
32x32 inputs; pass ``num_classes=100`` for CIFAR-100, the default stays 1000). See
each module's docstring.

``create_head(name, out_dim, hidden_dim, dtype)`` builds a projection head, and
``Encoder(backbone, head)`` combines the two; ``build_encoder(net, dtype)`` builds one from an
encoder config or manifest (``model``, ``model_kwargs``, ``head``, ``head_hidden``,
``embed_dim`` and optional ``num_classes`` and ``head_input``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from disco_jax.errors import ConfigError, unknown_name
from disco_jax.models import cifar, efficientnet, mobilenetv3, resnet
from disco_jax.models.heads import (
    Encoder,
    IdentityHead,
    LinearHead,
    MCLEmbed,
    MLPBNHead,
    MLPHead,
)

__all__ = [
    "Encoder",
    "build_encoder",
    "create",
    "create_head",
    "list_heads",
    "list_models",
    "model_class",
    "model_options",
]

_MODELS: dict[str, partial[nn.Module]] = {
    "resnet10": resnet.resnet10,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "mobilenet_v3_large": mobilenetv3.mobilenet_v3_large,
    "mobilenet_v3_small": mobilenetv3.mobilenet_v3_small,
    # SEED's own MobileNetV3 (not torchvision's: SE before the activation, Linear SE layers).
    "seed_mobilenetv3_large": mobilenetv3.seed_mobilenetv3_large,
    "seed_mobilenetv3_small": mobilenetv3.seed_mobilenetv3_small,
    "wide_resnet50_2": resnet.wide_resnet50_2,
    "swav_resnet50w2": resnet.swav_resnet50w2,
    "swav_resnet50w4": resnet.swav_resnet50w4,
    "swav_resnet50w5": resnet.swav_resnet50w5,
    "efficientnet_b0": efficientnet.efficientnet_b0,
    "efficientnet_b1": efficientnet.efficientnet_b1,
    "mobilenetv3_large_100": efficientnet.mobilenetv3_large_100,
    "mobilenetv3_small_100": efficientnet.mobilenetv3_small_100,
    # timm's efficientnet_b0/b1 names collide with torchvision's, hence the prefix.
    "timm_efficientnet_b0": efficientnet.timm_efficientnet_b0,
    "timm_efficientnet_b1": efficientnet.timm_efficientnet_b1,
    # SEED's EfficientNet (lukemelas' port: TF 'SAME' padding, BN eps 1e-3, classifier 'fc').
    "seed_efficientnet_b0": efficientnet.seed_efficientnet_b0,
    "seed_efficientnet_b1": efficientnet.seed_efficientnet_b1,
    # CIFAR networks of MCL (3x3 stem, 32x32 inputs).
    "resnet8": cifar.resnet8,
    "resnet32": cifar.resnet32,
    "resnet56": cifar.resnet56,
    "resnet110": cifar.resnet110,
    "wrn_16_2": cifar.wrn_16_2,
    "wrn_40_2": cifar.wrn_40_2,
    "wrn_28_4": cifar.wrn_28_4,
}


def _head_mlp(out_dim: int, hidden_dim: int | None, dtype: Any) -> nn.Module:
    return MLPHead(out_dim, hidden_dim, dtype)


def _head_mlp_bn(out_dim: int, hidden_dim: int | None, dtype: Any) -> nn.Module:
    return MLPBNHead(out_dim, hidden_dim, dtype)


def _head_mlp_bn_out(out_dim: int, hidden_dim: int | None, dtype: Any) -> nn.Module:
    return MLPBNHead(out_dim, hidden_dim, dtype, out_bn=True)


def _head_mcl_embed(out_dim: int, hidden_dim: int | None, dtype: Any) -> nn.Module:
    return MCLEmbed(out_dim, dtype)


def _head_linear(out_dim: int, hidden_dim: int | None, dtype: Any) -> nn.Module:
    return LinearHead(out_dim, dtype)


def _head_identity(out_dim: int, hidden_dim: int | None, dtype: Any) -> nn.Module:
    return IdentityHead()


_HEADS: dict[str, Callable[[int, int | None, Any], nn.Module]] = {
    "mlp": _head_mlp,
    "mlp_bn": _head_mlp_bn,
    "mlp_bn_out": _head_mlp_bn_out,
    "mcl_embed": _head_mcl_embed,
    "linear": _head_linear,
    "identity": _head_identity,
}


def list_models() -> list[str]:
    return list(_MODELS)


def list_heads() -> list[str]:
    return list(_HEADS)


def model_class(name: str) -> type[nn.Module]:
    """The Linen module class a registered model is built from (e.g. `resnet.ResNet`)."""
    if name not in _MODELS:
        raise unknown_name("model", name, list_models())
    return _MODELS[name].func


def model_options(name: str) -> list[str]:
    """The keyword options `create` accepts for a model, besides ``num_classes``."""
    ctor = _MODELS[name]
    fixed = {*ctor.keywords, "parent", "name", "num_classes"}
    return [f.name for f in dataclasses.fields(ctor.func) if f.init and f.name not in fixed]


def create(name: str, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """Build a backbone by registry name; see the module docstring for the call convention."""
    if name not in _MODELS:
        raise unknown_name("model", name, list_models())
    # Checked here so a config typo is a one-line ConfigError, not a dataclass TypeError.
    bad = sorted(set(kwargs) - set(model_options(name)))
    if bad:
        raise ConfigError(
            f"model {name!r} does not accept {', '.join(bad)}; "
            f"valid options: num_classes, {', '.join(model_options(name))}"
        )
    if kwargs.get("width", 1.0) <= 0:
        raise ConfigError(f"model width must be positive, got {kwargs['width']}")
    if num_classes < 0:
        raise ConfigError(f"num_classes must be >= 0, got {num_classes}")
    return _MODELS[name](num_classes=num_classes, **kwargs)


def create_head(
    name: str, out_dim: int = 128, hidden_dim: int | None = None, dtype: Any = jnp.float32
) -> nn.Module:
    """Build a projection head by registry name (see `disco_jax.models.heads`)."""
    if name not in _HEADS:
        raise unknown_name("head", name, list_heads())
    return _HEADS[name](out_dim, hidden_dim, dtype)


HEAD_INPUTS = ("features", "dropped")


def _head_dropout(net: Any, backbone: nn.Module, num_classes: int) -> float:
    """The Encoder's ``head_dropout`` for ``head_input``: 0 for "features" (the default, and
    what manifests without the key mean), the backbone's classifier dropout for "dropped" (0
    for a backbone whose classifier has none: a ResNet's ``fc`` sees the features as they are)."""
    head_input = net.get("head_input", "features")
    if head_input not in HEAD_INPUTS:
        raise ConfigError(f"head_input must be one of {', '.join(HEAD_INPUTS)}; got"
                          f" {head_input!r}")
    if head_input == "features":
        return 0.0
    if num_classes > 0:
        raise ConfigError("head_input='dropped' puts the head in place of the classifier;"
                          f" it needs num_classes=0, got {num_classes}")
    return float(getattr(backbone, "dropout", 0.0))


def build_encoder(net: Any, dtype: Any = jnp.float32) -> Encoder:
    """Backbone (pooled features, plus logits if ``num_classes`` > 0) + projection head.

    ``head_input`` (optional): "features" (default) feeds the head the pooled feature;
    "dropped" feeds it, in train mode, the feature after the backbone's classifier dropout
    (the head replaces the classifier after its Dropout, as in SEED's students; the same as
    "features" for backbones without one). Eval mode: the pooled feature either way.
    """
    num_classes = int(net.get("num_classes", 0) or 0)
    backbone = create(
        net["model"], num_classes=num_classes, dtype=dtype, **dict(net.get("model_kwargs", {}))
    )
    head = create_head(
        net["head"], out_dim=net["embed_dim"], hidden_dim=net["head_hidden"] or None, dtype=dtype
    )
    return Encoder(backbone=backbone, head=head, classify=num_classes > 0,
                   head_dropout=_head_dropout(net, backbone, num_classes))
