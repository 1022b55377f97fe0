"""Conv and BatchNorm as the torch models build them, shared by every model family."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu") for convolutions.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    features: int,
    kernel: int,
    name: str,
    dtype: Dtype,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
    kernel_init: nn.initializers.Initializer = CONV_INIT,
    padding: str | Sequence[tuple[int, int]] | None = None,
) -> nn.Conv:
    # Default: explicit symmetric (k - 1) // 2 padding as torch does; 'SAME' would pad a 7x7/2
    # stem (2, 3) and shift every feature map. Ports of TF models (lukemelas' EfficientNet)
    # pass 'SAME' or explicit (low, high) pairs instead.
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=(kernel - 1) // 2 if padding is None else padding,
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class BatchNorm(nn.Module):
    """torch's BatchNorm in train and eval mode, with Flax BatchNorm's variables.

    Same variables as ``nn.BatchNorm`` (``params``: ``scale``, ``bias``; ``batch_stats``:
    ``mean``, ``var``), so checkpoints and the torch converter are unaffected. The difference
    is the running variance: torch updates it with the *unbiased* batch variance
    (x n / (n - 1), n the number of reduced elements N*H*W), while Flax uses the biased one,
    which normalises the batch (as torch does too); the factor is largest on small maps and
    BatchNorm1d (8/7 at batch 8), and a two-step comparison with the official SEED code
    measured 1.1e-2 relative on the last stage's running variance. ``n`` is the static size of
    the reduced axes of this call's input, so under ``jax.vmap`` over BN groups it is the
    per-group count. torch refuses n = 1 in training; here the running variance then gets the
    (zero) biased variance.

    Statistics are float32 (or wider) and the variance is two-pass, E[(x - E[x])^2]:
    E[x^2] - E[x]^2 cancels badly in float32, which made results depend on how the batch was
    split over devices. No ``axis_name``: under jit with a batch-sharded input the mean is
    already global.
    """

    use_running_average: bool = False
    momentum: float = 0.9  # Flax convention: the weight of the old running statistic
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            stat_dtype = jnp.promote_types(
                jnp.result_type(x) if self.dtype is None else self.dtype, jnp.float32
            )
            xs = x.astype(stat_dtype)
            mean = xs.mean(axes)
            var = jnp.square(xs - mean).mean(axes)  # biased: what torch normalises with
            if not self.is_initializing():
                n = math.prod(x.shape[a] for a in axes)
                unbiased = var * (n / (n - 1)) if n > 1 else var
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * unbiased
        # Flax's normalisation arithmetic (and so its outputs), in the same order.
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        dtype = jnp.result_type(x, scale, bias) if self.dtype is None else self.dtype
        return jnp.asarray(y, dtype)


def batch_norm(
    train: bool, dtype: Dtype, name: str, momentum: float = 0.9, eps: float = 1e-5
) -> BatchNorm:
    """BN with torch's defaults (momentum 0.1 = Flax 0.9, eps 1e-5) unless told otherwise.

    Every model's BN is built here (`BatchNorm`: torch's unbiased running-variance update).
    """
    return BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def classifier_output(feats, features, num_classes: int, classify):
    """The end of every backbone: pooled features, logits, or both.

    ``features=True`` (or ``num_classes == 0``) returns the pooled features, ``False`` the
    logits ``classify(feats)``, and ``"both"`` a dict ``{"features", "logits"}`` from one pass.
    """
    if features is True or num_classes == 0:
        return feats
    logits = classify(feats)
    return {"features": feats, "logits": logits} if features == "both" else logits
