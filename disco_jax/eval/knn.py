"""Weighted kNN classifier on frozen features (Wu et al. 2018, InstDisc; the protocol SEED's
table reports as "K"): cosine similarity to every training feature, the k nearest vote with
weight exp(sim / T), T = 0.07.

The bank is sharded row-wise over the mesh's "data" axis, so each device holds 1/D of it (an
ImageNet ResNet-50 bank is 1.28M x 2048 float32 = 10.5 GB). Queries are processed in replicated
chunks: every device scores the chunk against its own shard and keeps its local top-kmax, the
(chunk, D * kmax) candidates are all-gathered and reduced to the global top-kmax, and every k
votes from that sorted list. No device ever holds the whole bank or a (chunk, N) similarity
matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from disco_jax.errors import ConfigError
from disco_jax.eval import common
from disco_jax.losses import l2_normalize
from disco_jax.sharding import DATA, make_mesh

DEFAULT_KS = (10, 20, 100, 200)
TOP5 = 5


@dataclasses.dataclass(frozen=True)
class ShardedBank:
    """An L2-normalised feature bank laid out for `query_bank`; build it with `shard_bank`.

    `feats` is (n_pad, dim) float32 with sharding P("data", None), `labels` (n_pad,) int32 with
    P("data"); n_pad is a multiple of the mesh's data size. Rows with a negative label (the
    padding) are never chosen as neighbours.
    """

    feats: jax.Array
    labels: jax.Array
    size: int  # rows with a label >= 0
    max_label: int
    mesh: Mesh


def _default_mesh(mesh: Mesh | None) -> Mesh:
    mesh = make_mesh(1) if mesh is None else mesh
    if DATA not in mesh.axis_names:
        raise ConfigError(f"the kNN mesh needs a {DATA!r} axis; got axes {mesh.axis_names}")
    return mesh


def _row_shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    return NamedSharding(mesh, P(DATA, None)), NamedSharding(mesh, P(DATA))


@dataclasses.dataclass(frozen=True)
class _BankFns:
    """The jitted steps of `shard_bank` for one (mesh, n_pad); cached so that rebuilding a bank
    of the same shape does not recompile."""

    place: Any  # any (N, dim) -> (n_pad, dim) float32 rows on the mesh, zeros past N
    pad_labels: Any  # (N,) -> (n_pad,) int32, -1 past N (which masks the padding rows)
    norms: Any  # (n_pad, dim) -> (n_pad, 1) row norms, clamped like losses.l2_normalize
    divide: Any  # rows / norms, a new array
    divide_in_place: Any  # rows / norms, the rows donated


@functools.lru_cache(maxsize=16)
def _bank_fns(mesh: Mesh, n_pad: int) -> _BankFns:
    rows, labels = _row_shardings(mesh)

    def place(x):
        return jnp.pad(x.astype(jnp.float32), ((0, n_pad - x.shape[0]), (0, 0)))

    def pad_labels(y):
        return jnp.pad(y.astype(jnp.int32), (0, n_pad - y.shape[0]), constant_values=-1)

    def norms(x):
        return jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), 1e-12)

    # Normalising is two passes (norms, then an elementwise divide) because a single fused
    # normalise reads every row twice, and XLA then writes it to a temporary of the full shard
    # and copies it over the donated input: 2x the shard per device. The divide is in place.
    return _BankFns(
        place=jax.jit(place, out_shardings=rows),
        pad_labels=jax.jit(pad_labels, out_shardings=labels),
        norms=jax.jit(norms, out_shardings=rows),
        divide=jax.jit(jnp.divide, out_shardings=rows),
        divide_in_place=jax.jit(jnp.divide, out_shardings=rows, donate_argnums=0),
    )


def _host_rows_to_devices(feats: np.ndarray, n_pad: int, sharding: NamedSharding) -> jax.Array:
    """A (n_pad, dim) float32 array placed shard by shard from host rows (zeros past the end):
    the host only materialises the padded tail, not a second copy of the bank."""
    n, dim = feats.shape

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(n_pad)
        rows = np.asarray(feats[start:min(stop, n)], dtype=np.float32)
        if stop > n:
            rows = np.concatenate([rows, np.zeros((stop - max(start, n), dim), np.float32)])
        return rows

    return jax.make_array_from_callback((n_pad, dim), sharding, shard)


def shard_bank(
    feats: Any, labels: Any, mesh: Mesh | None = None, *, donate: bool = False
) -> ShardedBank:
    """L2-normalise `feats` (N, dim) and shard them with `labels` (N,) row-wise over `mesh`.

    Rows are padded to a multiple of the mesh's data size; padded rows get label -1 and are
    never chosen, and so are caller rows with a negative label (a caller that builds a
    pre-padded bank on the devices marks its padding that way). numpy input is placed shard by
    shard; a jax.Array on the mesh is padded / normalised there (one on other devices goes via
    the host). `donate=True` lets a jax.Array `feats` that is already float32 (n_pad, dim) with
    this sharding be normalised in place (otherwise it is copied and left alone). Mesh None:
    one device.
    """
    mesh = _default_mesh(mesh)
    if len(feats.shape) != 2 or len(labels.shape) != 1 or labels.shape[0] != feats.shape[0]:
        raise ConfigError(
            f"kNN bank: need feats (N, dim) and labels (N,); got {tuple(feats.shape)} and"
            f" {tuple(labels.shape)}"
        )
    n = feats.shape[0]
    n_pad = math.ceil(n / mesh.shape[DATA]) * mesh.shape[DATA]
    fns = _bank_fns(mesh, n_pad)
    rows_sharding = _row_shardings(mesh)[0]
    if isinstance(feats, jax.Array) and feats.committed and feats.sharding.device_set != set(
        mesh.devices.flat
    ):
        feats = np.asarray(feats)  # on other devices: jit cannot move it, the host path can
    if not isinstance(feats, jax.Array):
        feats, owned = _host_rows_to_devices(np.asarray(feats), n_pad, rows_sharding), True
    elif (
        feats.shape[0] != n_pad
        or feats.dtype != jnp.float32
        or not feats.sharding.is_equivalent_to(rows_sharding, 2)
    ):
        feats, owned = fns.place(feats), True  # a padded copy on the mesh that we own
    else:
        owned = donate  # already laid out: normalise in place only if the caller allows it
    bank_feats = (fns.divide_in_place if owned else fns.divide)(feats, fns.norms(feats))
    bank_labels = fns.pad_labels(np.asarray(labels))  # small: via the host, from any device
    size = int(jnp.sum(bank_labels >= 0))
    if size == 0:
        raise ConfigError("kNN bank is empty (no rows with a label >= 0)")
    return ShardedBank(bank_feats, bank_labels, size, int(jnp.max(bank_labels)), mesh)


def _check_ks(ks: int | Sequence[int]) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, Integral) else tuple(ks)
    if not ks:
        raise ConfigError("kNN ks is empty; give at least one k, e.g. ks=(20,)")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, Integral) or k <= 0:
            raise ConfigError(f"kNN k must be a positive integer; got {k!r} in ks={ks}")
    return tuple(dict.fromkeys(int(k) for k in ks))  # dedupe, keep order


def _check_temp(temp: float) -> float:
    if isinstance(temp, bool) or not isinstance(temp, Real) or not temp > 0 or temp == math.inf:
        raise ConfigError(f"kNN temperature must be a finite number > 0; got {temp!r}")
    return float(temp)


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ConfigError(f"kNN {name} must be a positive integer; got {value!r}")
    return int(value)


def _global_topk(
    bank: jax.Array, bank_labels: jax.Array, query: jax.Array, *, kmax: int
) -> tuple[jax.Array, jax.Array]:
    """Per device: (chunk, n/D) similarities to the local shard -> local top-k -> all-gather the
    (chunk, D * k) candidates -> global top-kmax (values descending, with their labels)."""
    sims = jnp.matmul(
        l2_normalize(query),
        bank.T,
        # float32 cosine: TF32/bf16 passes on GPUs would reorder near neighbours.
        precision=jax.lax.Precision.HIGHEST,
    )
    sims = jnp.where(bank_labels[None, :] >= 0, sims, -jnp.inf)
    vals, idx = jax.lax.top_k(sims, min(kmax, bank.shape[0]))
    labs = bank_labels[idx]
    # Gathered in device order, so equal similarities keep global row order, exactly as
    # lax.top_k over the unsharded bank would break the tie (lower row first).
    vals = jax.lax.all_gather(vals, DATA, axis=1, tiled=True, to="invarying")
    labs = jax.lax.all_gather(labs, DATA, axis=1, tiled=True, to="invarying")
    vals, pos = jax.lax.top_k(vals, kmax)
    return vals, jnp.take_along_axis(labs, pos, axis=1)


def _vote_counts(
    vals: jax.Array,
    labs: jax.Array,
    query_labels: jax.Array,
    valid: jax.Array,
    temp: jax.Array,
    *,
    ks: tuple[int, ...],
    num_classes: int,
) -> jax.Array:
    """(len(ks), 2) int32: correct top-1 and top-5 counts over the valid queries, for each k."""
    rows = jnp.arange(vals.shape[0])
    weights = jnp.exp(vals / temp)  # -inf (padding) -> weight 0
    labs = jnp.where(labs >= 0, labs, 0)

    def add_neighbour(j, votes):
        # One neighbour per query at a time: indices never collide, so the float sums are
        # deterministic (a scatter with duplicates is not on GPU) and in rank order.
        return votes.at[rows, labs[:, j]].add(weights[:, j])

    votes = jnp.zeros((vals.shape[0], num_classes), jnp.float32)
    out = {}
    prev = 0
    for k in sorted(ks):
        votes = jax.lax.fori_loop(prev, k, add_neighbour, votes)
        prev = k
        _, top = jax.lax.top_k(votes, min(TOP5, num_classes))  # ties: lower class first
        hit = top == query_labels[:, None]
        out[k] = jnp.stack([jnp.sum(hit[:, 0] & valid), jnp.sum(hit.any(axis=1) & valid)])
    return jnp.stack([out[k] for k in ks]).astype(jnp.int32)


def _clip_ks(ks: tuple[int, ...], size: int) -> tuple[int, ...]:
    return tuple(dict.fromkeys(min(k, size) for k in ks))


@functools.lru_cache(maxsize=32)
def _compile_step(
    mesh: Mesh, n_pad: int, dim: int, chunk: int, ks: tuple[int, ...], num_classes: int
) -> jax.stages.Compiled:
    """The jitted chunk step, compiled once per (mesh, bank shape, chunk, ks, classes)."""

    def step(bank, bank_labels, query, query_labels, valid, temp):
        vals, labs = _global_topk(bank, bank_labels, query, kmax=max(ks))
        return _vote_counts(vals, labs, query_labels, valid, temp, ks=ks, num_classes=num_classes)

    feats_sharding, labels_sharding = _row_shardings(mesh)
    rep = NamedSharding(mesh, P())
    fn = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P(DATA, None), P(DATA), P(), P(), P(), P()),
            out_specs=P(),
        )
    )
    args = (
        jax.ShapeDtypeStruct((n_pad, dim), jnp.float32, sharding=feats_sharding),
        jax.ShapeDtypeStruct((n_pad,), jnp.int32, sharding=labels_sharding),
        jax.ShapeDtypeStruct((chunk, dim), jnp.float32, sharding=rep),
        jax.ShapeDtypeStruct((chunk,), jnp.int32, sharding=rep),
        jax.ShapeDtypeStruct((chunk,), jnp.bool_, sharding=rep),
        jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
    )
    return fn.lower(*args).compile()


def compiled_step(
    bank: ShardedBank, *, num_classes: int, ks: Sequence[int] = DEFAULT_KS, chunk: int = 1024
) -> jax.stages.Compiled:
    """The compiled chunk step `query_bank` runs (cached), e.g. for its memory_analysis().

    `query_bank` compiles for min(chunk, number of queries) rows; pass that to get its step.
    """
    ks = _clip_ks(_check_ks(ks), bank.size)
    num_classes = _check_positive("num_classes", num_classes)
    n_pad, dim = bank.feats.shape
    return _compile_step(bank.mesh, n_pad, dim, _check_positive("chunk", chunk), ks, num_classes)


def query_bank(
    bank: ShardedBank,
    query_feats: Any,
    query_labels: Any,
    *,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temp: float = 0.07,
    chunk: int = 1024,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Weighted-kNN top-1 / top-5 accuracy (in %) of the queries against a `ShardedBank`.

    Returns {"top1_k10": .., "top5_k10": .., ...} keyed by the requested ks; a k larger than the
    bank uses the whole bank. Top-5: the true label is among the min(5, num_classes) classes
    with the largest vote. `on_chunk(done, total)` (queries) is called after each chunk has
    finished; without it chunks are dispatched asynchronously and only the end waits.
    """
    ks = _check_ks(ks)
    temp = _check_temp(temp)
    num_classes = _check_positive("num_classes", num_classes)
    chunk = _check_positive("chunk", chunk)
    if bank.max_label >= num_classes:
        raise ConfigError(f"kNN bank has label {bank.max_label} but num_classes={num_classes}")
    query_feats = np.asarray(query_feats, np.float32)
    query_labels = np.asarray(query_labels, np.int32)
    n_query = query_feats.shape[0]
    if query_feats.ndim != 2 or query_feats.shape[1] != bank.feats.shape[1]:
        raise ConfigError(
            f"kNN queries must be (Q, {bank.feats.shape[1]}); got {query_feats.shape}"
        )
    if n_query == 0 or query_labels.shape != (n_query,):
        raise ConfigError(
            f"kNN needs Q > 0 queries and (Q,) labels; got {query_feats.shape[0]} queries and"
            f" labels of shape {query_labels.shape}"
        )

    clipped = _clip_ks(ks, bank.size)
    chunk = min(chunk, n_query)  # a small query set does not pay for a full-size chunk
    step = _compile_step(bank.mesh, *bank.feats.shape, chunk, clipped, num_classes)
    rep = NamedSharding(bank.mesh, P())
    temp_arr = jax.device_put(np.float32(temp), rep)
    counts = []
    for start in range(0, n_query, chunk):
        q, y = query_feats[start : start + chunk], query_labels[start : start + chunk]
        valid = np.arange(chunk) < len(q)
        if len(q) < chunk:  # the last chunk is padded and masked, not recompiled
            q = np.concatenate([q, np.zeros((chunk - len(q), q.shape[1]), np.float32)])
            y = np.concatenate([y, np.zeros(chunk - len(y), np.int32)])
        q, y, valid = jax.device_put((q, y, valid), rep)
        counts.append(step(bank.feats, bank.labels, q, y, valid, temp_arr))  # async dispatch
        if on_chunk is not None:
            counts[-1].block_until_ready()
            on_chunk(min(start + chunk, n_query), n_query)
    total = np.sum(np.stack(jax.device_get(counts)), axis=0)  # (len(clipped), 2)
    by_k = dict(zip(clipped, total.tolist(), strict=True))
    out: dict[str, float] = {}
    for k in ks:
        top1, top5 = by_k[min(k, bank.size)]
        out[f"top1_k{k}"] = 100.0 * top1 / n_query
        out[f"top5_k{k}"] = 100.0 * top5 / n_query
    return out


def knn_topk(
    bank_feats: Any,
    bank_labels: Any,
    query_feats: Any,
    query_labels: Any,
    *,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temp: float = 0.07,
    mesh: Mesh | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Weighted-kNN top-1 / top-5 (in %) for every k, with the bank sharded over `mesh`.

    numpy or jax arrays. To query one bank several times, build it once with `shard_bank` and
    call `query_bank`.
    """
    # Validate before the (possibly large) bank is placed on the devices.
    _check_ks(ks)
    _check_temp(temp)
    bank = shard_bank(bank_feats, bank_labels, mesh)
    return query_bank(
        bank, query_feats, query_labels, num_classes=num_classes, ks=ks, temp=temp, chunk=chunk
    )


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
    """Top-1 accuracy (in %) of the weighted kNN vote (one device)."""
    res = knn_topk(
        train_feats, train_labels, test_feats, test_labels,
        num_classes=num_classes, ks=(k,), temp=temp, chunk=chunk,
    )
    return res[f"top1_k{k}"]


# --------------------------------------------------------------------------- evaluator

VERSION = 1
# ks: the sweep reported as top1_k{k} / top5_k{k}; k: the headline `top1` / `top5` (SEED's
# table and the demo use k = 20). train_limit / test_limit > 0: a fixed subset (online kNN).
DEFAULTS = {"ks": (10, 20, 100, 200), "k": 20, "temp": 0.07, "chunk": 1024,
            "train_limit": 0, "test_limit": 0}


def validate(cfg: Any, env: Any, where: str) -> None:
    if not cfg.temp > 0:
        raise ConfigError(f"{where}.temp must be positive (the vote weight is exp(sim / temp)),"
                          f" got {cfg.temp}")
    for k in (*cfg.ks, cfg.k):
        if not (isinstance(k, int) and k > 0):
            raise ConfigError(f"{where}: every k must be a positive integer, got {k!r}")
    if not (isinstance(cfg.chunk, int) and cfg.chunk > 0):
        raise ConfigError(f"{where}.chunk must be a positive integer, got {cfg.chunk!r}")
    common.get_source(cfg, env, common.splits(cfg, env))


class Evaluator(common.Evaluator):
    """Weighted kNN of the test split against the train split's features, bank on the mesh."""

    def run(self, model: Any) -> dict[str, float]:
        cfg = self.cfg
        tr = common.cached_features(self.env, model, self.source, self.train_split, self.size,
                                    cfg.train_limit)
        te = common.cached_features(self.env, model, self.source, self.test_split, self.size,
                                    cfg.test_limit)
        ks = tuple(dict.fromkeys((cfg.k, *cfg.ks)))
        res = knn_topk(tr["features"], tr["label"], te["features"], te["label"],
                       num_classes=self.source.num_classes, ks=ks, temp=cfg.temp,
                       mesh=model.mesh, chunk=cfg.chunk)
        head = {"top1": res[f"top1_k{cfg.k}"], "top5": res[f"top5_k{cfg.k}"]}
        return head | {f"top{t}_k{k}": res[f"top{t}_k{k}"] for k in cfg.ks for t in (1, 5)}
