"""The ImageNet code paths end to end, offline: imagenet2012 and imagenet2012_subset as the
registered TFDS builders write and read them (tests/imagenet_mock.py), through get_source, the
host pipeline and a real training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from disco_jax.data import eval_batches, eval_dataset, get_source, train_dataset
from tests.helpers import load_config, read_metrics
from tests.imagenet_mock import (
    DEFAULTS,
    SUBSET_PER_CLASS,
    class_ids,
    write_all,
    write_imagenet,
    write_imagenet_subset,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = class_ids(DEFAULTS["num_classes_used"])  # 8 labels spread over [0, 1000)
N_TRAIN = DEFAULTS["train_per_class"] * len(CLASSES)  # 48
N_VAL = DEFAULTS["val_per_class"] * len(CLASSES)  # 24


@pytest.fixture(scope="module")
def imagenet_data_dir(tmp_path_factory) -> str:
    """imagenet2012 and imagenet2012_subset/{1pct,10pct}, default sizes, in one TFDS data_dir."""
    return write_all(str(tmp_path_factory.mktemp("imagenet")))


def imagenet(data_dir, name="imagenet2012"):
    return get_source({"name": name, "data_dir": data_dir, "train_split": "train",
                       "eval_split": "validation"})


def read_all(source, split):
    return list(source.dataset(split, drop_remainder=False).as_numpy_iterator())


def test_imagenet2012_source(imagenet_data_dir):
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet2012", data_dir=imagenet_data_dir)
    assert builder.is_prepared()
    assert os.path.isdir(os.path.join(imagenet_data_dir, "imagenet2012", str(builder.VERSION)))
    source = imagenet(imagenet_data_dir)
    assert source.num_classes == 1000
    assert dict(source.splits) == {"train": N_TRAIN, "validation": N_VAL}
    assert source.version == str(builder.VERSION) == "5.1.0"
    lo, hi = DEFAULTS["size"]
    read = {split: read_all(source, split) for split in ("train", "validation")}
    for split, n in (("train", N_TRAIN), ("validation", N_VAL)):
        examples = read[split]
        assert len(examples) == n
        labels = [int(ex["label"]) for ex in examples]
        assert sorted(set(labels)) == CLASSES and 999 in labels
        shapes = {ex["image"].shape for ex in examples}
        assert all(lo <= h <= hi and lo <= w <= hi and c == 3 for h, w, c in shapes)
        assert len(shapes) > 1  # varying sizes
        assert all(ex["image"].dtype == np.uint8 for ex in examples)
    # The stored image bytes are JPEG, as in the real dataset.
    raw = next(iter(source.dataset("train", decode=False).take(1)))["image"].numpy()
    assert raw[:3] == b"\xff\xd8\xff"

    # The images are class-dependent: nearest class-mean colour classifies validation.
    def mean_colours(examples):
        return np.stack([ex["image"].reshape(-1, 3).mean(0) for ex in examples])

    train_ex, val_ex = read["train"], read["validation"]
    train_y = np.array([ex["label"] for ex in train_ex])
    centroids = np.stack([mean_colours(train_ex)[train_y == c].mean(0) for c in CLASSES])
    dist = ((mean_colours(val_ex)[:, None] - centroids[None]) ** 2).sum(-1)
    predicted = np.array(CLASSES)[dist.argmin(1)]
    assert (predicted == np.array([ex["label"] for ex in val_ex])).mean() == 1.0


def test_imagenet2012_pipeline_batches(imagenet_data_dir):
    source = imagenet(imagenet_data_dir)
    ds = train_dataset(source, split="train", views=2, image_size=16, local_batch=8, seed=0)
    batches = list(ds.take(N_TRAIN // 8 + 1).as_numpy_iterator())  # into the second epoch
    for batch in batches:
        assert set(batch) == {"view1", "view2", "label"}
        assert batch["view1"].shape == batch["view2"].shape == (8, 16, 16, 3)
        assert batch["view1"].dtype == np.uint8
        assert batch["label"].shape == (8,) and set(batch["label"].tolist()) <= set(CLASSES)
    epoch = np.concatenate([b["label"] for b in batches[: N_TRAIN // 8]])
    assert np.bincount(epoch, minlength=1000)[CLASSES].tolist() == [6] * len(CLASSES)

    # Evaluation: resize the short side to 18 and centre-crop 16 (images are 40-64 px);
    # two processes' shards cover the 24 validation images once, padded to full batches.
    seen = []
    for process in (0, 1):
        ds = eval_dataset(source, split="validation", image_size=16, local_batch=8,
                          process_index=process, process_count=2)
        batches = list(ds.as_numpy_iterator())
        assert len(batches) == eval_batches(source, split="validation", local_batch=8,
                                            process_count=2) == 2
        for batch in batches:
            assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
            seen += batch["label"][batch["mask"]].tolist()
    assert len(seen) == N_VAL and sorted(set(seen)) == CLASSES


@pytest.mark.parametrize("subset", ["1pct", "10pct"])
def test_imagenet2012_subset_source(imagenet_data_dir, subset):
    import tensorflow_datasets as tfds

    source = imagenet(imagenet_data_dir, f"imagenet2012_subset/{subset}")
    assert source.num_classes == 1000
    assert dict(source.splits) == {"train": SUBSET_PER_CLASS[subset] * len(CLASSES),
                                   "validation": N_VAL}
    labels = [int(ex["label"]) for ex in read_all(source, "train")]
    assert sorted(set(labels)) == CLASSES

    # Train is a subset of imagenet2012's train (same files, same bytes); validation is equal.
    def files(name, split):
        ds = tfds.builder(name, data_dir=imagenet_data_dir).as_dataset(
            split=split, decoders={"image": tfds.decode.SkipDecoding()})
        return {ex["file_name"]: (ex["image"], ex["label"]) for ex in tfds.as_numpy(ds)}

    sub_train = files(f"imagenet2012_subset/{subset}", "train")
    full_train = files("imagenet2012", "train")
    assert len(sub_train) == source.num_examples("train")
    assert all(full_train[k] == v for k, v in sub_train.items())
    assert files(f"imagenet2012_subset/{subset}", "validation") == files(
        "imagenet2012", "validation")


def test_write_imagenet_options_and_idempotence(tmp_path):
    d = str(tmp_path)
    sizes = write_imagenet(d, train_per_class=2, val_per_class=1, num_classes_used=3, size=24)
    assert sizes == {"train": 6, "validation": 3}
    assert write_imagenet_subset(d, "10pct", per_class=1, train_per_class=2, val_per_class=1,
                                 num_classes_used=3, size=24) == {"train": 3, "validation": 3}
    source = get_source({"name": "imagenet2012", "data_dir": d})
    examples = read_all(source, "train")
    assert {ex["image"].shape for ex in examples} == {(24, 24, 3)}
    assert sorted({int(ex["label"]) for ex in examples}) == class_ids(3) == [0, 500, 999]
    info = os.path.join(d, "imagenet2012", "5.1.0", "dataset_info.json")
    mtime = os.path.getmtime(info)
    assert write_imagenet(d) == sizes  # already prepared: left alone, its sizes reported
    assert os.path.getmtime(info) == mtime
    assert sorted(os.listdir(d)) == ["imagenet2012", "imagenet2012_subset"]  # no temp dirs


@pytest.mark.slow
def test_imagenet_is_read_by_a_fresh_process(imagenet_data_dir):
    # Real files, not an in-process mock: another interpreter's registered builders read them
    # (plain TFDS, the reader's own call, without importing jax: keeps this test cheap).
    code = textwrap.dedent(f"""
        import tensorflow_datasets as tfds
        for name in ("imagenet2012", "imagenet2012_subset/1pct"):
            b = tfds.builder(name, data_dir={imagenet_data_dir!r})
            n = sum(1 for _ in b.as_dataset(split="train"))
            print(name, b.is_prepared(), b.info.features["label"].num_classes, n,
                  b.info.splits["validation"].num_examples)
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split("\n")
    assert f"imagenet2012 True 1000 {N_TRAIN} {N_VAL}" in out
    assert f"imagenet2012_subset/1pct True 1000 {2 * len(CLASSES)} {N_VAL}" in out


@pytest.mark.slow
def test_train_run_on_imagenet2012(tmp_path, imagenet_data_dir):
    # The cheapest real run: the MoCo-v2 smoke recipe (configs/moco_v2_r50.py:smoke, batch 16
    # at 16 px, no teacher) with a ResNet-18 (SEED's student) trained `supervised` by a 1000-way
    # classifier, so labels up to 999 reach the loss. Measured on 2 busy cores, cold compile
    # cache: ~38 s of CPU for the whole test, half of the unchanged smoke ResNet-50 MoCo-v2;
    # the input pipeline is the same for every method. 2 steps, then the encoder export and the
    # final kNN / linear evaluation on the validation split.
    from disco_jax import methods, train  # here: the data tests above do not need the trainer

    cfg = load_config("moco_v2_r50.py:smoke", imagenet_data_dir)
    cfg.method = "supervised"
    cfg.loss = methods.loss_defaults("supervised")  # MoCo's knobs are not supervised's
    cfg.student.model = "resnet18"
    cfg.student.num_classes = 1000
    cfg.data.name = "imagenet2012"
    cfg.data.train_split, cfg.data.eval_split = "train", "validation"
    cfg.total_steps = 2
    cfg.log_every_steps = 1
    assert cfg.batch_size % 8 == 0 and cfg.batch_size <= N_TRAIN
    assert cfg.data.image_size < DEFAULTS["size"][0] * 0.875  # eval resizes and centre-crops
    workdir = str(tmp_path / "run")
    res = train.run(cfg, workdir)
    assert res["step"] == 2
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert 0 <= results["knn_top1"] <= 100 and 0 <= results["linear_top1"] <= 100
    manifest = json.load(open(os.path.join(workdir, "encoder", "manifest.json")))
    assert manifest["model"] == "resnet18" and manifest["method"] == "supervised"
    (record,) = json.load(open(os.path.join(workdir, "run_info.json")))
    assert record["dataset"] == {"name": "imagenet2012", "version": "5.1.0",
                                 "train_split": "train", "train_examples": N_TRAIN}
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and 0 <= r["train_top1"] <= 100 for r in rows)
