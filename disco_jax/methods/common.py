"""Pieces several methods share."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

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


# --------------------------------------------------------------------------- per-device BN

KEY_BN_MODES = ("global", "shuffle")


def check_choice(config: Any, name: str, choices: tuple[str, ...], default: str) -> str:
    """A string option of `config.loss` that must be one of `choices`."""
    value = config.loss.get(name, default)
    if value not in choices:
        raise ConfigError(f"loss.{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_bn_groups(config: Any) -> None:
    """`loss.bn_groups` (0 = one per mesh device) must split the global batch evenly."""
    groups = config.loss.get("bn_groups", 0)
    if groups < 0 or (groups and config.batch_size % groups):
        raise ConfigError(
            f"loss.bn_groups={groups} must be 0 (one group per device) or divide the global"
            f" batch {config.batch_size}"
        )


def bn_groups(ctx: dict) -> int:
    """How many BN groups per-device BN uses: `loss.bn_groups`, or the mesh's device count.

    The official codes run 8 GPUs x 32 images; setting bn_groups=8 reproduces those
    statistics on any number of devices (and makes 1-device and 8-device runs agree).
    """
    groups = ctx["config"].loss.get("bn_groups", 0)
    return int(groups) if groups else int(ctx["mesh"].devices.size)


def grouped_forward(module, variables: dict, images: jax.Array, groups: int,
                    rng: jax.Array | None = None) -> tuple[dict, Any]:
    """Train-mode forward with BN statistics per group of B/groups consecutive rows.

    Exact per-device BN without shard_map: the batch is reshaped to (groups, B/groups, ...) and
    the module is vmapped over the group axis, so every BN layer reduces over its group only,
    exactly what per-GPU BN computes. With groups = the mesh's devices each group is one
    device's shard of the batch-sharded input (no cross-device reduction). Returns the outputs
    in the input order and the running statistics averaged over the groups (each group's update
    is m * old + (1 - m) * its batch statistic, so the mean is the update with the mean
    statistic; the official per-GPU buffers differ per GPU and only rank 0's are kept).
    """
    n = images.shape[0]
    x = images.reshape(groups, n // groups, *images.shape[1:])
    rngs = None if rng is None else jax.random.split(rng, groups)

    def one(x_g, r):
        out, mutated = module.apply(variables, x_g, train=True, mutable=["batch_stats"],
                                    rngs=None if r is None else {"dropout": r})
        return out, mutated["batch_stats"]

    out, stats = jax.vmap(one)(x, rngs)
    out = jax.tree_util.tree_map(lambda a: a.reshape(n, *a.shape[2:]), out)
    return out, jax.tree_util.tree_map(lambda s: s.mean(axis=0), stats)


def shuffle_permutation(rng: jax.Array, n: int) -> jax.Array:
    """The key-batch permutation shuffle-BN draws from the step's key-encoder rng."""
    return jax.random.permutation(jax.random.fold_in(rng, 0x5B), n)


def key_forward(module, variables: dict, images: jax.Array, ctx: dict, rng: jax.Array,
                mode: str = "global") -> tuple[dict, Any]:
    """The momentum key encoder in train mode, with global BN or MoCo's shuffle-BN.

    "global": BN statistics over the whole (global) batch, what plain jit gives; no
    information leaks between the query and key branches through BN because the query
    encoder's statistics come from another forward.
    "shuffle": facebookresearch/moco `_batch_shuffle_ddp`: permute the global key batch with a
    fresh random permutation, run the encoder with per-device BN statistics
    (`grouped_forward`, `bn_groups(ctx)` groups), and undo the permutation. Outputs are
    stop-gradient. Returns (outputs, new batch_stats).
    """
    if mode == "global":
        out, mutated = module.apply(variables, images, train=True, mutable=["batch_stats"],
                                    rngs={"dropout": rng})
        return jax.lax.stop_gradient(out), mutated["batch_stats"]
    if mode != "shuffle":
        raise ValueError(f"unknown key BN mode {mode!r}")
    perm = shuffle_permutation(rng, images.shape[0])
    out, stats = grouped_forward(module, variables, images[perm], bn_groups(ctx), rng)
    unshuffle = jnp.argsort(perm)
    out = jax.tree_util.tree_map(lambda a: a[unshuffle], out)
    return jax.lax.stop_gradient(out), stats


TEACHER_BN_MODES = ("eval", "train", "per_device")


def teacher_forward(module, variables: dict, images: jax.Array, ctx: dict, rng: jax.Array,
                    mode: str = "eval") -> dict:
    """A frozen teacher, stop-gradient, with its BN in one of three modes.

    "eval": running statistics (SEED; the clean choice). "train": batch statistics, as
    DisCo's `model.train()` leaves its teacher; the statistics are not stored (the teacher's
    variables never change). "per_device": batch statistics per device group (`bn_groups`),
    the official per-GPU form of "train".
    """
    if mode == "eval":
        return frozen_forward(module, variables, images)
    if mode == "train":
        out, _ = module.apply(variables, images, train=True, mutable=["batch_stats"],
                              rngs={"dropout": rng})
    elif mode == "per_device":
        out, _ = grouped_forward(module, variables, images, bn_groups(ctx), rng)
    else:
        raise ValueError(f"unknown teacher BN mode {mode!r}")
    return jax.lax.stop_gradient(out)
