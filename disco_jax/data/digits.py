"""The embedded default dataset: scikit-learn's `load_digits`, stored as a real TFDS dataset.

The environment this library is tested in has no network, so TFDS cannot download anything. The
1797 8x8 grayscale digits ship inside scikit-learn, which makes them the one dataset that always
works. Storing them as a genuine TFDS dataset (rather than feeding numpy arrays) means the
`digits` name goes through exactly the same reader, sharding and pipeline code as `cifar10` or
`imagenet2012`, so the tests exercise the real path.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

DIGITS_NAME = "digits"
DIGITS_VERSION = "1.0.0"
TRAIN_FRACTION = 0.8


def default_data_dir() -> str:
    """The TFDS default data dir, honouring the `TFDS_DATA_DIR` environment variable."""
    return os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def digits_dir(data_dir: str) -> str:
    """Where the prepared dataset lives: `<data_dir>/digits/1.0.0`, TFDS's own layout."""
    return os.path.join(data_dir, DIGITS_NAME, DIGITS_VERSION)


def _is_prepared(data_dir: str) -> bool:
    # TFDS writes dataset_info.json last, and we only move a complete directory into place.
    return os.path.isfile(os.path.join(digits_dir(data_dir), "dataset_info.json"))


def _split_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed stratified 80/20 split of the scikit-learn digits, as uint8 images in 0..255."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are integers 0..16; scale to the usual 0..255 range with rounding.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, train_size=TRAIN_FRACTION, random_state=0, stratify=labels
    )
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def _store(tfds, features, split_datasets, tmp_root: str) -> None:
    tfds.dataset_builders.store_as_tfds_dataset(
        name=DIGITS_NAME,
        version=DIGITS_VERSION,
        features=features,
        split_datasets=split_datasets,
        data_dir=tmp_root,
        description="scikit-learn load_digits, stratified 80/20 split (random_state=0).",
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        # Keep the stored order equal to the (already shuffled) sklearn split order.
        disable_shuffling=True,
    )


def ensure_digits(data_dir: str | None = None) -> str:
    """Writes the `digits` TFDS dataset into `data_dir` unless it is already there.

    Idempotent and crash-safe: the dataset is built in a temporary directory next to its final
    place and renamed into place, so a reader never sees half a dataset. Returns the data_dir.
    """
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
    if _is_prepared(data_dir):
        return data_dir

    from disco_jax.data._tf import import_tfds

    tfds = import_tfds()  # TF imported first, its GPUs hidden

    os.makedirs(data_dir, exist_ok=True)
    # Same filesystem as the target, so the final os.replace is an atomic rename.
    tmp_root = tempfile.mkdtemp(prefix=".digits-tmp-", dir=data_dir)
    try:
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        )
        split_datasets = {
            split: [
                (i, {"image": image, "label": label})
                for i, (image, label) in enumerate(zip(x, y, strict=True))
            ]
            for split, (x, y) in _split_arrays().items()
        }
        # A one-off 1797-example build; its progress bars would only clutter logs and test output.
        tqdm_utils = tfds.core.utils.tqdm_utils
        was_active = getattr(tqdm_utils, "_active", True)
        tqdm_utils.display_progress_bar(False)
        try:
            _store(tfds, features, split_datasets, tmp_root)
        finally:
            tqdm_utils.display_progress_bar(was_active)
        target = digits_dir(data_dir)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.replace(digits_dir(tmp_root), target)
        except OSError:
            # Another process won the race and the target is now a non-empty directory.
            if not _is_prepared(data_dir):
                raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return data_dir
