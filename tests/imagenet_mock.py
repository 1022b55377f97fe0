"""A tiny offline ImageNet, written by TFDS's own registered builders, for tests.

No machine here can download ImageNet, yet disco_jax reads it through `tfds.builder(
"imagenet2012", data_dir=...)` like any other TFDS dataset. `write_imagenet(data_dir)` makes that
path runnable: it asks the *registered* `imagenet2012` builder (and `write_imagenet_subset` the
registered `imagenet2012_subset/1pct` or `/10pct` one) to `download_and_prepare` itself, with one
change: its `_split_generators` (which would read ILSVRC2012_img_{train,val}.tar from
downloads/manual, and for the subsets download SimCLR's file lists) is replaced on that one
builder instance by in-memory examples shaped like the real generator's (`file_name`, JPEG
bytes, synset label). Everything else is TFDS's own: its features (`image` JPEG, `label`
ClassLabel(1000) from labels.txt, `file_name`), version, file names, shuffling and
dataset_info.json. The result is genuine files in `<data_dir>/imagenet2012/<VERSION>/` that any
later `tfds.builder("imagenet2012", data_dir=data_dir)` reads, in this process or another one
(unlike `tfds.testing.mock_data`, which patches `as_dataset` in-process only, ignores the
`data_dir` given and makes up split sizes).

Images are class-dependent (a colour and a stripe orientation per class, plus noise) and vary in
size (`size=(40, 64)` px by default), so the eval resize / centre-crop path runs and a model can
learn something. Labels are `num_classes_used` ImageNet classes spread over [0, 1000).

    from tests.imagenet_mock import write_imagenet, write_imagenet_subset
    write_imagenet(d)                   # imagenet2012: train 8 x 6, validation 8 x 3
    write_imagenet_subset(d, "1pct")    # imagenet2012_subset/1pct: train 8 x 2, same validation
    get_source({"name": "imagenet2012", "data_dir": d, ...})

Both writers are deterministic functions of their arguments, so a subset written with the same
`train_per_class` / `val_per_class` / `num_classes_used` / `size` / `seed` is a true subset of
the imagenet2012 train split (same file names, same bytes) with the same validation split. A
dataset already prepared in `data_dir` is left alone (the call only reports its split sizes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
import pytest

IMAGENET = "imagenet2012"
SUBSET = "imagenet2012_subset"
SUBSETS = ("1pct", "10pct")
# Training examples per class that each subset keeps by default (ImageNet's 1% is ~13 a class).
SUBSET_PER_CLASS = {"1pct": 2, "10pct": 4}
NUM_CLASSES = 1000

DEFAULTS = {
    "train_per_class": 6,
    "val_per_class": 3,
    "num_classes_used": 8,
    "size": (40, 64),
    "seed": 0,
}


def class_ids(num_classes_used: int = DEFAULTS["num_classes_used"]) -> list[int]:
    """The ImageNet label ids used: evenly spread over [0, 1000), 0 and 999 included."""
    if not 1 <= num_classes_used <= NUM_CLASSES:
        raise ValueError(f"num_classes_used must be in [1, {NUM_CLASSES}], got {num_classes_used}")
    if num_classes_used == 1:
        return [0]
    return [round(i * (NUM_CLASSES - 1) / (num_classes_used - 1)) for i in range(num_classes_used)]


def _synsets() -> list[str]:
    """The 1000 synset ids in label order: the real builder's labels.txt."""
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    return imagenet_common.label_names_file().read_text().split()


def _image(position: int, num_used: int, rng: np.random.Generator, size) -> np.ndarray:
    """A uint8 HxWx3 image of the class at `position`: its own hue and stripe angle, noisy."""
    lo, hi = (size, size) if isinstance(size, int) else size
    h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    hue = position / num_used
    # Saturated colour from the hue (a piecewise-linear HSV->RGB at S=V=1).
    colour = np.clip(np.abs((hue * 6.0 + np.array([0.0, 4.0, 2.0])) % 6.0 - 3.0) - 1.0, 0, 1)
    angle = np.pi * position / num_used
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * (xx * np.cos(angle) + yy * np.sin(angle)))
    image = 40 + 180 * colour[None, None, :] * (0.5 + 0.5 * stripes[..., None])
    image = image + rng.normal(0.0, 12.0, size=(h, w, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray) -> bytes:
    import tensorflow as tf

    return tf.io.encode_jpeg(image, quality=90).numpy()


def _examples(train_per_class, val_per_class, num_classes_used, size, seed) -> dict:
    """split -> [(key, example)] as the real generator yields them, train ordered by class."""
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError("train_per_class and val_per_class must be >= 1")
    synsets = _synsets()
    ids = class_ids(num_classes_used)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for position, label in enumerate(ids):
        for i in range(train_per_class):
            name = f"{synsets[label]}_{i}.JPEG"  # e.g. n01440764_0.JPEG, as in the train tar
            image = _jpeg(_image(position, num_classes_used, rng, size))
            train.append((name, {"file_name": name, "image": image, "label": synsets[label]}))
    # Validation files are numbered like ILSVRC2012_val_00000001.JPEG, classes interleaved.
    for _ in range(val_per_class):
        for position, label in enumerate(ids):
            name = f"ILSVRC2012_val_{len(val) + 1:08d}.JPEG"
            image = _jpeg(_image(position, num_classes_used, rng, size))
            val.append((name, {"file_name": name, "image": image, "label": synsets[label]}))
    return {"train": train, "validation": val}


@contextlib.contextmanager
def _quiet_tfds():
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(False)
    try:
        yield
    finally:
        tqdm_utils.display_progress_bar(was_active)


def _split_sizes(name: str, data_dir: str) -> dict[str, int]:
    import tensorflow_datasets as tfds

    info = tfds.builder(name, data_dir=data_dir).info
    return {split: info.splits[split].num_examples for split in info.splits.keys()}


def _prepare(name: str, data_dir: str, splits: dict) -> dict[str, int]:
    """Has the registered builder `name` write `splits` into data_dir; returns split sizes.

    Built in a temporary directory next to the target and renamed into place, so a reader
    never sees half a dataset (the same pattern as disco_jax.data.digits).
    """
    import tensorflow_datasets as tfds

    data_dir = os.path.abspath(data_dir)
    if tfds.builder(name, data_dir=data_dir).is_prepared():
        return _split_sizes(name, data_dir)
    os.makedirs(data_dir, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix=".imagenet-mock-", dir=data_dir)
    try:
        builder = tfds.builder(name, data_dir=tmp_root)
        generators = {split: iter(examples) for split, examples in splits.items()}
        config = tfds.download.DownloadConfig(
            manual_dir=os.path.join(tmp_root, "manual"),  # never read: the generators replace it
            try_download_gcs=False,
        )
        with _quiet_tfds(), mock.patch.object(
            builder, "_split_generators", lambda dl_manager: generators
        ):
            builder.download_and_prepare(
                download_dir=os.path.join(tmp_root, "downloads"), download_config=config
            )
        relative = os.path.relpath(str(builder.data_dir), tmp_root)  # e.g. imagenet2012/5.1.0
        target = os.path.join(data_dir, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.replace(os.path.join(tmp_root, relative), target)
        except OSError:  # another process won the race
            if not tfds.builder(name, data_dir=data_dir).is_prepared():
                raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return {split: len(examples) for split, examples in splits.items()}


def write_imagenet(
    data_dir: str,
    *,
    train_per_class: int = DEFAULTS["train_per_class"],
    val_per_class: int = DEFAULTS["val_per_class"],
    num_classes_used: int = DEFAULTS["num_classes_used"],
    size: int | tuple[int, int] = DEFAULTS["size"],
    seed: int = DEFAULTS["seed"],
) -> dict[str, int]:
    """Writes a tiny `imagenet2012` (splits train, validation) into data_dir; returns sizes.

    `size`: image side in px, or a (min, max) range each image's height and width are drawn
    from. Labels are `class_ids(num_classes_used)`; train has `train_per_class` images of each,
    validation `val_per_class`.
    """
    return _prepare(
        IMAGENET, data_dir,
        _examples(train_per_class, val_per_class, num_classes_used, size, seed),
    )


def write_imagenet_subset(
    data_dir: str,
    subset: str = "1pct",
    *,
    per_class: int | None = None,
    train_per_class: int = DEFAULTS["train_per_class"],
    val_per_class: int = DEFAULTS["val_per_class"],
    num_classes_used: int = DEFAULTS["num_classes_used"],
    size: int | tuple[int, int] = DEFAULTS["size"],
    seed: int = DEFAULTS["seed"],
) -> dict[str, int]:
    """Writes `imagenet2012_subset/<subset>` (1pct or 10pct) into data_dir; returns sizes.

    Its train split is the first `per_class` (default `SUBSET_PER_CLASS[subset]`) training
    images of every class of the imagenet2012 that `write_imagenet` writes with the same
    arguments; its validation split is that dataset's validation split.
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    per_class = SUBSET_PER_CLASS[subset] if per_class is None else per_class
    if not 1 <= per_class <= train_per_class:
        raise ValueError(f"per_class must be in [1, train_per_class={train_per_class}]")
    splits = _examples(train_per_class, val_per_class, num_classes_used, size, seed)
    # Train is ordered by class, train_per_class images each: keep the first per_class of each.
    splits["train"] = [
        ex for i, ex in enumerate(splits["train"]) if i % train_per_class < per_class
    ]
    return _prepare(f"{SUBSET}/{subset}", data_dir, splits)


def write_all(data_dir: str, **kwargs) -> str:
    """imagenet2012 plus imagenet2012_subset/1pct and /10pct in one data_dir; returns it."""
    write_imagenet(data_dir, **kwargs)
    for subset in SUBSETS:
        write_imagenet_subset(data_dir, subset, **kwargs)
    return data_dir


@pytest.fixture(scope="module")
def imagenet_data_dir(tmp_path_factory) -> str:
    """A TFDS data_dir with the default tiny imagenet2012 and imagenet2012_subset/{1,10}pct.

    Import it into a test module (`from tests.imagenet_mock import imagenet_data_dir`) to use it;
    it is written once per module that uses it (~1-2 s).
    """
    return write_all(str(tmp_path_factory.mktemp("imagenet")))
