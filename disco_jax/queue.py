"""The negative queue as plain, sharded device state.

`{"feats": (K, D) float32 unit rows, "ptr": int32 scalar}` lives inside the train state. `feats`
is sharded along K over the mesh's data axis (`P("data", None)`) and donated every step, so each
device holds K/n rows and nothing is duplicated (the PyTorch codes keep a full copy per GPU).

Enqueue is global FIFO, exactly as the official codes do it after `concat_all_gather`: the
global batch (in global batch order) overwrites rows `[ptr, ptr + B)` and `ptr` advances by B
modulo K. The write is a dynamic-update-slice on the global array; XLA routes rows to the
devices that own them, so the result does not depend on the device count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from disco_jax.errors import ConfigError
from disco_jax.losses import l2_normalize

Queue = dict[str, jax.Array]


def check_size(size: int, global_batch: int) -> None:
    """The ring buffer only stays aligned if whole batches fit (SEED/MoCo assert the same)."""
    if size <= 0 or size % global_batch:
        raise ConfigError(
            f"queue size {size} must be a positive multiple of the global batch {global_batch}"
            f" (e.g. {max(1, size // max(global_batch, 1)) * global_batch})"
        )


def init(rng: jax.Array, size: int, dim: int) -> Queue:
    """Random normal rows, normalised to unit length (as the official `queue` buffers)."""
    feats = l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))
    return {"feats": feats, "ptr": jnp.zeros((), jnp.int32)}


def enqueue(queue: Queue, keys: jax.Array) -> Queue:
    """Global-FIFO write of a (B, D) batch of already-normalised keys at `ptr`."""
    keys = jax.lax.stop_gradient(keys).astype(queue["feats"].dtype)
    size, batch = queue["feats"].shape[0], keys.shape[0]
    feats = jax.lax.dynamic_update_slice_in_dim(queue["feats"], keys, queue["ptr"], axis=0)
    return {"feats": feats, "ptr": (queue["ptr"] + batch) % size}


def sharding(mesh: Mesh, axis: str = "data") -> dict[str, NamedSharding]:
    """Rows of the queue spread over the data axis; the pointer replicated."""
    return {
        "feats": NamedSharding(mesh, P(axis, None)),
        "ptr": NamedSharding(mesh, P()),
    }
