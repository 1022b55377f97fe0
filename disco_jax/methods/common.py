"""Pieces several methods share."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from disco_jax.errors import ConfigError


def check_positive(config: Any, *names: str) -> None:
    """Temperatures and similar must be > 0 (a zero temperature divides by zero)."""
    for name in names:
        value = config.loss[name]
        if not value > 0:
            raise ConfigError(f"loss.{name} must be positive, got {value}")


def student_forward(params, state, images, ctx, rng=None, batch_stats=None) -> tuple[dict, Any]:
    """Student in train mode: returns its outputs and the updated BN statistics.

    BN statistics are per group of `loss.bn_group_size` images (`bn_groups`), as each GPU of
    the official runs normalises its own share of the batch; `bn_group_size=0` normalises over
    the global batch. `rng` feeds dropout / stochastic depth (models without them ignore it).
    `batch_stats` defaults to the state's; pass the output of a previous call to chain two
    forwards in one step (DisCo runs the query encoder on both views).
    """
    variables = {"params": params,
                 "batch_stats": state["batch_stats"] if batch_stats is None else batch_stats}
    return train_forward(ctx["student"], variables, images, bn_groups(ctx), rng)


def frozen_forward(module, variables, images) -> dict:
    """A frozen network (teacher): BN in inference mode, no gradient."""
    out = module.apply(variables, images, train=False)
    return jax.lax.stop_gradient(out)


# --------------------------------------------------------------------------- BN groups

KEY_BN_MODES = ("shuffle", "global")
TEACHER_BN_MODES = ("eval", "train")


def bn_knobs(group_size: int) -> dict[str, int]:
    """The BN knob every method declares: `bn_group_size` images per BN group in train-mode
    forwards (the official per-GPU batch, e.g. 32 for 8 GPUs x 32); 0 = the global batch."""
    return {"bn_group_size": group_size}


def check_choice(config: Any, name: str, choices: tuple[str, ...]) -> str:
    """A string option of `config.loss` that must be one of `choices`."""
    value = config.loss[name]
    if value not in choices:
        raise ConfigError(f"loss.{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_bn_groups(config: Any) -> None:
    """`loss.bn_group_size` (0 = the global batch) must split the global batch evenly."""
    size = config.loss.bn_group_size
    if not isinstance(size, int) or size < 0 or (size and config.batch_size % size):
        raise ConfigError(
            f"loss.bn_group_size={size!r} must be 0 (BN over the global batch) or a divisor of"
            f" batch_size={config.batch_size} (the official per-GPU batch, e.g. 32)"
        )


def check_key_bn(config: Any) -> str:
    """`loss.key_bn`; shuffle-BN needs BN groups (over the whole batch a shuffle changes
    nothing)."""
    mode = check_choice(config, "key_bn", KEY_BN_MODES)
    if mode == "shuffle" and config.loss.bn_group_size in (0, config.batch_size):
        raise ConfigError(
            f"loss.key_bn='shuffle' needs loss.bn_group_size below batch_size={config.batch_size}"
            f" (got {config.loss.bn_group_size}: one BN group, nothing to shuffle); set"
            " loss.key_bn='global' or a smaller bn_group_size"
        )
    return mode


def bn_groups(ctx: dict) -> int:
    """How many BN groups a train-mode forward uses: global batch / `loss.bn_group_size`.

    A forward of n rows (n = the batch, or a multiple for SEED's small crops) is cut into this
    many groups of n / groups consecutive rows, what the official per-GPU BN computes on each
    GPU's share; it does not depend on the device count, so 1-device and 8-device runs agree.
    """
    config = ctx["config"]
    size = int(config.loss.bn_group_size)
    return int(config.batch_size) // size if size else 1


def _merge_groups(a: jax.Array, axis: int) -> jax.Array:
    """(..., G, n/G, ...) at `axis` -> (..., n, ...)."""
    return a.reshape(*a.shape[:axis], a.shape[axis] * a.shape[axis + 1], *a.shape[axis + 2:])


def output_batch_axes(module: Any, out: dict) -> dict:
    """The batch axis of every output: 0, unless the module's class declares
    `OUTPUT_BATCH_AXIS` (key -> axis, "*" for the other keys; a cohort stacks its networks in
    front of the batch)."""
    axes = getattr(type(module), "OUTPUT_BATCH_AXIS", {})
    return {k: axes.get(k, axes.get("*", 0)) for k in out}


def train_forward(module, variables: dict, images: jax.Array, groups: int = 1,
                  rng: jax.Array | None = None) -> tuple[dict, Any]:
    """Train-mode forward with BN statistics per group of n/groups consecutive rows.

    groups = 1: one plain forward (BN over the whole, global, batch). Otherwise exact per-GPU
    BN without shard_map: the batch is reshaped to (groups, n/groups, ...) and the module is
    vmapped over the group axis, so every BN layer reduces over its group only; each group
    gets its own dropout key. Returns the outputs in the input order and the running statistics
    averaged over the groups (each group's update is m * old + (1 - m) * its batch statistic,
    so the mean is the update with the mean statistic; the official per-GPU buffers differ per
    GPU and only rank 0's are kept).
    """
    if groups == 1:
        out, mutated = module.apply(variables, images, train=True, mutable=["batch_stats"],
                                    rngs=None if rng is None else {"dropout": rng})
        return out, mutated["batch_stats"]
    n = images.shape[0]
    if n % groups:
        raise ValueError(f"a batch of {n} rows cannot be cut into {groups} BN groups")
    x = images.reshape(groups, n // groups, *images.shape[1:])
    rngs = None if rng is None else jax.random.split(rng, groups)

    def one(x_g, r):
        out, mutated = module.apply(variables, x_g, train=True, mutable=["batch_stats"],
                                    rngs=None if r is None else {"dropout": r})
        return out, mutated["batch_stats"]

    out, stats = jax.vmap(one)(x, rngs)  # every leaf (G, ...): the group axis in front
    axes = output_batch_axes(module, out)
    out = {k: _merge_groups(jnp.moveaxis(v, 0, axes[k]), axes[k]) for k, v in out.items()}
    return out, jax.tree_util.tree_map(lambda s: s.mean(axis=0), stats)


def grouped_forward(module, variables: dict, images: jax.Array, groups: int,
                    rng: jax.Array | None = None) -> tuple[dict, Any]:
    """`train_forward` with `groups` BN groups (kept for callers that pass a count)."""
    return train_forward(module, variables, images, groups, rng)


def shuffle_permutation(rng: jax.Array, n: int) -> jax.Array:
    """The key-batch permutation shuffle-BN draws from the step's key-encoder rng."""
    return jax.random.permutation(jax.random.fold_in(rng, 0x5B), n)


def _take_rows(out: dict, index: jax.Array, axes: dict) -> dict:
    return {k: jnp.take(v, index, axis=axes[k]) for k, v in out.items()}


def key_forward(module, variables: dict, images: jax.Array, ctx: dict, rng: jax.Array,
                mode: str = "shuffle") -> tuple[dict, Any]:
    """The momentum key encoder in train mode, with MoCo's shuffle-BN or global BN.

    "shuffle" (official, facebookresearch/moco `_batch_shuffle_ddp`): permute the global key
    batch with a fresh random permutation, run the encoder with BN per group of
    `loss.bn_group_size` images (`train_forward`), and undo the permutation, so no group
    normalises the keys of exactly the queries another group sees.
    "global": BN statistics over the whole batch (what plain jit gives; no leak between the
    query and key branches either, since the query statistics come from another forward).
    Outputs are stop-gradient. Returns (outputs, new batch_stats).
    """
    if mode == "global":
        out, stats = train_forward(module, variables, images, 1, rng)
        return jax.lax.stop_gradient(out), stats
    if mode != "shuffle":
        raise ValueError(f"unknown key BN mode {mode!r}")
    perm = shuffle_permutation(rng, images.shape[0])
    out, stats = train_forward(module, variables, images[perm], bn_groups(ctx), rng)
    out = _take_rows(out, jnp.argsort(perm), output_batch_axes(module, out))
    return jax.lax.stop_gradient(out), stats


def momentum_keys(params, ema: dict, images: jax.Array, ctx: dict, rng: jax.Array
                  ) -> tuple[dict, dict]:
    """MoCo's key branch, shared by moco_v2, disco and mcl: the momentum update of the key
    encoder from the parameters as they are at this step (before the forward, as the official
    `_momentum_update_key_encoder`), then its forward with `loss.key_bn`. `ctx["student"]`
    is the key encoder's module (for a cohort, every network's EMA at once). Returns the
    key outputs (stop-gradient) and the new `ema` entry {params, batch_stats}."""
    cfg = ctx["config"].loss
    ema_params = optax.incremental_update(
        jax.lax.stop_gradient(params), ema["params"], step_size=1.0 - cfg.momentum
    )
    out, stats = key_forward(ctx["student"], {"params": ema_params,
                                              "batch_stats": ema["batch_stats"]},
                             images, ctx, rng, mode=cfg.key_bn)
    return out, {"params": ema_params, "batch_stats": stats}


def teacher_forward(module, variables: dict, images: jax.Array, ctx: dict, rng: jax.Array,
                    mode: str = "eval") -> dict:
    """A frozen teacher, stop-gradient, with its BN in one of two modes.

    "eval": running statistics (SEED; the clean choice). "train": batch statistics per group
    of `loss.bn_group_size` images, as DisCo's `model.train()` and PaddleClas leave their
    teacher on each GPU's batch; the statistics are not stored (the teacher never changes).
    """
    if mode == "eval":
        return frozen_forward(module, variables, images)
    if mode != "train":
        raise ValueError(f"unknown teacher BN mode {mode!r}")
    out, _ = train_forward(module, variables, images, bn_groups(ctx), rng)
    return jax.lax.stop_gradient(out)
