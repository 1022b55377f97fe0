"""Projection heads and the backbone + head `Encoder`.

Heads map pooled backbone features (N, d) to an embedding (N, out_dim); they have no BatchNorm
and no train/eval difference, so they are applied as ``head.apply({"params": p}, feats)``.

- ``mlp``: Dense(hidden) -> ReLU -> Dense(out_dim), named ``fc_0`` / ``fc_2`` like torch's
  ``fc.0`` / ``fc.2`` in MoCo-v2. ``hidden_dim=None`` uses the input width d (SEED's student
  head d -> d -> 128); MoCo-v2's head is ``mlp`` with ``hidden_dim=2048``.
- ``linear``: Dense(out_dim) named ``fc``.
- ``identity``: no parameters, returns its input.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

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
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        hidden = x.shape[-1] if self.hidden_dim is None else self.hidden_dim
        x = nn.relu(_dense(hidden, self.dtype, "fc_0")(x))
        return _dense(self.out_dim, self.dtype, "fc_2")(x)


class LinearHead(nn.Module):
    """A single linear projection."""

    out_dim: int = 128
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return _dense(self.out_dim, self.dtype, "fc")(x)


class IdentityHead(nn.Module):
    """No projection: the embedding is the backbone feature itself."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return x


class Encoder(nn.Module):
    """Backbone followed by a head; params are ``{"backbone": ..., "head": ...}``.

    Returns the pooled backbone features and the (un-normalised) head embedding; the
    backbone's classifier, if any, is never called, so it gets no parameters.
    """

    backbone: nn.Module
    head: nn.Module

    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        feats = self.backbone(x, train=train, features=True)
        return {"features": feats, "embedding": self.head(feats)}
