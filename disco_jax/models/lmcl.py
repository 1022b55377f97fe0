"""L-MCL's networks (winycg/L-MCL, TPAMI-23; methods.md §4.4): peers with auxiliary branches.

Each peer (`LMCLNet`) is a plain encoder (``backbone`` + ``head``, the names of a plain
`Encoder`, so ``net_i/{backbone,head}`` exports as one) plus the training-time "feature
refinement" modules of the official ``ResNet_Auxiliary``:

- ``aux``: one auxiliary branch on the feature map after each stage but the last. Branch k (on
  stage k's output) is a fresh copy of stages k+1 ... S (each stage's first block strided, then
  pooled) with its own classifier ``fc{k}``. CIFAR ResNets copy whole stages (the official
  ``Auxiliary_Classifier`` of ``lmcl_resnet_cifar.py``: n blocks per stage); torchvision ResNets
  one block per stage (``lmcl_resnet_imagenet.py``: ``layers = [1, 1, 1, 1]``). Module names
  follow the torch paths: ``block_extractor{k}_{s}_{j}`` is ``block_extractor{k}.{s}.{j}``.
- ``aux_heads_{k}``: the projection head of stage k (official ``Sup_MCL_Loss_Meta.embed_list``;
  ``head`` is the last stage's).

So every peer has S stages of features, logits and embeddings (S = 3 on CIFAR ResNets, 4 on
torchvision ResNets), stage S being the network itself. `LMCLCohort` runs M peers and the
``aggregator`` (official ``Aggregator``: per network Linear(S d, d) -> ReLU -> Linear(d, S), a
softmax over the stages weighting the stage logits). `LossWeightNet` (official
``LossWeightNetwork``) is trained by the meta step outside the student's parameters: one
Linear(d, 128) per (network, stage), and the weight of a stage pair is
sigmoid(cos(P_ik f_ik, P_jz f_jz)) per example.

Differences on purpose: linear biases start at zero (torch draws them uniformly), as elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from disco_jax.errors import ConfigError
from disco_jax.losses import lmcl_pairs
from disco_jax.models import build_encoder, cifar, resnet
from disco_jax.models.resnet import LINEAR_INIT

Dtype = Any
WEIGHT_DIM = 128  # LossWeightNetwork's projection width (fixed in the official code)


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=LINEAR_INIT, dtype=dtype, param_dtype=jnp.float32,
                    name=name)


def aux_plan(backbone: nn.Module) -> tuple[type, tuple[int, ...], tuple[int, ...]]:
    """(block, planes per stage, blocks per stage in the auxiliary copies) of a backbone."""
    if isinstance(backbone, cifar.CifarResNet):
        base = max(1, round(16 * backbone.width))
        blocks = tuple(backbone.stage_sizes)
    elif isinstance(backbone, resnet.ResNet):
        base = max(1, round(64 * backbone.width * backbone.widen))
        blocks = (1,) * len(backbone.stage_sizes)
    else:
        raise ConfigError(f"L-MCL's auxiliary branches need a CIFAR ResNet (resnet8/32/56/110) or a"
                          f" torchvision ResNet student, got a {type(backbone).__name__}")
    planes = tuple(base * 2**i for i in range(len(blocks)))
    return backbone.block, planes, blocks


class AuxiliaryBranches(nn.Module):
    """One branch per stage but the last: the remaining stages, copied, pooled and classified."""

    block: type
    planes: Sequence[int]
    blocks: Sequence[int]
    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, maps: Sequence[jnp.ndarray], train: bool = False
                 ) -> tuple[list[jnp.ndarray], list[jnp.ndarray]]:
        feats, logits = [], []
        for k, h in enumerate(maps):
            for s, stage in enumerate(range(k + 1, len(self.planes))):
                for j in range(self.blocks[stage]):
                    block = self.block(self.planes[stage], 2 if j == 0 else 1, self.dtype,
                                       name=f"block_extractor{k + 1}_{s}_{j}")
                    h = block(h, train)
            f = jnp.mean(h, axis=(1, 2))
            feats.append(f)
            logits.append(_dense(self.num_classes, self.dtype, f"fc{k + 1}")(f))
        return feats, logits


class LMCLNet(nn.Module):
    """One peer: a plain encoder (``backbone``, ``head``) + auxiliary branches and heads."""

    backbone: nn.Module
    head: nn.Module
    aux: AuxiliaryBranches
    aux_heads: Sequence[nn.Module]

    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        out = self.backbone(x, train=train, stages=True)
        feats, logits = self.aux(out["stages"], train=train)
        feats, logits = [*feats, out["features"]], [*logits, out["logits"]]
        embs = [h(f, train=train) for h, f in zip(self.aux_heads, feats[:-1], strict=True)]
        embs.append(self.head(feats[-1], train=train))
        return {"features": out["features"], "logits": out["logits"], "embedding": embs[-1],
                "stage_features": jnp.stack(feats), "stage_logits": jnp.stack(logits),
                "stage_embedding": jnp.stack(embs)}


class Aggregator(nn.Module):
    """Per network: softmax(MLP(concat of the stage features)) weights its stage logits."""

    num_nets: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, stage_features: jnp.ndarray, stage_logits: jnp.ndarray) -> jnp.ndarray:
        """(M, S, N, d), (M, S, N, C) -> (M, N, C) aggregated logits."""
        m, s, n, d = stage_features.shape
        out = []
        for i in range(self.num_nets):
            f = jnp.moveaxis(stage_features[i], 0, 1).reshape(n, s * d)  # torch.cat(dim=1)
            h = nn.relu(_dense(d, self.dtype, f"proj_head_{i}_0")(f))
            w = jax.nn.softmax(_dense(s, self.dtype, f"proj_head_{i}_2")(h).astype(jnp.float32))
            out.append(jnp.einsum("ns,snc->nc", w, stage_logits[i].astype(jnp.float32)))
        return jnp.stack(out)


class LMCLCohort(nn.Module):
    """M peers and the aggregator. Outputs: ``features`` (network 0's pooled features, (N, d)),
    ``logits`` / ``embedding`` (M, N, ...) of the last stage, ``stage_features`` /
    ``stage_logits`` / ``stage_embedding`` (M, S, N, ...) and ``agg_logits`` (M, N, C)."""

    # The batch axis of each output (methods.common.train_forward cuts batches into BN groups).
    OUTPUT_BATCH_AXIS: ClassVar[dict[str, int]] = {
        "features": 0, "stage_features": 2, "stage_logits": 2, "stage_embedding": 2, "*": 1}
    net: Sequence[LMCLNet]
    aggregator: Aggregator

    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        outs = [peer(x, train=train) for peer in self.net]
        res = {k: jnp.stack([o[k] for o in outs]) for k in outs[0] if k != "features"}
        res["features"] = outs[0]["features"]
        res["agg_logits"] = self.aggregator(res["stage_features"], res["stage_logits"])
        return res


class LossWeightNet(nn.Module):
    """Per-example weights of every stage pair, (P, N) in `losses.lmcl_pairs` order."""

    num_nets: int
    num_stages: int

    @nn.compact
    def __call__(self, stage_features: jnp.ndarray) -> jnp.ndarray:
        f = stage_features.astype(jnp.float32)
        proj = [[_dense(WEIGHT_DIM, jnp.float32, f"proj_{i}_{k}")(f[i, k])
                 for k in range(self.num_stages)] for i in range(self.num_nets)]
        unit = [[p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12) for p in row]
                for row in proj]  # F.normalize
        return jnp.stack([jax.nn.sigmoid(jnp.sum(unit[i][k] * unit[j][z], axis=-1))
                          for i, k, j, z in lmcl_pairs(self.num_nets, self.num_stages)])


def build_lmcl_cohort(net: Any, num: int, dtype: Any = jnp.float32) -> LMCLCohort:
    """`num` peers from the encoder config `net` (a classifying CIFAR or torchvision ResNet)."""
    peers = []
    for _ in range(num):
        enc = build_encoder(net, dtype)
        block, planes, blocks = aux_plan(enc.backbone)
        n_aux = len(planes) - 1
        aux = AuxiliaryBranches(block, planes, blocks, enc.backbone.num_classes, dtype)
        heads = tuple(build_encoder(net, dtype).head for _ in range(n_aux))
        peers.append(LMCLNet(backbone=enc.backbone, head=enc.head, aux=aux, aux_heads=heads))
    return LMCLCohort(net=tuple(peers), aggregator=Aggregator(num, dtype))


def num_stages(net: Any) -> int:
    """S: the stages with a classifier and a head (auxiliary branches + the network)."""
    return len(aux_plan(build_encoder(net).backbone)[1])


def plain_variables(variables: dict, i: int = 0) -> dict:
    """Network i as a plain `Encoder`'s variables (backbone and head; no auxiliary modules)."""
    return {col: {k: v for k, v in variables[col][f"net_{i}"].items()
                  if k in ("backbone", "head")} for col in ("params", "batch_stats")}
