"""Projection heads and the backbone + head `Encoder`.

Heads map pooled backbone features (N, d) to an embedding (N, out_dim) and are called as
``head(feats, train=...)``; only ``mlp_bn`` has BatchNorm (so ``batch_stats``) and differs
between train and eval.

- ``mlp``: Dense(hidden) -> ReLU -> Dense(out_dim), named ``fc_0`` / ``fc_2`` like torch's
  ``fc.0`` / ``fc.2`` in MoCo-v2. ``hidden_dim=None`` uses the input width d (SEED's student
  head d -> d -> 128); MoCo-v2's head is ``mlp`` with ``hidden_dim=2048``.
- ``mlp_bn``: Dense(hidden) -> BatchNorm1d -> ReLU -> Dense(out_dim), named ``fc_0`` /
  ``fc_1`` / ``fc_3`` like torch's ``projection_head.0/1/3`` in SwAV (and BYOL's projector).
  The first Dense keeps its bias, as SwAV's ``nn.Linear`` does.
- ``mcl_embed``: MCL's ``Embed``: Dense(hidden=out_dim) -> ReLU -> Dense(out_dim), then L2
  normalisation, named ``proj_head_0`` / ``proj_head_2`` like torch's ``proj_head.0/2``.
- ``linear``: Dense(out_dim) named ``fc``.
- ``identity``: no parameters, returns its input.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from disco_jax.models import layers
from disco_jax.models.resnet import LINEAR_INIT

Dtype = Any


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features, kernel_init=LINEAR_INIT, dtype=dtype, param_dtype=jnp.float32, name=name
    )


class MLPHead(nn.Module):
    """Two-layer MLP without BatchNorm."""

    out_dim: int = 128
    hidden_dim: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        hidden = x.shape[-1] if self.hidden_dim is None else self.hidden_dim
        x = nn.relu(_dense(hidden, self.dtype, "fc_0")(x))
        return _dense(self.out_dim, self.dtype, "fc_2")(x)


class MLPBNHead(nn.Module):
    """Two-layer MLP with BatchNorm1d after the hidden layer (SwAV / BYOL projector)."""

    out_dim: int = 128
    hidden_dim: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        hidden = x.shape[-1] if self.hidden_dim is None else self.hidden_dim
        x = _dense(hidden, self.dtype, "fc_0")(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, "fc_1")(x))
        return _dense(self.out_dim, self.dtype, "fc_3")(x)


class MCLEmbed(nn.Module):
    """MCL's Embed: Linear(d, D) -> ReLU -> Linear(D, D) -> L2 normalisation (D = out_dim)."""

    out_dim: int = 128
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = nn.relu(_dense(self.out_dim, self.dtype, "proj_head_0")(x))
        x = _dense(self.out_dim, self.dtype, "proj_head_2")(x).astype(jnp.float32)
        # F.normalize(x, dim=1): x / max(||x||, 1e-12).
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class LinearHead(nn.Module):
    """A single linear projection."""

    out_dim: int = 128
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        return _dense(self.out_dim, self.dtype, "fc")(x)


class IdentityHead(nn.Module):
    """No projection: the embedding is the backbone feature itself."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        return x


class Encoder(nn.Module):
    """Backbone followed by a head; params are ``{"backbone": ..., "head": ...}``.

    Returns the pooled backbone features and the (un-normalised) head embedding. With
    ``classify=True`` (a backbone built with ``num_classes > 0``) it also returns the class
    ``logits`` from the same pass (SSLD, KD); otherwise the backbone's classifier is never
    called, so it gets no parameters.
    """

    backbone: nn.Module
    head: nn.Module
    classify: bool = False

    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        if self.classify:
            out = self.backbone(x, train=train, features="both")
            return {**out, "embedding": self.head(out["features"], train=train)}
        feats = self.backbone(x, train=train, features=True)
        return {"features": feats, "embedding": self.head(feats, train=train)}
