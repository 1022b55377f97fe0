"""Pieces several methods share."""

from __future__ import annotations

from typing import Any

import jax

from disco_jax.errors import ConfigError


def check_positive(config: Any, *names: str) -> None:
    """Temperatures and similar must be > 0 (a zero temperature divides by zero)."""
    for name in names:
        value = config.loss[name]
        if not value > 0:
            raise ConfigError(f"loss.{name} must be positive, got {value}")


def student_forward(params, state, images, ctx, rng=None, batch_stats=None) -> tuple[dict, Any]:
    """Student in train mode: returns its outputs and the updated BN statistics.

    `rng` feeds dropout / stochastic depth (models without them ignore it). `batch_stats`
    defaults to the state's; pass the output of a previous call to chain two forwards in one
    step (DisCo runs the query encoder on both views).
    """
    out, mutated = ctx["student"].apply(
        {"params": params,
         "batch_stats": state["batch_stats"] if batch_stats is None else batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs=None if rng is None else {"dropout": rng},
    )
    return out, mutated["batch_stats"]


def frozen_forward(module, variables, images) -> dict:
    """A frozen network (teacher): BN in inference mode, no gradient."""
    out = module.apply(variables, images, train=False)
    return jax.lax.stop_gradient(out)
