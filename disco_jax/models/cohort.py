"""A cohort of M peer encoders trained together (MCL): params {"net_0": ..., "net_{M-1}": ...}.

Every network is a full `Encoder` (backbone + its own head, and the classifier when the config
has `num_classes > 0`) built from the same encoder config, and all see the same input. The
outputs are stacked along a leading network axis so the losses can take (M, N, D) arrays:
`embedding` (M, N, D), `logits` (M, N, C) when classifying, `all_features` (M, N, d), and
`features` = network 0's pooled features (what kNN / linear evaluation and the export use).
Network i's variables are exactly those of a plain `Encoder`, so `net_i` exports as one.

`SharedStemCohort` is MCL's multi-branch network for M >= 3 (``ResNet_b``, methods.md §4.1): one
``stem`` (CIFAR ResNets: conv1 + layer1; torchvision ResNets: conv1 ... layer2) run once, then M
branches ``net_i`` (the remaining stages, classifier and head). Its params are
{"stem": {conv1, bn1, layer1_*, ...}, "net_i": {"backbone": {later stages, classifier},
"head": ...}}; `plain_variables` merges the stem back into network i's backbone, which gives a
plain `Encoder`'s variables (the names are the plain backbone's), so exports stay unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from disco_jax.errors import ConfigError
from disco_jax.models import Encoder, build_encoder


def _stack(outs: list[dict]) -> dict[str, jnp.ndarray]:
    stacked = {k: jnp.stack([o[k] for o in outs]) for k in outs[0]}
    return {**{k: v for k, v in stacked.items() if k != "features"},
            "all_features": stacked["features"], "features": outs[0]["features"]}


# The batch axis of each output (methods.common.train_forward cuts batches into BN groups):
# network 0's `features` are batch-major, the stacked outputs are (M, N, ...).
COHORT_BATCH_AXIS = {"features": 0, "*": 1}


class Cohort(nn.Module):
    OUTPUT_BATCH_AXIS: ClassVar[dict[str, int]] = COHORT_BATCH_AXIS
    net: Sequence[nn.Module]  # the peers; a tuple field, so Flax names them net_0, net_1, ...

    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        return _stack([enc(x, train=train) for enc in self.net])


class Branch(nn.Module):
    """An `Encoder` after the shared stem: same fields and param names, the backbone's "branch"."""

    backbone: nn.Module
    head: nn.Module
    classify: bool = False

    def __call__(self, h: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        out = self.backbone(h, train=train, features="both" if self.classify else True,
                            part="branch")
        feats = out["features"] if self.classify else out
        extra = {"logits": out["logits"]} if self.classify else {}
        return {"features": feats, **extra, "embedding": self.head(feats, train=train)}


class SharedStemCohort(nn.Module):
    OUTPUT_BATCH_AXIS: ClassVar[dict[str, int]] = COHORT_BATCH_AXIS
    stem: nn.Module  # a backbone, called with part="stem"
    net: Sequence[Branch]

    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        h = self.stem(x, train=train, part="stem")  # once: shared activations and BN statistics
        return _stack([branch(h, train=train) for branch in self.net])


def shared_stem_stages(net: Any) -> int:
    """How many stages the encoder config's backbone shares; 0 if it cannot share a stem."""
    backbone = build_encoder(net).backbone
    return int(getattr(type(backbone), "SHARED_STEM_STAGES", 0))


def build_cohort(net: Any, num: int, dtype: Any = jnp.float32,
                 shared_stem: bool = False) -> Cohort | SharedStemCohort:
    """`num` copies of the encoder config `net` (built outside any module scope): independent,
    or `shared_stem` branches on one stem (ResNet families only)."""
    if not shared_stem:
        return Cohort(net=tuple(build_encoder(net, dtype) for _ in range(num)))
    if not shared_stem_stages(net):
        raise ConfigError(f"a shared stem needs a CIFAR or torchvision ResNet backbone, got"
                          f" {net['model']!r}; set loss.shared_stem=False")
    encoders = [build_encoder(net, dtype) for _ in range(num + 1)]
    return SharedStemCohort(
        stem=encoders[-1].backbone,
        net=tuple(Branch(e.backbone, e.head, e.classify) for e in encoders[:num]),
    )


def plain_encoder(cohort: Cohort | SharedStemCohort, i: int = 0) -> Encoder:
    """Network i of the cohort as an unbound plain `Encoder` (for evaluation and export)."""
    enc = cohort.net[i]
    if isinstance(enc, Encoder):
        return enc.clone(parent=None)
    return Encoder(backbone=enc.backbone.clone(parent=None, name=None),
                   head=enc.head.clone(parent=None, name=None), classify=enc.classify)


def plain_variables(variables: dict, i: int = 0) -> dict:
    """Network i's variables in a plain `Encoder`'s layout (the shared stem merged back in)."""
    out = {}
    for col in ("params", "batch_stats"):
        tree = variables[col]
        net = tree[f"net_{i}"]
        if "stem" in tree:
            net = {**net, "backbone": {**tree["stem"], **net["backbone"]}}
        out[col] = net
    return out
