"""Projection heads and the backbone + head `Encoder`.

Heads map pooled backbone features (N, d) to an embedding (N, out_dim) and are called as
``head(feats, train=...)``; only ``mlp_bn`` and ``mlp_bn_out`` have BatchNorm (so
``batch_stats``) and differ between train and eval.

- ``mlp``: Dense(hidden) -> ReLU -> Dense(out_dim), named ``fc_0`` / ``fc_2`` like torch's
  ``fc.0`` / ``fc.2`` in MoCo-v2. ``hidden_dim=None`` uses the input width d (SEED's student
  head d -> d -> 128); MoCo-v2's head is ``mlp`` with ``hidden_dim=2048``.
- ``mlp_bn``: Dense(hidden) -> BatchNorm1d -> ReLU -> Dense(out_dim), named ``fc_0`` /
  ``fc_1`` / ``fc_3`` like torch's ``projection_head.0/1/3`` in SwAV (and BYOL's projector).
  The first Dense keeps its bias, as SwAV's ``nn.Linear`` does.
- ``mlp_bn_out``: ``mlp_bn`` whose output Dense (no bias) is followed by a BatchNorm without
  centre, ``fc_4``: SimCLR's projection head (BN on every layer, the last without bias/ReLU).
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
    """Two-layer MLP with BatchNorm1d after the hidden layer (SwAV / BYOL projector).

    ``out_bn=True`` is SimCLR's projection head (google-research/simclr ``ProjectionHead``,
    ``LinearLayer(use_bias=False, use_bn=True)`` for the last layer): the output Dense has no
    bias and is followed by a BatchNorm with a scale and no centre (``center=use_bias=False``).
    """

    out_dim: int = 128
    hidden_dim: int | None = None
    dtype: Dtype = jnp.float32
    out_bn: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        hidden = x.shape[-1] if self.hidden_dim is None else self.hidden_dim
        x = _dense(hidden, self.dtype, "fc_0")(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, "fc_1")(x))
        if not self.out_bn:
            return _dense(self.out_dim, self.dtype, "fc_3")(x)
        x = nn.Dense(self.out_dim, use_bias=False, kernel_init=LINEAR_INIT, dtype=self.dtype,
                     param_dtype=jnp.float32, name="fc_3")(x)
        # Flax's BN: it has the centre-less form (use_bias=False), and its running variance is
        # the biased batch variance, what SimCLR's Keras (Sync)BatchNormalization keeps too.
        # Momentum 0.9 (SimCLR's batch_norm_decay) and eps 1e-5 (its BATCH_NORM_EPSILON).
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            use_bias=False, use_scale=True, use_fast_variance=False,
                            dtype=self.dtype, param_dtype=jnp.float32, name="fc_4")(x)


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

    ``head_dropout`` > 0: in train mode the head sees the features after a Dropout of that rate
    (a ``dropout`` rng is then needed), in eval mode the features themselves. That is a head
    which replaces the classifier *after* the backbone's classifier dropout, as SEED's student
    MLP does (``build_encoder`` with ``head_input="dropped"``). ``features`` stays the
    pre-dropout feature either way.
    """

    backbone: nn.Module
    head: nn.Module
    classify: bool = False
    head_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        if self.classify:
            out = self.backbone(x, train=train, features="both")
            return {**out, "embedding": self.head(self._head_input(out["features"], train),
                                                  train=train)}
        feats = self.backbone(x, train=train, features=True)
        return {"features": feats, "embedding": self.head(self._head_input(feats, train),
                                                          train=train)}

    def _head_input(self, feats: jnp.ndarray, train: bool) -> jnp.ndarray:
        if self.head_dropout <= 0:
            return feats
        return nn.Dropout(self.head_dropout, deterministic=not train, name="head_dropout")(feats)
