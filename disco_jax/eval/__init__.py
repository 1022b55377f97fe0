"""Evaluation of frozen backbones: weighted kNN and a linear probe on pooled features."""

from disco_jax.eval.features import extract
from disco_jax.eval.knn import knn_accuracy
from disco_jax.eval.linear import linear_probe

__all__ = ["extract", "knn_accuracy", "linear_probe"]
