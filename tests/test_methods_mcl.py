"""MCL: the class-balanced sampler and example index, the cohort, the three loss forms trained
on 8 devices vs 1, and each config's smoke variant end to end."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from disco_jax.data import get_source, train_dataset
from disco_jax.errors import ConfigError


@pytest.fixture(scope="module")
def digits(data_dir):
    return get_source({"name": "digits", "data_dir": data_dir})


def _batches(source, n, **kw):
    args = dict(split="train", views=1, image_size=8, local_batch=16, seed=3, per_class=2)
    ds = train_dataset(source, **(args | kw))
    return [b for _, b in zip(range(n), ds.as_numpy_iterator(), strict=False)]


def test_class_balanced_sampler_pairs_classes_deterministically_and_resumes(digits):
    run = _batches(digits, 5, with_index=True)
    labels = np.asarray([ex["label"] for ex in digits.dataset("train", decode=False)
                         .as_numpy_iterator()])
    for b in run:
        counts = collections.Counter(b["label"].tolist())
        assert len(counts) == 8 and set(counts.values()) == {2}  # 8 classes x 2 per batch
        assert len(set(b["index"].tolist())) == 16  # distinct examples within a class pair
        np.testing.assert_array_equal(labels[b["index"]], b["label"])  # index = split position
    assert len({tuple(b["index"].tolist()) for b in run}) == 5  # batches differ step to step
    again = _batches(digits, 5, with_index=True)
    resumed = _batches(digits, 2, with_index=True, start_step=3)
    for a, b in zip(run, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(run[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["index"], b["index"])
    other = _batches(digits, 1, seed=4)[0]
    assert not np.array_equal(other["label"], run[0]["label"])
    with pytest.raises(ConfigError, match="distinct classes"):
        _batches(digits, 1, local_batch=24)  # 12 classes per batch, digits has 10
    with pytest.raises(ConfigError, match="multiple of per_class"):
        _batches(digits, 1, per_class=3)


def test_index_of_shuffled_stream_is_the_split_position(digits):
    labels = np.asarray([ex["label"] for ex in digits.dataset("train", decode=False)
                         .as_numpy_iterator()])
    b = _batches(digits, 1, per_class=0, with_index=True, local_batch=64)[0]
    np.testing.assert_array_equal(labels[b["index"]], b["label"])
    assert len(set(b["index"].tolist())) == 64
    assert "index" not in _batches(digits, 1, per_class=0)[0]
