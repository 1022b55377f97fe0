"""Host input pipeline: tf.data streams of uint8 batches, then global jax.Arrays.

The host only decodes, crops (random-resized, or CIFAR's zero-padded random crop) and flips, and
emits uint8. Colour jitter, grayscale, blur and normalisation run on the accelerator
(`augment.py`). perf.md §5 measured the full MoCo-v2 augmentation on the host at ~28 img/s/core
in tf.data, far too slow to feed a GPU.

The training stream is a pure function of (seed, step):
* the epoch-e order is a shuffle seeded from (seed, e);
* example p of epoch e is cropped and flipped with stateless ops keyed by (seed, e, p);
* every epoch is exactly `steps_per_epoch * local_batch` examples, so step s lives in epoch
  s // steps_per_epoch. Resuming at `start_step` starts the epoch range there and skips the
  partial epoch's examples while they are still encoded bytes, before any decode or crop.
So a restarted job sees exactly the batches an uninterrupted one would have seen.
(tf.data's shuffle mixes TF's global seed into its op seed. Do not call tf.random.set_seed in a
training process, or the order stops being a function of `seed` alone.)
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from disco_jax.data._tf import no_autograph, tf  # TF on first use (GPUs hidden): see _tf.py
from disco_jax.data.sources import DataSource, check_bool, shard_bounds
from disco_jax.errors import ConfigError

# Resize-256 / center-crop-224: the eval short side is image_size / 0.875.
EVAL_CROP_FRACTION = 0.875
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its fallback
_ALG = "philox"  # fixed, so streams do not depend on which device TF picks ("auto_select")
_SEED_TAG = 0x5EED  # second word of the root key, so seed s and the key [s, 0] never collide


def _options(source: DataSource) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # Off (`data.autotune=False`): no autotuning thread; AUTOTUNE parallelism falls back to
    # min(16, cores) and prefetch buffers to their defaults. The examples and their order are
    # the same either way (deterministic).
    options.autotune.enabled = source.autotune
    return options


# ---------------------------------------------------------------------------------------------
# Stateless keys: a key is an int64 tensor of shape [2], as the tf.random.stateless_* ops take.


def _fold_in(key: tf.Tensor, data) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=_ALG)


def _root_key(seed: int) -> tf.Tensor:
    return tf.constant([seed % (1 << 63), _SEED_TAG], tf.int64)


def _uniform(key: tf.Tensor, shape, minval=0.0, maxval=1.0) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, key, minval, maxval, tf.float32, alg=_ALG)


# ---------------------------------------------------------------------------------------------
# Geometry


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    """HxWxC (C in 1, 3, 4 or unknown) -> HxWx3."""
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 1:
        return tf.tile(image, [1, 1, 3])
    if channels == 4:
        return image[..., :3]
    image = tf.cond(
        tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image[..., :3]
    )
    return tf.ensure_shape(image, [None, None, 3])


def _resize(image: tf.Tensor, size, antialias: bool = True) -> tf.Tensor:
    return tf.image.resize(image, size, method="bilinear", antialias=antialias)


def _crop_box(
    key: tf.Tensor, height: tf.Tensor, width: tf.Tensor, scale: tuple[float, float]
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """torchvision RandomResizedCrop.get_params, vectorised over its 10 attempts.

    Returns (top, left, crop_height, crop_width) as int32 scalars.
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    k_area, k_ratio, k_pos = tf.unstack(tf.random.experimental.stateless_split(key, 3, alg=_ALG))
    area = h * w * _uniform(k_area, [RRC_ATTEMPTS], scale[0], scale[1])
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    aspect = tf.exp(_uniform(k_ratio, [RRC_ATTEMPTS], log_lo, log_hi))
    cw = tf.round(tf.sqrt(area * aspect))
    ch = tf.round(tf.sqrt(area / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)  # first valid attempt

    # Fallback: the largest centred box whose aspect ratio is clamped into RRC_RATIO.
    in_ratio = w / h
    fw = tf.where(in_ratio > RRC_RATIO[1], tf.round(h * RRC_RATIO[1]), w)
    fh = tf.where(in_ratio < RRC_RATIO[0], tf.round(w / RRC_RATIO[0]), h)

    found = tf.reduce_any(ok)
    ch = tf.where(found, ch[first], fh)
    cw = tf.where(found, cw[first], fw)
    # torch.randint(0, H - h + 1): uniform integer offsets; the fallback is centred.
    u = _uniform(k_pos, [2])
    top = tf.where(found, tf.floor(u[0] * (h - ch + 1)), tf.floor((h - ch) / 2))
    left = tf.where(found, tf.floor(u[1] * (w - cw + 1)), tf.floor((w - cw) / 2))
    top = tf.minimum(top, h - ch)  # guards u == 1 - eps rounding up
    left = tf.minimum(left, w - cw)
    return tuple(tf.cast(v, tf.int32) for v in (top, left, ch, cw))


def _random_view(
    image: tf.Tensor, key: tf.Tensor, image_size: int, scale: tuple[float, float],
    flip_p: float = 0.5, antialias: bool = True,
) -> tf.Tensor:
    """Random-resized crop + horizontal flip of a decoded HxWxC image -> uint8 SxSx3."""
    k_crop, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2, alg=_ALG))
    shape = tf.shape(image)
    top, left, ch, cw = _crop_box(k_crop, shape[0], shape[1], scale)
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([ch, cw, -1]))
    return _resize_flip(crop, k_flip, image_size, flip_p, antialias)


def _fused_random_view(
    jpeg: tf.Tensor, key: tf.Tensor, image_size: int, scale: tuple[float, float],
    flip_p: float = 0.5, antialias: bool = True,
) -> tf.Tensor:
    """`_random_view` of JPEG bytes that decodes only the crop (`decode_and_crop_jpeg`): the
    same keys, box, resize and flip. Bitwise equal to `_random_view(decode(jpeg))` for JPEGs
    without chroma subsampling; with it (most photos), libjpeg upsamples the chroma at the
    crop's left and right edges from fewer neighbours, which changes a few edge pixels (up to
    25 levels on 0.09 % of the pixels of the benchmark's 4:2:0 JPEGs, before the resize)."""
    k_crop, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2, alg=_ALG))
    shape = tf.image.extract_jpeg_shape(jpeg)
    top, left, ch, cw = _crop_box(k_crop, shape[0], shape[1], scale)
    crop = tf.image.decode_and_crop_jpeg(jpeg, tf.stack([top, left, ch, cw]), channels=3)
    return _resize_flip(crop, k_flip, image_size, flip_p, antialias)


def _resize_flip(crop: tf.Tensor, k_flip: tf.Tensor, image_size: int, flip_p: float,
                 antialias: bool) -> tf.Tensor:
    view = _resize(crop, [image_size, image_size], antialias)
    view = tf.cond(_uniform(k_flip, []) < flip_p, lambda: tf.reverse(view, [1]), lambda: view)
    return _to_rgb(_to_uint8(view))


def _pad_crop_view(
    image: tf.Tensor, key: tf.Tensor, image_size: int, padding: int, flip_p: float = 0.5
) -> tf.Tensor:
    """torchvision RandomCrop(S, padding=p) (zero fill) + horizontal flip -> uint8 SxSx3.

    The CIFAR recipe (winycg/MCL `main_cifar.py`, and most CIFAR training scripts): pad the
    SxS image by p zeros on every side, then cut an SxS window at integer offsets drawn
    uniformly from [0, 2p] (torch.randint(0, H + 2p - S + 1)). An image that is not SxS is
    first resized to SxS (a no-op for CIFAR at 32; the eval view resizes such images too).
    """
    k_crop, k_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2, alg=_ALG))
    shape = tf.shape(image)
    image = tf.cond(
        (shape[0] == image_size) & (shape[1] == image_size),
        lambda: tf.cast(image, tf.float32),
        lambda: _resize(image, [image_size, image_size]),
    )
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    span = 2 * padding + 1
    offsets = tf.minimum(tf.floor(_uniform(k_crop, [2]) * span), span - 1)  # u -> 1 guard
    offsets = tf.cast(offsets, tf.int32)
    view = tf.slice(padded, tf.stack([offsets[0], offsets[1], 0]),
                    [image_size, image_size, -1])
    view = tf.cond(_uniform(k_flip, []) < flip_p, lambda: tf.reverse(view, [1]), lambda: view)
    return _to_rgb(_to_uint8(view))


TRAIN_CROPS = ("random_resized", "pad_crop")


def _eval_view(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resize short side to image_size/0.875 then centre-crop; small images are just resized."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short_target = round(image_size / EVAL_CROP_FRACTION)

    def resize_and_crop() -> tf.Tensor:
        # torchvision Resize(int): short side -> target, long side truncated proportionally.
        short = tf.minimum(h, w)
        new_h = tf.where(h <= w, short_target, (short_target * h) // short)
        new_w = tf.where(h <= w, (short_target * w) // short, short_target)
        resized = _resize(image, tf.stack([new_h, new_w]))
        top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2), tf.int32)
        left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2), tf.int32)
        return tf.slice(resized, tf.stack([top, left, 0]), [image_size, image_size, -1])

    def resize_only() -> tf.Tensor:
        # CIFAR / digits: the whole image is the object; do not crop away its border.
        return _resize(image, [image_size, image_size])

    out = tf.cond(tf.maximum(h, w) <= image_size, resize_only, resize_and_crop)
    out = tf.ensure_shape(out, [image_size, image_size, image.shape[-1]])
    return _to_rgb(_to_uint8(out))


# ---------------------------------------------------------------------------------------------
# Datasets


def validate(data_cfg, augment_cfg=None) -> None:
    """The `data` options the pipeline and the normalisation read (and the `augment` block):
    one-line ConfigErrors before anything is built."""
    from disco_jax.data import augment

    train_crop = data_cfg.get("train_crop", "random_resized")
    if train_crop not in TRAIN_CROPS:
        raise ConfigError(f"data.train_crop must be one of {', '.join(TRAIN_CROPS)}, got"
                          f" {train_crop!r}")
    padding = data_cfg.get("crop_padding", 4)
    if not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ConfigError(f"data.crop_padding must be an integer >= 0, got {padding!r}")
    _check_fused(data_cfg.get("fused_decode", False), train_crop)
    check_bool("data.antialias", data_cfg.get("antialias", True))
    augment.check_stats(data_cfg.get("mean", augment.IMAGENET_MEAN),
                        data_cfg.get("std", augment.IMAGENET_STD))
    if augment_cfg is not None:
        augment.validate(augment_cfg)


def _check_fused(fused: Any, train_crop: str) -> None:
    check_bool("data.fused_decode", fused)
    if fused and train_crop != "random_resized":
        raise ConfigError("data.fused_decode decodes random-resized crops only; it cannot be"
                          f" combined with data.train_crop={train_crop!r}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def steps_per_epoch(
    source: DataSource, *, split: str, local_batch: int, process_count: int = 1
) -> int:
    """Training steps in one epoch: every process drops the same remainder."""
    _check_positive(local_batch=local_batch, process_count=process_count)
    return source.shard_size(split, 0, process_count, drop_remainder=True) // local_batch


def train_dataset(
    source: DataSource,
    *,
    split: str,
    views: int,
    image_size: int,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    flip_p: float = 0.5,
    train_crop: str = "random_resized",
    crop_padding: int = 4,
    local_batch: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    shuffle_buffer: int = 50_000,
    small_crops: int = 0,
    small_size: int = 96,
    small_scale: tuple[float, float] = (0.05, 0.14),
    per_class: int = 0,
    with_index: bool = False,
    fused_decode: bool = False,
    antialias: bool = True,
) -> tf.data.Dataset:
    """Infinite stream of this process's training batches, a pure function of (seed, step).

    Yields `{"image", "label"}` (views=1) or `{"view1", "view2", "label"}` (views=2; one decode,
    two independent crops). Images are uint8 (local_batch, S, S, 3); labels int64. With
    `small_crops=n` (SwAV-style multi-crop) it also yields `crops`, uint8
    (local_batch, n, small_size, small_size, 3), random-resized with `small_scale`.
    `with_index=True` adds `index`, each example's int64 position in the split (memory banks).
    `per_class=m` replaces the epoch shuffle by a class-balanced sampler (`class_balanced_ids`):
    every local batch is local_batch / m distinct classes with m examples each.
    `train_crop` picks the large views' geometry: "random_resized" (RandomResizedCrop with
    `crop_scale`, the ImageNet recipes) or "pad_crop" (RandomCrop with `crop_padding` zeros,
    CIFAR); both then flip with `flip_p`. Multi-crop `crops` are always random-resized.
    `fused_decode=True` (random-resized crops only) decodes each crop of a JPEG alone with
    `tf.image.decode_and_crop_jpeg` instead of decoding the whole image once (other formats
    are decoded whole, as without it); see `_fused_random_view` for the few edge pixels in
    which it differs from the default, which decodes as the official PyTorch code (PIL) does.
    `antialias=False` resizes the random-resized crops with plain bilinear interpolation
    instead of the antialiased one (PIL's, and torchvision's on tensors, so the default); it
    aliases when a crop is shrunk, and it is about twice as fast on a CPU (BENCHMARKS.md).
    """
    if views not in (1, 2):
        raise ConfigError(f"views must be 1 or 2, got {views!r}")
    if train_crop not in TRAIN_CROPS:
        raise ConfigError(f"data.train_crop must be one of {', '.join(TRAIN_CROPS)}, got"
                          f" {train_crop!r}")
    if not isinstance(crop_padding, (int, np.integer)) or crop_padding < 0:
        raise ConfigError(f"data.crop_padding must be an integer >= 0, got {crop_padding!r}")
    _check_positive(image_size=image_size, local_batch=local_batch, shuffle_buffer=shuffle_buffer)
    lo, hi = (float(v) for v in crop_scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale!r}")
    _check_fused(fused_decode, train_crop)
    check_bool("data.antialias", antialias)
    if start_step < 0:
        raise ConfigError(f"start_step must be >= 0, got {start_step}")
    if small_crops:
        _check_positive(small_crops=small_crops, small_size=small_size)
        if not 0.0 < small_scale[0] <= small_scale[1] <= 1.0:
            raise ConfigError(
                f"small_scale must satisfy 0 < min <= max <= 1, got {small_scale!r}"
            )

    shard = source.shard_size(split, process_index, process_count, drop_remainder=True)
    steps = shard // local_batch
    if steps == 0:
        raise ConfigError(
            f"split {split!r} of {source.name} gives each of {process_count} process(es) "
            f"{shard} examples, fewer than local_batch={local_batch}; use a smaller batch"
        )
    per_epoch = steps * local_batch
    start_epoch, start_batch = divmod(start_step, steps)
    skip = start_batch * local_batch

    # Encoded bytes: shuffling, dropping and skipping them costs no decode.
    base = source.dataset(split, process_index, process_count, drop_remainder=True, decode=False)
    if with_index or per_class:
        offset = shard_bounds(source.num_examples(split), process_index, process_count, True)[0]
        base = base.enumerate().map(no_autograph(lambda i, ex: {**ex, "index": i + offset}))
    buffer = min(shard, shuffle_buffer)  # small data: a full shuffle of the shard
    root = _root_key(seed)

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        epoch_key = _fold_in(root, e)
        # Key -1 is the shuffle's; example positions fold in 0, 1, 2, ...
        shuffle_seed = _fold_in(epoch_key, -1)[0]
        ds = base.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        ds = ds.take(per_epoch).enumerate()
        ds = ds.skip(tf.where(e == start_epoch, tf.constant(skip, tf.int64), 0))
        return ds.map(no_autograph(lambda pos, ex: (_fold_in(epoch_key, pos), ex)))

    def crops(view: Callable[[tf.Tensor, int, tuple[float, float]], tf.Tensor],
              key: tf.Tensor, image: tf.Tensor | None = None) -> dict:
        """Every view of one example; `view(key, size, scale)` is a random-resized crop, and
        pad_crop cuts the decoded `image`."""
        def large_view(k: tf.Tensor) -> tf.Tensor:
            if train_crop == "pad_crop":
                return _pad_crop_view(image, k, image_size, int(crop_padding), flip_p)
            return view(k, image_size, (lo, hi))

        out = {"image": large_view(key)} if views == 1 else {
            f"view{v}": large_view(_fold_in(key, v)) for v in (1, 2)}
        if small_crops:
            # Keys 100+i: independent of the large views' keys 1, 2.
            out["crops"] = tf.stack([view(_fold_in(key, 100 + i), small_size, tuple(small_scale))
                                     for i in range(small_crops)])
        return out

    def decoded_crops(encoded: tf.Tensor, key: tf.Tensor) -> dict:
        image = source.decode(encoded)

        def view(k: tf.Tensor, size: int, scale: tuple[float, float]) -> tf.Tensor:
            return _random_view(image, k, size, scale, flip_p, antialias)

        return crops(view, key, image)

    def fused_crops(jpeg: tf.Tensor, key: tf.Tensor) -> dict:
        return crops(lambda k, size, scale: _fused_random_view(jpeg, k, size, scale, flip_p,
                                                               antialias), key)

    def decode_and_crop(key: tf.Tensor, ex: dict) -> dict:
        if fused_decode:
            out = tf.cond(tf.io.is_jpeg(ex["image"]), lambda: fused_crops(ex["image"], key),
                          lambda: decoded_crops(ex["image"], key))
        else:
            out = decoded_crops(ex["image"], key)
        out["label"] = ex["label"]
        if with_index:
            out["index"] = ex["index"]
        return out

    # Epoch numbers up to 2**62: practically infinite, and start_epoch is skipped arithmetically.
    ds = tf.data.Dataset.range(start_epoch, 1 << 62).flat_map(no_autograph(epoch))
    if per_class:
        ds = _class_balanced_stream(base, shard, local_batch, per_class, root, start_step)
    ds = ds.map(no_autograph(decode_and_crop), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(source))


def class_balanced_ids(
    key: tf.Tensor, members: tf.Tensor, counts: tf.Tensor, num_classes: int, per_class: int
) -> tf.Tensor:
    """One batch of a stateless MPerClassSampler (pytorch-metric-learning, MCL's CIFAR sampler).

    `members` (C, max_count) holds each class's example positions (padded), `counts` (C,).
    Picks `num_classes` distinct classes uniformly, then `per_class` distinct members of each
    (with repetition only when a class has fewer than `per_class` examples, as PML does).
    Returns (num_classes * per_class,) positions, each class's examples adjacent.
    """
    k_cls, k_mem = tf.unstack(tf.random.experimental.stateless_split(key, 2, alg=_ALG))
    total = tf.shape(counts)[0]
    classes = tf.math.top_k(_uniform(k_cls, [total]), k=num_classes).indices
    count = tf.gather(counts, classes)  # (c,)
    width = tf.shape(members)[1]
    scores = _uniform(k_mem, tf.stack([num_classes, width]))
    scores = tf.where(tf.range(width)[None, :] < count[:, None], scores, -1.0)
    order = tf.math.top_k(scores, k=per_class).indices  # valid members first, random order
    order = tf.gather(order, tf.range(per_class)[None, :] % count[:, None], batch_dims=1)
    return tf.reshape(tf.gather(tf.gather(members, classes), order, batch_dims=1), [-1])


def _class_balanced_stream(
    base: tf.data.Dataset, shard: int, local_batch: int, per_class: int, root: tf.Tensor,
    start_step: int,
) -> tf.data.Dataset:
    """(key, example) pairs, local_batch per step, step s drawn from key (seed, -2, s) alone.

    The shard's encoded examples are held in memory (random access; meant for CIFAR-sized
    data), so resuming at `start_step` just starts the step range there.
    """
    if local_batch % per_class:
        raise ConfigError(
            f"the local batch {local_batch} must be a multiple of per_class={per_class}"
        )
    data = base.batch(shard).get_single_element()
    labels = data["label"].numpy()
    classes = np.unique(labels)
    if local_batch // per_class > len(classes):
        raise ConfigError(
            f"per_class={per_class} needs {local_batch // per_class} distinct classes per batch"
            f" of {local_batch}, the data has {len(classes)};"
            f" use a batch <= {per_class * len(classes)}"
        )
    groups = [np.flatnonzero(labels == c) for c in classes]
    width = max(per_class, *(len(g) for g in groups))  # top_k needs >= per_class columns
    members = np.stack([np.pad(g, (0, width - len(g))) for g in groups]).astype(np.int64)
    members = tf.constant(members)
    counts = tf.constant([len(g) for g in groups], tf.int32)
    sampler_key = _fold_in(root, -2)  # epoch keys fold in e >= 0: no collision

    def step(s: tf.Tensor) -> tf.data.Dataset:
        key = _fold_in(sampler_key, s)
        ids = class_balanced_ids(key, members, counts, local_batch // per_class, per_class)
        keys = tf.map_fn(lambda p: _fold_in(key, p), tf.range(local_batch, dtype=tf.int64))
        examples = {k: tf.gather(v, ids) for k, v in data.items()}
        return tf.data.Dataset.from_tensor_slices((keys, examples))

    return tf.data.Dataset.range(start_step, 1 << 62).flat_map(no_autograph(step))


def eval_batches(
    source: DataSource, *, split: str, local_batch: int, process_count: int = 1
) -> int:
    """Batches every process yields from `eval_dataset` (the same number on all of them)."""
    _check_positive(local_batch=local_batch, process_count=process_count)
    largest_shard = -(-source.num_examples(split) // process_count)
    return -(-largest_shard // local_batch)


def eval_dataset(
    source: DataSource,
    *,
    split: str,
    image_size: int,
    local_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """Every example of `split` exactly once over all processes, as full padded batches.

    Yields `{"image": uint8 (b,S,S,3), "label": int32, "mask": bool}`. Padding examples have
    mask False. Every process yields `eval_batches(...)` batches, so a collective-using eval
    step never waits on a process that has run out (big_vision's pad-and-mask).
    """
    _check_positive(image_size=image_size)
    num_batches = eval_batches(
        source, split=split, local_batch=local_batch, process_count=process_count
    )
    shard = source.shard_size(split, process_index, process_count, drop_remainder=False)
    pad = num_batches * local_batch - shard

    def prepare(ex: dict) -> dict:
        return {
            "image": _eval_view(source.decode(ex["image"]), image_size),
            "label": tf.cast(ex["label"], tf.int32),
            "mask": tf.constant(True),
        }

    ds = source.dataset(split, process_index, process_count, drop_remainder=False, decode=False)
    ds = ds.map(no_autograph(prepare), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    padding = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros([image_size, image_size, 3], tf.uint8),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(False),
        }
    ).repeat(pad)
    # The total is a multiple of local_batch, so drop_remainder drops nothing; it only makes
    # the batch dimension static.
    ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(source))


# ---------------------------------------------------------------------------------------------
# Host -> device


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, axis: str = "data") -> dict[str, jax.Array]:
    """Process-local numpy batch -> global jax.Arrays sharded along the batch dim on `axis`."""
    sharding = NamedSharding(mesh, P(axis))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def global_iterator(
    ds: tf.data.Dataset, mesh: Mesh, prefetch: int = 2, axis: str = "data"
) -> Iterator[dict[str, jax.Array]]:
    """Iterates `ds` as global batches, keeping `prefetch` host->device copies in flight."""
    it = ds.as_numpy_iterator()
    queue: collections.deque = collections.deque()

    def enqueue(n: int) -> None:
        for _ in range(n):
            try:
                batch = next(it)
            except StopIteration:
                return
            queue.append(to_global(batch, mesh, axis))

    enqueue(max(prefetch, 1))
    while queue:
        yield queue.popleft()
        enqueue(1)
