"""Feature extraction over an evaluation split: every example exactly once."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import tensorflow as tf

from disco_jax import data, sharding


def extract(
    feature_fn: Callable[[jax.Array], jax.Array], ds: tf.data.Dataset, mesh: jax.sharding.Mesh
) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of the masked-in examples of a padded eval dataset, on every host."""
    feats, labels = [], []
    for batch in data.global_iterator(ds, mesh):
        mask = sharding.to_host(batch["mask"]).astype(bool)
        feats.append(sharding.to_host(feature_fn(batch["image"]))[mask])
        labels.append(sharding.to_host(batch["label"])[mask])
    return np.concatenate(feats), np.concatenate(labels)
