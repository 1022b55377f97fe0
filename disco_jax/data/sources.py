"""Where examples come from: TFDS datasets (the embedded `digits` included) and image folders.

`get_source(cfg)` turns a data config into a `DataSource`. A source knows its splits, their sizes
and its number of classes. It can read one process's shard of a split as a tf.data stream of
`{"image", "label"}` dicts, always in the same order. Shuffling and augmentation happen in
`pipeline.py`, never here.

Every name except `folder:` goes through `tfds.builder(name, data_dir=...)`. That includes the
embedded `digits`, which `ensure_digits` first writes as a real TFDS dataset. So the test suite
exercises the same reader that ImageNet uses. Nothing here downloads: an unprepared dataset is a
`ConfigError` that says how to prepare it.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from disco_jax.data._tf import (  # TF on first use (GPUs hidden): see _tf.py
    import_tfds,
    no_autograph,
    tf,
)
from disco_jax.errors import ConfigError, unknown_name

FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# (split, start, end, decode) -> dataset of {"image", "label"}, examples [start, end) of the split.
_ReadFn = Callable[[str, int, int, bool], "tf.data.Dataset"]  # a string: no TF import here


def shard_bounds(
    num_examples: int, process_index: int, process_count: int, drop_remainder: bool
) -> tuple[int, int]:
    """The [start, end) example range of one process's contiguous shard of a split.

    With `drop_remainder` every process gets exactly `num_examples // process_count` examples
    (training: equal step counts everywhere). Without it the shards cover every example exactly
    once and differ in size by at most one (evaluation, which pads to equal batch counts).
    """
    if not 0 <= process_index < process_count:
        raise ConfigError(
            f"process_index {process_index} is outside [0, {process_count}); "
            "pass jax.process_index() and jax.process_count()"
        )
    if drop_remainder:
        size = num_examples // process_count
        return process_index * size, (process_index + 1) * size
    return (
        process_index * num_examples // process_count,
        (process_index + 1) * num_examples // process_count,
    )


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A labelled image dataset with named splits, read shard by shard in a fixed order."""

    name: str
    num_classes: int
    splits: Mapping[str, int]  # split name -> number of examples
    _read: _ReadFn = dataclasses.field(repr=False)
    _decode: Callable[[tf.Tensor], tf.Tensor] = dataclasses.field(repr=False)
    version: str | None = None  # recorded in run_info.json (TFDS version; None for folders)
    # tf.data autotuning (`data.autotune`) of the pipelines built on this source: what the
    # pipeline's options read (`pipeline.train_dataset` / `eval_dataset`), not the examples.
    autotune: bool = True

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise unknown_name("split", split, self.splits)

    def num_examples(self, split: str) -> int:
        self.check_split(split)
        return self.splits[split]

    def shard_size(
        self,
        split: str,
        process_index: int = 0,
        process_count: int = 1,
        drop_remainder: bool = True,
    ) -> int:
        start, end = shard_bounds(
            self.num_examples(split), process_index, process_count, drop_remainder
        )
        return end - start

    def decode(self, image: tf.Tensor) -> tf.Tensor:
        """Encoded image bytes (from `dataset(..., decode=False)`) -> uint8 HxWxC tensor."""
        return self._decode(image)

    def dataset(
        self,
        split: str,
        process_index: int = 0,
        process_count: int = 1,
        *,
        drop_remainder: bool = True,
        decode: bool = True,
    ) -> tf.data.Dataset:
        """This process's shard of `split` as `{"image": uint8 HxWxC, "label": int64}` dicts.

        The order is fixed (no file shuffling, deterministic interleave). `decode=False` yields
        the encoded bytes instead, so a pipeline can shuffle and skip before paying for decoding;
        call `decode` on them later. See `shard_bounds` for `drop_remainder`.
        """
        start, end = shard_bounds(
            self.num_examples(split), process_index, process_count, drop_remainder
        )
        ds = self._read(split, start, end, decode)
        return self._decoded(ds) if decode else ds

    def _decoded(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """Encoded examples -> decoded ones, in order."""
        return ds.map(
            no_autograph(lambda ex: {"image": self._decode(ex["image"]), "label": ex["label"]}),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )


def _deterministic_options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    # Works for dicts and ml_collections.ConfigDict alike.
    try:
        value = cfg[key]
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


# ---------------------------------------------------------------------------------------------
# TFDS


def _unknown_tfds_name(name: str) -> ConfigError:
    tfds = import_tfds()

    close = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(), n=4, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return ConfigError(
        f"unknown dataset {name!r}: not a TFDS dataset, not 'digits' and not 'folder:/path'{hint}"
    )


def _prepare_hint(name: str, data_dir: str) -> str:
    if name.split("/")[0] == "imagenet2012":
        return (
            f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in "
            f"{os.path.join(data_dir, 'downloads', 'manual')}/ and run "
            f"`tfds build imagenet2012 --data_dir {data_dir}`"
        )
    return (
        f"on a machine with network access run `tfds build {name} --data_dir {data_dir}` and "
        "copy that directory here, or point data.data_dir at an existing copy"
    )


def _tfds_source(name: str, data_dir: str | None) -> DataSource:
    tfds = import_tfds()

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise _unknown_tfds_name(name) from None
    if not builder.is_prepared():
        root = data_dir or str(getattr(builder, "data_dir_root", builder.data_dir))
        raise ConfigError(
            f"TFDS dataset {name!r} is not prepared in {root} (no {builder.data_dir}) and "
            f"disco_jax never downloads: {_prepare_hint(name, root)}"
        )
    info = builder.info
    image_key, label_key = info.supervised_keys or ("image", "label")
    features = info.features
    if not isinstance(image_key, str) or image_key not in features or label_key not in features:
        raise ConfigError(
            f"TFDS dataset {name!r} has no (image, label) features (it has "
            f"{', '.join(features.keys())}); use an image classification dataset"
        )
    image_feature = features[image_key]
    if not isinstance(image_feature, tfds.features.Image):
        raise ConfigError(f"TFDS dataset {name!r}: feature {image_key!r} is not an image")
    splits = {split: info.splits[split].num_examples for split in info.splits.keys()}
    read_config = tfds.ReadConfig(options=_deterministic_options(), add_tfds_id=False)

    def read(split: str, start: int, end: int, decode: bool) -> tf.data.Dataset:
        # Absolute slicing keeps every shard's size explicit and identical across sources.
        ds = builder.as_dataset(
            split=f"{split}[{start}:{max(end, start + 1)}]",
            shuffle_files=False,
            read_config=read_config,
            decoders={image_key: tfds.decode.SkipDecoding()},
        )
        if end <= start:  # TFDS rejects empty slices; keep the element spec, yield nothing.
            ds = ds.take(0)
        return ds.map(no_autograph(
            lambda ex: {"image": ex[image_key], "label": tf.cast(ex[label_key], tf.int64)}
        ))

    def decode(image: tf.Tensor) -> tf.Tensor:
        return image_feature.decode_example(image)

    return DataSource(
        name=name,
        num_classes=int(features[label_key].num_classes),
        splits=splits,
        _read=read,
        _decode=decode,
        version=str(info.version),
    )


# ---------------------------------------------------------------------------------------------
# Image folders


def _list_split(split_dir: str) -> dict[str, list[str]]:
    """class name -> sorted image paths, for every class sub-folder of `split_dir`."""
    classes: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir():
            classes[entry.name] = sorted(
                os.path.join(entry.path, f)
                for f in os.listdir(entry.path)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
    return classes


# Magic numbers of the formats tf.io.decode_image reads here; anything else would fail mid-run.
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def _looks_like_image(path: str) -> bool:
    """A cheap check (header bytes and a JPEG/PNG trailer) that catches empty, truncated and
    non-image files at start-up instead of as a decode error hours into a run."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if size < 16 or not head.startswith(_MAGIC):
                return False
            # Some writers pad after the end marker: look for it in the last 4 KiB.
            f.seek(max(size - 4096, 0))
            tail = f.read()
    except OSError:
        return False
    if head.startswith(_MAGIC[0]):
        return b"IEND" in tail
    return b"\xff\xd9" in tail


def _drop_bad_images(root: str, listing: dict, bad_images: str) -> None:
    """Remove unreadable files from `listing` in place ('skip'), or raise ('error')."""
    bad = []
    for classes in listing.values():
        for name, paths in classes.items():
            good = [p for p in paths if _looks_like_image(p)]
            bad += sorted(set(paths) - set(good))
            classes[name] = good
    if not bad:
        return
    if bad_images == "error":
        raise ConfigError(
            f"image folder {root} has {len(bad)} corrupt or non-image file(s), e.g. {bad[0]};"
            " remove them or set data.bad_images='skip'"
        )
    logging.getLogger("disco_jax").warning(
        "image folder %s: skipped %d corrupt or non-image file(s), e.g. %s", root, len(bad), bad[0]
    )


def _folder_source(spec: str, bad_images: str = "error") -> DataSource:
    root = os.path.abspath(os.path.expanduser(spec[len(FOLDER_PREFIX) :]))
    layout = "<root>/{train,test}/<class>/*.png|jpg"
    if not os.path.isdir(os.path.join(root, "train")):
        raise ConfigError(f"image folder {root} has no train/ sub-folder; expected {layout}")
    listing = {
        entry.name: _list_split(entry.path)
        for entry in sorted(os.scandir(root), key=lambda e: e.name)
        if entry.is_dir() and not entry.name.startswith(".")
    }
    _drop_bad_images(root, listing, bad_images)
    class_names = sorted(listing["train"])
    if not any(listing["train"].values()):
        raise ConfigError(f"image folder {root}/train has no PNG/JPEG images; expected {layout}")
    class_ids = {c: i for i, c in enumerate(class_names)}

    files: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, classes in listing.items():
        extra = sorted(set(classes) - set(class_ids))
        if extra and any(classes[c] for c in extra):
            raise ConfigError(
                f"image folder {root}/{split} has classes not in train/: {', '.join(extra)}"
            )
        paths = [p for c in sorted(classes) if c in class_ids for p in classes[c]]
        labels = [class_ids[c] for c in sorted(classes) if c in class_ids for _ in classes[c]]
        if not paths:  # kept, so the error says "empty" rather than "unknown split"
            files[split] = (np.asarray([], dtype=str), np.asarray([], np.int64))
            continue
        # Listing order is class-sorted; a fixed permutation mixes classes so that every
        # process's contiguous shard sees all of them. Seed 0: the order never changes.
        perm = np.random.default_rng(0).permutation(len(paths))
        files[split] = (np.asarray(paths)[perm], np.asarray(labels, np.int64)[perm])

    def read(split: str, start: int, end: int, decode: bool) -> tf.data.Dataset:
        paths, labels = files[split]
        ds = tf.data.Dataset.from_tensor_slices(
            {"image": paths[start:end], "label": labels[start:end]}
        ).with_options(_deterministic_options())
        return ds.map(no_autograph(
            lambda ex: {"image": tf.io.read_file(ex["image"]), "label": ex["label"]}))

    def decode(image: tf.Tensor) -> tf.Tensor:
        # A folder may mix grayscale, RGB and RGBA files; one channel count keeps shapes static.
        return tf.io.decode_image(image, channels=3, expand_animations=False)

    return DataSource(
        name=f"{FOLDER_PREFIX}{root}",
        num_classes=len(class_names),
        splits={split: len(p) for split, (p, _) in files.items()},
        _read=read,
        _decode=decode,
    )


# ---------------------------------------------------------------------------------------------


def get_source(cfg: Any) -> DataSource:
    """The data source a config names: `digits`, any prepared TFDS dataset, or `folder:/path`.

    `cfg` is a mapping or ConfigDict with `name`, `data_dir` (None: the TFDS default), and
    optionally `train_split` / `eval_split`, which are checked here so a typo fails early.
    """
    name = _cfg_get(cfg, "name")
    if not isinstance(name, str) or not name:
        raise ConfigError("data.name must be 'digits', a TFDS dataset name or 'folder:/path'")
    data_dir = _cfg_get(cfg, "data_dir")
    if data_dir is not None:
        data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))

    bad_images = _cfg_get(cfg, "bad_images", "error")
    if bad_images not in ("error", "skip"):  # checked for every source: a typo fails anywhere
        raise ConfigError(f"data.bad_images must be 'error' or 'skip', got {bad_images!r}")
    autotune = _cfg_get(cfg, "autotune", True)
    check_bool("data.autotune", autotune)  # every source, the evaluators' data configs too
    if name.startswith(FOLDER_PREFIX):
        source = _folder_source(name, bad_images)
    else:
        if name == "digits":
            from disco_jax.data.digits import ensure_digits

            data_dir = ensure_digits(data_dir)
        source = _tfds_source(name, data_dir)

    for key in ("train_split", "eval_split"):
        split = _cfg_get(cfg, key)
        if split is not None:
            source.check_split(split)
    extra = _cfg_get(cfg, "extra", ())
    if extra:
        source = with_extra(source, _cfg_get(cfg, "train_split", "train"), extra, data_dir)
    return dataclasses.replace(source, autotune=bool(autotune))


# ---------------------------------------------------------------------------------------------
# Extra (unlabelled) training data mixed into one split: SSLD's ImageNet-1k + mined images.


def interleave_order(sizes: list[int]) -> np.ndarray:
    """Source id of each position of a deterministic, evenly spread merge of `sizes` examples.

    Example k of part j sits at (k + 0.5) / n_j along the merged stream (ties: lower j first),
    so every contiguous shard holds every part in proportion, whatever the shuffle buffer.
    """
    keys = np.concatenate([(np.arange(n) + 0.5) / n for n in sizes])
    ids = np.concatenate([np.full(n, j, np.int64) for j, n in enumerate(sizes)])
    return ids[np.argsort(keys, kind="stable")]


@dataclasses.dataclass(frozen=True)
class MixedSource(DataSource):
    """`base` with extra sources mixed into the *training* stream of one split.

    The training view of `split` (`drop_remainder=True`: what `pipeline.train_dataset` and
    `steps_per_epoch` read) is the interleave of the split and every extra part; extra examples
    carry label -1 (unlabelled; their own label space is never used). The evaluation view
    (`drop_remainder=False`: every example once, as `eval_dataset` reads) and `num_examples` stay
    those of the labelled split alone, so kNN / linear evaluation never sees the extras.
    """

    split: str = ""
    parts: tuple = ()  # ((DataSource, split), ...), the labelled split first
    order: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def _mixed(self, split: str, drop_remainder: bool) -> bool:
        return drop_remainder and split == self.split

    def shard_size(self, split, process_index=0, process_count=1, drop_remainder=True) -> int:
        if not self._mixed(split, drop_remainder):
            return super().shard_size(split, process_index, process_count, drop_remainder)
        start, end = shard_bounds(len(self.order), process_index, process_count, True)
        return end - start

    def dataset(self, split, process_index=0, process_count=1, *, drop_remainder=True,
                decode=True) -> tf.data.Dataset:
        if not self._mixed(split, drop_remainder):
            return super().dataset(split, process_index, process_count,
                                   drop_remainder=drop_remainder, decode=decode)
        start, end = shard_bounds(len(self.order), process_index, process_count, True)
        choice = self.order[start:end]
        streams = []
        for j, (src, part_split) in enumerate(self.parts):
            lo = int(np.count_nonzero(self.order[:start] == j))
            hi = lo + int(np.count_nonzero(choice == j))
            ds = src._read(part_split, lo, hi, False)
            if j:
                ds = ds.map(no_autograph(
                    lambda ex: {"image": ex["image"], "label": tf.constant(-1, tf.int64)}))
            streams.append(ds)
        ds = tf.data.Dataset.choose_from_datasets(
            streams, tf.data.Dataset.from_tensor_slices(choice), stop_on_empty_dataset=False
        ).with_options(_deterministic_options())
        return self._decoded(ds) if decode else ds


def with_extra(base: DataSource, split: str, extra: Any, data_dir: str | None) -> DataSource:
    """`base` whose training stream of `split` also yields every `extra` source's examples.

    `extra` is a sequence of `{"name": ..., "split": "train", "data_dir": optional}` (any name
    `get_source` takes). Deterministic: the merged order is fixed, so the pipeline's stream stays
    a pure function of (seed, step).
    """
    parts = [(base, split)]
    for i, spec in enumerate(extra):
        name = _cfg_get(spec, "name")
        if not name:
            raise ConfigError(f"data.extra[{i}] needs a 'name' (a dataset like data.name)")
        src = get_source({"name": name, "data_dir": _cfg_get(spec, "data_dir", data_dir)})
        part_split = _cfg_get(spec, "split", "train")
        src.check_split(part_split)
        parts.append((src, part_split))
    order = interleave_order([s.num_examples(sp) for s, sp in parts])

    def decode(image: tf.Tensor) -> tf.Tensor:
        # The parts may differ in format and channels; PNG/JPEG bytes all decode to RGB here.
        return tf.io.decode_image(image, channels=3, expand_animations=False)

    return MixedSource(name=f"{base.name}+extra", num_classes=base.num_classes,
                       splits=base.splits, _read=base._read, _decode=decode, split=split,
                       parts=tuple(parts), order=order)


# ---------------------------------------------------------------------------------------------
# A fixed subset of one split (semi-supervised evaluation on data without official subsets).


def split_labels(source: DataSource, split: str) -> np.ndarray:
    """The labels of every example of `split`, in the source's fixed order (no decode)."""
    ds = source.dataset(split, 0, 1, drop_remainder=False, decode=False)
    return np.fromiter((int(ex["label"]) for ex in ds.as_numpy_iterator()), np.int64)


def per_class_subset(labels: np.ndarray, fraction: float = 0.0, per_class: int = 0,
                     seed: int = 0) -> np.ndarray:
    """Sorted positions of a class-balanced subset: `per_class` examples of each class, or
    max(1, round(fraction * n_c)) of a class with n_c examples; drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = per_class if per_class > 0 else max(1, int(round(fraction * len(members))))
        picked.append(rng.permutation(members)[: min(n, len(members))])
    return np.sort(np.concatenate(picked))


def subset(source: DataSource, split: str, ids: np.ndarray, new_split: str) -> DataSource:
    """`source` with one more split, `new_split`: the examples of `split` at positions `ids`.

    The subset streams through the full split and keeps the chosen positions (cheap for the
    small data this is meant for; ImageNet has TFDS's own `imagenet2012_subset`)."""
    ids = np.asarray(sorted(int(i) for i in ids), np.int64)
    keep = np.zeros(source.num_examples(split), bool)
    keep[ids] = True
    keep_t = tf.constant(keep)

    def read(s: str, start: int, end: int, decode: bool) -> tf.data.Dataset:
        if s != new_split:
            return source._read(s, start, end, decode)
        ds = source._read(split, 0, source.num_examples(split), decode)
        ds = ds.enumerate().filter(no_autograph(lambda i, ex: tf.gather(keep_t, i)))
        ds = ds.map(no_autograph(lambda i, ex: ex))
        return ds.skip(start).take(end - start)

    return dataclasses.replace(source, splits={**source.splits, new_split: len(ids)},
                               _read=read)
