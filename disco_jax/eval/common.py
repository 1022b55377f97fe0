"""What every evaluator shares: the model it is handed, its data, feature extraction, progress.

The contract (big_vision's `evaluators/common.py`, in our words): the caller (the trainer or
`python -m disco_jax.evaluate`) builds a `Model` — a pure predict function and the variables it
runs on — and hands it to each evaluator's `run`. An evaluator never builds or loads a network
itself; it builds its data once, caches its jitted functions and returns metrics. So a new
evaluation is a config entry, not a trainer change.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from disco_jax.errors import ConfigError

log = logging.getLogger("disco_jax")

# (variables, uint8 images (N, S, S, 3)) -> dict of float32 outputs (features, embedding,
# logits, logits_nets, ...). Pure: jitted by `Model`, or inlined into an evaluator's own jit.
PredictFn = Callable[[Any, jax.Array], dict]


@dataclasses.dataclass
class Model:
    """A frozen network as evaluators see it.

    `fn(variables, images)` runs it in inference mode on uint8 images (normalisation inside)
    and returns float32 outputs: `features` (pooled backbone, what probes and kNN read) and,
    when the network has them, `embedding`, `logits` (N, C) and `logits_nets` (M, N, C) for a
    cohort. `pair` is an optional second predict function for distillation monitors: student
    and teacher `embedding`s of the same images, and `queue` if the method keeps one.
    `encoder()` returns (module, host variables, manifest) of a plain encoder, for protocols that
    train the whole network (fine-tuning); None when unavailable.
    """

    fn: PredictFn
    variables: Any
    mesh: jax.sharding.Mesh
    step: int = 0
    pair: PredictFn | None = None
    encoder: Callable[[], tuple[Any, dict, dict]] | None = None
    has_classifier: bool = False
    tag: str = ""  # identifies these weights for the feature cache

    def __post_init__(self) -> None:
        repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self._jit = jax.jit(self.fn, out_shardings=repl)
        self._jit_pair = None if self.pair is None else jax.jit(self.pair, out_shardings=repl)

    def predict(self, images: jax.Array) -> dict:
        return self._jit(self.variables, images)

    def predict_pair(self, images: jax.Array) -> dict:
        if self._jit_pair is None:
            raise ConfigError("this model has no teacher to compare with (pred='pair')")
        return self._jit_pair(self.variables, images)


@dataclasses.dataclass
class Env:
    """Facts about the run an evaluator is built for (never recomputed by evaluators).

    `data` is the run's data config (name, data_dir, train_split, eval_split, image_size);
    `workdir` is where long protocols keep checkpoints; `num_classes` that of the run's data.
    """

    mesh: jax.sharding.Mesh
    data: Any
    workdir: str
    seed: int = 0
    batch_size: int = 256
    dtype: Any = jnp.float32
    has_classifier: bool = False
    has_teacher: bool = False
    can_finetune: bool = True  # the caller can hand over the network's weights (Model.encoder)
    features_cache: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- data


def data_config(cfg: Any, env: Env) -> dict:
    """The data an evaluator entry reads: its own `data.name` if set, else the run's."""
    own = cfg.get("data", None)
    name = own.get("name", "") if own else ""
    out = {"name": env.data.name, "data_dir": env.data.get("data_dir", None),
           "bad_images": env.data.get("bad_images", "error"),
           "autotune": env.data.get("autotune", True)}
    if name:
        out = {"name": name, "data_dir": own.get("data_dir", None) or out["data_dir"],
               "bad_images": out["bad_images"], "autotune": out["autotune"]}
    return out


def splits(cfg: Any, env: Env) -> tuple[str, str]:
    """(train split, test split) of an entry: its own, else the run's."""
    own = bool(cfg.get("data", None) and cfg.data.get("name", ""))
    train = cfg.get("train_split", "") or ("train" if own else env.data.train_split)
    test = cfg.get("test_split", "") or ("test" if own else env.data.eval_split)
    return train, test


def image_size(cfg: Any, env: Env) -> int:
    size = int(cfg.get("image_size", -1))
    return size if size > 0 else int(env.data.image_size)


def get_source(cfg: Any, env: Env, need: Iterable[str] = ()) -> Any:
    """The entry's DataSource, with every needed split checked (one-line errors)."""
    from disco_jax import data

    source = data.get_source(data_config(cfg, env))
    for split in need:
        if split not in source.splits:
            raise ConfigError(
                f"evaluator {cfg.type!r} needs split {split!r}, which {source.name} does not"
                f" have (it has {', '.join(sorted(source.splits))}); set"
                f" evals.<name>.train_split / test_split"
            )
        if source.num_examples(split) == 0:
            raise ConfigError(f"split {split!r} of {source.name} is empty")
    return source


class Evaluator:
    """What every evaluator keeps: its entry, the run's facts, and its data, built once.

    Subclasses define `run(model) -> metrics`; `NEEDS_TRAIN = False` for those that read the
    test split only."""

    NEEDS_TRAIN = True

    def __init__(self, cfg: Any, env: Env, name: str):
        self.cfg, self.env, self.name = cfg, env, name
        self.train_split, self.test_split = splits(cfg, env)
        need = (self.train_split, self.test_split) if self.NEEDS_TRAIN else (self.test_split,)
        self.source = get_source(cfg, env, need)
        self.size = image_size(cfg, env)


# --------------------------------------------------------------------------- progress


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Progress of a long piece of work: a log line every `every_s` seconds with the rate and
    ETA, and a bar on an interactive terminal. Only process 0 reports."""

    def __init__(self, desc: str, total: int, unit: str = "batch", every_s: float = 30.0):
        self.desc, self.total, self.unit, self.every_s = desc, max(int(total), 1), unit, every_s
        self.done, self.t0 = 0, time.time()
        self._last = self.t0
        self._quiet = jax.process_index() != 0
        self._bar = not self._quiet and sys.stderr.isatty()

    def eta(self) -> float:
        rate = self.done / max(time.time() - self.t0, 1e-9)
        return (self.total - self.done) / max(rate, 1e-9)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._quiet:
            return
        now = time.time()
        if self._bar:
            width = 30
            filled = int(width * self.done / self.total)
            sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}]"
                             f" {self.done}/{self.total} ETA {format_eta(self.eta())}  ")
            sys.stderr.flush()
        if now - self._last >= self.every_s and self.done < self.total:
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            speed = f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}"
            log.info("%s: %d/%d, %s, ETA %s", self.desc, self.done, self.total, speed,
                     format_eta(self.eta()))

    def close(self) -> None:
        if self._quiet:
            return
        if self._bar:
            sys.stderr.write("\n")
        log.info("%s: done, %d %s(s) in %.1f s", self.desc, self.done, self.unit,
                 time.time() - self.t0)


# --------------------------------------------------------------------------- features


def _limit_batches(source: Any, split: str, batch: int, limit: int) -> int | None:
    if limit <= 0:
        return None
    return max(1, math.ceil(limit / jax.process_count() / (batch // jax.process_count())))


def extract(model: Model, source: Any, split: str, *, size: int, batch_size: int,
            keys: tuple[str, ...] = ("features",), limit: int = 0,
            pair: bool = False) -> dict[str, np.ndarray]:
    """Outputs `keys` (and `label`) of every example of `split` exactly once, on every host.

    `limit > 0` stops after the first batches holding about `limit` examples (a fixed subset:
    the eval order never changes). Padding rows of the last batch are dropped.
    """
    from disco_jax import data, sharding

    batch_size = max(jax.process_count(), batch_size - batch_size % model.mesh.devices.size)
    ds = data.eval_dataset(source, split=split, image_size=size,
                           local_batch=batch_size // jax.process_count(),
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
    total = data.eval_batches(source, split=split, local_batch=batch_size // jax.process_count(),
                              process_count=jax.process_count())
    stop = _limit_batches(source, split, batch_size, limit)
    total = min(total, stop) if stop else total
    predict = model.predict_pair if pair else model.predict
    out: dict[str, list] = {k: [] for k in (*keys, "label")}
    progress = Progress(f"features of {source.name}:{split}", total)
    for i, batch in enumerate(data.global_iterator(ds, model.mesh)):
        if i >= total:
            break
        mask = sharding.to_host(batch["mask"]).astype(bool)
        res = predict(batch["image"])
        for k in keys:
            if k not in res:
                raise ConfigError(f"the model gives no {k!r} output (it gives"
                                  f" {', '.join(sorted(res))})")
            value = sharding.to_host(res[k])
            out[k].append(value[:, mask] if k == "logits_nets" else value[mask])
        out["label"].append(sharding.to_host(batch["label"])[mask])
        progress.update()
    progress.close()
    return {k: np.concatenate(v, axis=1 if k == "logits_nets" else 0) for k, v in out.items()}


def cached_features(env: Env, model: Model, source: Any, split: str, size: int,
                    limit: int = 0) -> dict[str, np.ndarray]:
    """`extract` of (features, label), shared by evaluators of one round (kNN, linear_fast)."""
    key = (model.tag, model.step, source.name, split, size, limit)
    if key not in env.features_cache:
        if any(k[:2] != key[:2] for k in env.features_cache):
            env.features_cache.clear()  # one model at a time: never hold stale banks
        env.features_cache[key] = extract(model, source, split, size=size,
                                          batch_size=env.batch_size, limit=limit)
    return env.features_cache[key]


# --------------------------------------------------------------------------- metrics


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Iterable[int] = (1, 5)
                  ) -> dict[str, float]:
    """`top{k}`: % of rows whose label is among the k highest scores (k clipped to C)."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    order = np.argsort(-scores, axis=1, kind="stable")
    out = {}
    for k in ks:
        hit = (order[:, : min(k, scores.shape[1])] == labels[:, None]).any(axis=1)
        out[f"top{k}"] = float(100.0 * hit.mean()) if len(labels) else float("nan")
    return out


@functools.cache
def _normalize_fn(dtype: Any, stats: tuple | None = None) -> Callable:
    from disco_jax import data

    mean, std = stats or (data.augment.IMAGENET_MEAN, data.augment.IMAGENET_STD)
    return functools.partial(data.normalize, out_dtype=dtype, mean=mean, std=std)


def norm_stats(data_cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The run's input normalisation `(data.mean, data.std)`; None (ImageNet's) if unset."""
    mean, std = data_cfg.get("mean", None), data_cfg.get("std", None)
    return None if mean is None or std is None else (tuple(mean), tuple(std))


def normalize(images: jax.Array, dtype: Any = jnp.float32, stats: tuple | None = None
              ) -> jax.Array:
    """uint8 images -> the network's input: (x / 255 - mean) / std, `stats` = (mean, std) of
    the run the network was trained in (`norm_stats(env.data)`; None: ImageNet's)."""
    return _normalize_fn(dtype, stats)(images)
