"""A cohort of M peer encoders trained together (MCL): params {"net_0": ..., "net_{M-1}": ...}.

Every network is a full `Encoder` (backbone + its own head, and the classifier when the config
has `num_classes > 0`) built from the same encoder config, and all see the same input. The
outputs are stacked along a leading network axis so the losses can take (M, N, D) arrays:
`embedding` (M, N, D), `logits` (M, N, C) when classifying, `all_features` (M, N, d), and
`features` = network 0's pooled features (what kNN / linear evaluation and the export use).
Network i's variables are exactly those of a plain `Encoder`, so `net_i` exports as one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from disco_jax.models import build_encoder


class Cohort(nn.Module):
    net: Sequence[nn.Module]  # the peers; a tuple field, so Flax names them net_0, net_1, ...

    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        outs = [enc(x, train=train) for enc in self.net]
        stacked = {k: jnp.stack([o[k] for o in outs]) for k in outs[0]}
        return {**{k: v for k, v in stacked.items() if k != "features"},
                "all_features": stacked["features"], "features": outs[0]["features"]}


def build_cohort(net: Any, num: int, dtype: Any = jnp.float32) -> Cohort:
    """`num` independent copies of the encoder config `net` (built outside any module scope)."""
    return Cohort(net=tuple(build_encoder(net, dtype) for _ in range(num)))
