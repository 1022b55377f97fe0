"""Weighted kNN classifier on frozen features (Wu et al. 2018, InstDisc; the protocol SEED's
table reports as "K"): cosine similarity to every training feature, the k nearest vote with
weight exp(sim / T), T = 0.07.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from disco_jax.losses import l2_normalize


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _predict_chunk(query, bank, bank_labels, *, k: int, num_classes: int, temp: float):
    sims = l2_normalize(query) @ bank.T  # (q, n)
    top_sims, top_idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temp)
    votes = jax.nn.one_hot(bank_labels[top_idx], num_classes) * weights[..., None]
    return jnp.argmax(votes.sum(axis=1), axis=-1)


def knn_accuracy(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    k: int = 20,
    temp: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy (in %) of the weighted kNN vote."""
    bank = l2_normalize(jnp.asarray(train_feats))
    bank_labels = jnp.asarray(train_labels, jnp.int32)
    k = min(k, bank.shape[0])
    preds = [
        np.asarray(
            _predict_chunk(
                jnp.asarray(test_feats[i : i + chunk]),
                bank,
                bank_labels,
                k=k,
                num_classes=num_classes,
                temp=temp,
            )
        )
        for i in range(0, len(test_feats), chunk)
    ]
    return float(100.0 * np.mean(np.concatenate(preds) == np.asarray(test_labels)))
