"""Conv and BatchNorm as the torch models build them, shared by every model family."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
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


def batch_norm(
    train: bool, dtype: Dtype, name: str, momentum: float = 0.9, eps: float = 1e-5
) -> nn.BatchNorm:
    """BN with torch's defaults (momentum 0.1 = Flax 0.9, eps 1e-5) unless told otherwise.

    No axis_name: under jit with a batch-sharded input the batch mean is already global.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=eps,
        # Two-pass variance: E[x^2] - E[x]^2 cancels badly in float32, which made results
        # depend on how the batch was split over devices.
        use_fast_variance=False,
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
