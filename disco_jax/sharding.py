"""Mesh, shardings of the train state, and process-level helpers.

Everything runs under `jax.jit` on one `Mesh` with a `data` axis. Batches are global
`jax.Array`s sharded along that axis, so a `jnp.mean` over the batch is already a global mean
(XLA inserts the collectives) and BatchNorm statistics are global-batch (synchronised) by
construction. Only the queue is sharded; parameters and optimizer state are replicated
(students are small; FSDP rules can be added here by path regex when teachers grow).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from disco_jax.errors import ConfigError

DATA = "data"

# (regex over the "/"-joined state path, partition spec); first match wins.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r"(^|.*/)queue(_\w+)?/feats$", P(DATA, None)),
    (r".*", P()),
)


def make_mesh(num_devices: int = -1) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (-1: all of them)."""
    devices = jax.devices()
    if num_devices == -1:
        num_devices = len(devices)
    if not 0 < num_devices <= len(devices):
        raise ConfigError(
            f"mesh.num_devices={num_devices} but {len(devices)} devices are visible"
        )
    return Mesh(np.asarray(devices[:num_devices]), (DATA,))


def path_str(path: Sequence[Any]) -> str:
    parts = []
    for p in path:
        parts.append(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))))
    return "/".join(parts)


def tree_shardings(
    tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES
) -> Any:
    """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) by path rule."""

    def pick(path, _leaf):
        name = path_str(path)
        for pattern, spec in rules:
            if re.fullmatch(pattern, name):
                return NamedSharding(mesh, spec)
        raise AssertionError(f"no sharding rule for {name}")  # the last rule matches all

    return jax.tree_util.tree_map_with_path(pick, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def check_batch(global_batch: int, mesh: Mesh) -> None:
    """The global batch must split evenly over devices and over processes."""
    n = mesh.devices.size
    if global_batch <= 0 or global_batch % n:
        raise ConfigError(
            f"global batch_size {global_batch} is not divisible by the {n} devices of the mesh;"
            f" use a multiple of {n}"
        )
    if global_batch % jax.process_count():
        raise ConfigError(
            f"global batch_size {global_batch} is not divisible by the"
            f" {jax.process_count()} processes"
        )


def to_host(x: jax.Array) -> np.ndarray:
    """Fetch a (possibly multi-process) global array onto every host as numpy."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
