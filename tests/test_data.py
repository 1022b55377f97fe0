"""Tests for disco_jax.data: the embedded dataset, sources, the host pipeline and augmentation."""

from __future__ import annotations

import collections
import dataclasses
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from PIL import Image

from disco_jax.data import (
    ensure_digits,
    eval_batches,
    eval_dataset,
    get_source,
    global_iterator,
    mocov2_augment,
    normalize,
    steps_per_epoch,
    to_global,
    train_dataset,
)
from disco_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD, _gaussian_blur
from disco_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits(data_dir):
    # `data_dir` (tests/conftest.py) is a session-wide tmp TFDS dir that already holds digits.
    return get_source(
        {"name": "digits", "data_dir": data_dir, "train_split": "train", "eval_split": "test"}
    )


def take(ds, n: int) -> list[dict[str, np.ndarray]]:
    it = ds.as_numpy_iterator()
    return [next(it) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# Embedded dataset


def test_digits_dataset(data_dir, digits):
    import tensorflow_datasets as tfds

    assert digits.num_classes == 10
    assert digits.num_examples("train") + digits.num_examples("test") == 1797
    assert digits.num_examples("train") == 1437  # 80%, sklearn rounds the test share up

    builder = tfds.builder("digits", data_dir=data_dir)
    for split in ("train", "test"):
        data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        images, labels = data["image"], data["label"]
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
        assert images.max() == 255
        assert set(labels.tolist()) == set(range(10))  # stratified: every class in both

    info = os.path.join(data_dir, "digits", "1.0.0", "dataset_info.json")
    mtime = os.path.getmtime(info)
    start = time.perf_counter()
    assert ensure_digits(data_dir) == os.path.abspath(data_dir)
    assert time.perf_counter() - start < 1.0
    assert os.path.getmtime(info) == mtime
    assert not [n for n in os.listdir(data_dir) if n.startswith(".digits-tmp")]


# ---------------------------------------------------------------------------------------------
# Training stream


def test_train_is_deterministic(digits):
    def stream(seed: int):
        ds = train_dataset(digits, split="train", views=1, image_size=12, local_batch=64, seed=seed)
        return take(ds, 3)

    first = stream(0)
    assert first[0]["image"].shape == (64, 12, 12, 3)
    assert first[0]["image"].dtype == np.uint8
    assert_batches_equal(first, stream(0))
    other = stream(1)
    assert not np.array_equal(first[0]["label"], other[0]["label"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_autotune_option_reaches_every_pipeline_and_changes_no_example(data_dir, digits):
    """`data.autotune` (default on, off in the smoke variants) sets tf.data's autotuning in the
    train and eval pipelines of the source, the evaluators' sources included; the batches are
    the same either way."""
    import types

    import ml_collections as mlc

    from disco_jax import config_lib
    from disco_jax.eval import common
    from tests.helpers import load_config

    off = get_source({"name": "digits", "data_dir": data_dir, "autotune": False})
    assert digits.autotune and not off.autotune
    batches = {}
    for source in (digits, off):
        train = train_dataset(source, split="train", views=2, image_size=8, local_batch=32,
                              seed=5)
        test = eval_dataset(source, split="test", image_size=8, local_batch=32)
        for ds in (train, test):
            assert ds.options().autotune.enabled is source.autotune
        batches[source.autotune] = take(train, 2) + take(test, 2)
    assert_batches_equal(batches[True], batches[False])
    with pytest.raises(ConfigError, match="data.autotune must be true or false, got 'no'"):
        get_source({"name": "digits", "data_dir": data_dir, "autotune": "no"})
    # Recipes keep TF's default; their smoke variants (seconds of data) turn it off, and an
    # evaluator reads the run's choice, also for a dataset of its own.
    assert config_lib.base_config().data.autotune is True
    assert load_config("seed_r18.py").data.autotune is True
    smoke = load_config("seed_r18.py:smoke")
    assert smoke.data.autotune is False
    env = types.SimpleNamespace(data=smoke.data)
    for entry in ({}, {"data": {"name": "digits"}}):
        assert common.data_config(mlc.ConfigDict(entry), env)["autotune"] is False


def test_input_functions_are_traced_as_written_not_by_autograph(digits):
    """tf.data runs AutoGraph on a transformation's function unless told not to: seconds of AST
    rewriting per process. Ours are traced as written (`_tf.no_autograph`). A decode with a
    Python `if` on a tensor tells which: AutoGraph rewrites it into a tf.cond, while traced as
    written it cannot be built, through the source, the train pipeline or the eval pipeline."""
    from disco_jax.data._tf import tf

    def decode(image):
        image = digits.decode(image)
        if tf.reduce_max(image) > 0:  # a tensor as a Python bool: only AutoGraph can trace it
            return image
        return tf.zeros_like(image)

    encoded = digits.dataset("train", decode=False)
    encoded.map(lambda ex: decode(ex["image"]))  # tf.data's default: AutoGraph rewrites it
    source = dataclasses.replace(digits, _decode=decode)
    builds = {
        "source": lambda: source.dataset("train"),
        "train": lambda: train_dataset(source, split="train", views=1, image_size=8,
                                       local_batch=4, seed=0),
        "eval": lambda: eval_dataset(source, split="test", image_size=8, local_batch=4),
    }
    for name, build in builds.items():
        with pytest.raises(tf.errors.OperatorNotAllowedInGraphError, match="AutoGraph"):
            build()
            pytest.fail(f"{name}: built, so AutoGraph rewrote the decode")


@pytest.mark.slow
def test_train_is_deterministic_across_processes(data_dir, digits):
    # Requirement (a): a fresh interpreter with the same seed sees the same batches.
    script = textwrap.dedent(
        f"""
        import numpy as np, sys
        from disco_jax.data import get_source, train_dataset
        src = get_source({{"name": "digits", "data_dir": {data_dir!r}}})
        ds = train_dataset(src, split="train", views=2, image_size=10, local_batch=50, seed=7)
        b = next(ds.as_numpy_iterator())
        np.savez(sys.argv[1], **b)
        """
    )
    out = os.path.join(data_dir, "..", "fresh_process_batch.npz")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", script, out], check=True, env=env, timeout=120)
    fresh = dict(np.load(out))
    here = take(
        train_dataset(digits, split="train", views=2, image_size=10, local_batch=50, seed=7), 1
    )
    assert_batches_equal([fresh], here)


def test_resume_matches_uninterrupted_stream(digits):
    kwargs = dict(split="train", views=1, image_size=8, local_batch=200, seed=3)
    steps = steps_per_epoch(digits, split="train", local_batch=200)
    assert steps == 1437 // 200 == 7
    full = take(train_dataset(digits, **kwargs), 10)
    # Mid-epoch (the resumed stream then crosses into epoch 1), exactly on the epoch boundary,
    # and inside epoch 1 (epoch 0 skipped arithmetically).
    for k in (3, steps, steps + 2):
        resumed = take(train_dataset(digits, start_step=k, **kwargs), 10 - k)
        assert_batches_equal(full[k:], resumed)
    # Epochs are reshuffled: epoch 1 does not repeat epoch 0's order.
    assert not np.array_equal(full[0]["label"], full[steps]["label"])


def test_two_views(digits):
    kwargs = dict(split="train", image_size=16, local_batch=32, seed=5)
    two = take(train_dataset(digits, views=2, **kwargs), 2)
    one = take(train_dataset(digits, views=1, **kwargs), 2)
    for batch, single in zip(two, one, strict=True):
        assert set(batch) == {"view1", "view2", "label"}
        for view in ("view1", "view2"):
            assert batch[view].shape == (32, 16, 16, 3) and batch[view].dtype == np.uint8
        # Both views come from the same images: the order depends only on the seed.
        np.testing.assert_array_equal(batch["label"], single["label"])
        differs = [
            not np.array_equal(a, b) for a, b in zip(batch["view1"], batch["view2"], strict=True)
        ]
        assert np.mean(differs) > 0.8
        # Grayscale sources become three equal channels.
        np.testing.assert_array_equal(batch["view1"][..., 0], batch["view1"][..., 2])


def test_train_shards_are_even_and_disjoint(digits):
    shards = []
    for index in range(3):
        assert digits.shard_size("train", index, 3) == 1437 // 3
        ds = digits.dataset("train", index, 3)
        shards.append(
            {ex["image"].tobytes() + bytes([ex["label"]]) for ex in ds.as_numpy_iterator()}
        )
    assert all(len(shard) >= 470 for shard in shards)  # (a few digits images are duplicates)
    assert not (shards[0] & shards[1]) and not (shards[1] & shards[2])
    batch = take(
        train_dataset(
            digits,
            split="train",
            views=1,
            image_size=8,
            local_batch=479,
            seed=0,
            process_index=2,
            process_count=3,
        ),
        1,
    )[0]
    assert batch["image"].shape == (479, 8, 8, 3)


def test_train_config_errors(digits):
    base = dict(split="train", image_size=8, local_batch=8, seed=0)
    with pytest.raises(ConfigError, match="views"):
        train_dataset(digits, views=3, **base)
    with pytest.raises(ConfigError, match="split"):
        train_dataset(digits, views=1, **{**base, "split": "validation"})
    with pytest.raises(ConfigError, match="local_batch"):
        train_dataset(digits, views=1, **{**base, "local_batch": 5000})
    with pytest.raises(ConfigError, match="crop_scale"):
        train_dataset(digits, views=1, crop_scale=(0.5, 0.1), **base)


# ---------------------------------------------------------------------------------------------
# Evaluation stream


def _reference_examples(source, split: str) -> collections.Counter:
    ds = source.dataset(split)
    return collections.Counter(
        (np.repeat(ex["image"], 3, axis=-1).tobytes(), int(ex["label"]))
        for ex in ds.as_numpy_iterator()
    )


@pytest.mark.parametrize("local_batch", [7, 64, 500])
def test_eval_covers_split_exactly_once(digits, local_batch):
    # image_size 8 = the digits' own size, so images come through unresized and identify examples.
    seen = collections.Counter()
    num_batches = []
    for index in range(2):
        ds = eval_dataset(
            digits,
            split="test",
            image_size=8,
            local_batch=local_batch,
            process_index=index,
            process_count=2,
        )
        batches = list(ds.as_numpy_iterator())
        num_batches.append(len(batches))
        for b in batches:
            assert b["image"].shape == (local_batch, 8, 8, 3) and b["image"].dtype == np.uint8
            assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
            for image, label in zip(b["image"][b["mask"]], b["label"][b["mask"]], strict=True):
                seen[(image.tobytes(), int(label))] += 1
    expected = eval_batches(digits, split="test", local_batch=local_batch, process_count=2)
    assert num_batches == [expected, expected]
    assert seen == _reference_examples(digits, "test")


def test_eval_resize_and_center_crop(digits):
    b = take(eval_dataset(digits, split="test", image_size=32, local_batch=10), 1)[0]
    assert b["image"].shape == (10, 32, 32, 3) and b["mask"].all()


# ---------------------------------------------------------------------------------------------
# Image folders


def _write_image(path: str, value: int, mode: str, size=(12, 10)) -> None:
    channels = {"L": 1, "RGB": 3}[mode]
    array = np.full((size[1], size[0], channels), value, np.uint8).squeeze()
    Image.fromarray(array, mode=mode).save(path)


def test_folder_source(tmp_path):
    # Class "bright" images are near white, "dark" near black; mixed formats and channel counts.
    for split, count in (("train", 3), ("test", 2)):
        for name, value in (("bright", 230), ("dark", 20)):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                ext, mode = [(".png", "L"), (".jpg", "RGB"), (".PNG", "RGB")][i]
                _write_image(str(folder / f"img{i}{ext}"), value, mode)
    (tmp_path / "train" / "bright" / "notes.txt").write_text("not an image")

    source = get_source({"name": f"folder:{tmp_path}", "train_split": "train"})
    assert source.num_classes == 2
    assert source.num_examples("train") == 6 and source.num_examples("test") == 4
    for ex in source.dataset("train").as_numpy_iterator():
        assert ex["image"].shape == (10, 12, 3) and ex["image"].dtype == np.uint8
        assert ex["label"] == (0 if ex["image"].mean() > 128 else 1)  # sorted: bright, dark

    batch = take(
        train_dataset(source, split="train", views=2, image_size=8, local_batch=3, seed=0), 3
    )[-1]
    assert batch["view1"].shape == (3, 8, 8, 3)
    evals = list(
        eval_dataset(source, split="test", image_size=8, local_batch=3).as_numpy_iterator()
    )
    assert sum(int(b["mask"].sum()) for b in evals) == 4


def _jpeg_folder(tmp_path) -> object:
    """A folder source of 4:4:4 JPEGs (RGB and grayscale, 23-64 px) and one PNG."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(("a", "b")):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate([(40, 30), (23, 37), (64, 48)]):
                texture = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), np.uint8)
                image = Image.fromarray(texture).resize((w, h), Image.BILINEAR)
                if i == 1:
                    image = image.convert("L")
                if (c, i) == (1, 2):
                    image.save(folder / "img.png")
                else:
                    image.save(folder / f"img{i}.jpg", quality=90, subsampling=0)  # 4:4:4
    return get_source({"name": f"folder:{tmp_path}", "train_split": "train"})


def test_fused_decode_is_the_full_decode_of_jpegs_without_chroma_subsampling(tmp_path):
    # decode_and_crop_jpeg equals decode + crop bitwise when no chroma is upsampled (4:4:4, or
    # grayscale); so the fused stream must equal the default one: same keys, boxes, resize and
    # flip. The PNG takes the whole-image decode in both.
    source = _jpeg_folder(tmp_path)
    for views, small in ((1, 0), (2, 2)):
        kwargs = dict(split="train", views=views, image_size=16, crop_scale=(0.1, 1.0),
                      local_batch=3, seed=3, small_crops=small, small_size=8)
        want = take(train_dataset(source, **kwargs), 4)
        got = take(train_dataset(source, fused_decode=True, **kwargs), 4)
        assert_batches_equal(got, want)
        assert len({b["image" if views == 1 else "view1"].tobytes() for b in want}) > 1


def test_antialias_off_resizes_the_same_crops_without_antialiasing(tmp_path):
    # The 23-64 px images shrink to 8 px crops: plain bilinear must differ from antialiased
    # (it samples 4 pixels where the antialiased filter averages the whole footprint).
    source = _jpeg_folder(tmp_path)
    kwargs = dict(split="train", views=2, image_size=8, local_batch=3, seed=3)
    want = take(train_dataset(source, **kwargs), 2)
    got = take(train_dataset(source, antialias=False, **kwargs), 2)
    for w, g in zip(want, got, strict=True):
        assert w.keys() == g.keys() and all(w[k].shape == g[k].shape for k in w)
        np.testing.assert_array_equal(w["label"], g["label"])  # the same examples, in order
    assert any(not np.array_equal(w["view1"], g["view1"]) for w, g in zip(want, got, strict=True))
    with pytest.raises(ConfigError, match="data.antialias must be true or false"):
        train_dataset(source, antialias="no", **kwargs)


def test_fused_decode_refuses_what_it_cannot_fuse(digits):
    with pytest.raises(ConfigError, match="fused_decode.*pad_crop"):
        train_dataset(digits, split="train", views=1, image_size=8, local_batch=4, seed=0,
                      train_crop="pad_crop", fused_decode=True)
    with pytest.raises(ConfigError, match="true or false"):
        train_dataset(digits, split="train", views=1, image_size=8, local_batch=4, seed=0,
                      fused_decode="yes")


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="train/"):
        get_source({"name": f"folder:{tmp_path}"})
    (tmp_path / "train" / "cls").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no PNG/JPEG"):
        get_source({"name": f"folder:{tmp_path}"})


# ---------------------------------------------------------------------------------------------
# Source errors: one line, fast, no network


def test_unknown_tfds_name(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="cifar10") as err:
        get_source({"name": "cifar_10", "data_dir": str(tmp_path)})
    assert "\n" not in str(err.value)
    assert time.perf_counter() - start < 10


def test_unprepared_tfds_dataset(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="tfds build mnist") as err:
        get_source({"name": "mnist", "data_dir": str(tmp_path)})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="downloads/manual"):
        get_source({"name": "imagenet2012", "data_dir": str(tmp_path)})
    assert time.perf_counter() - start < 10
    assert os.listdir(tmp_path) == []  # nothing was downloaded or created


def test_unknown_split(data_dir):
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        get_source({"name": "digits", "data_dir": data_dir, "eval_split": "val"})


# ---------------------------------------------------------------------------------------------
# Device-side augmentation


# Jitted once per static configuration: eager vmap dispatch would be slower than compiling.
augment = jax.jit(mocov2_augment, static_argnames=("jitter_p", "gray_p", "blur_p", "out_dtype"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.integers(0, 256, (6, 20, 20, 3), dtype=np.uint8))


def _unnormalize(x):
    return x * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN)


def test_augment_shape_dtype_and_range(images):
    out = augment(jax.random.key(0), images)
    assert out.shape == images.shape and out.dtype == jnp.float32
    # Back on the [0, 1] scale every value is a valid intensity.
    unit = _unnormalize(out)
    assert float(unit.min()) >= -1e-5 and float(unit.max()) <= 1 + 1e-5
    low = augment(jax.random.key(0), images, jitter_p=0, blur_p=0, out_dtype=jnp.bfloat16)
    assert low.shape == images.shape and low.dtype == jnp.bfloat16


def test_augment_with_zero_probabilities_is_normalize(images):
    out = augment(jax.random.key(1), images, jitter_p=0, gray_p=0, blur_p=0)
    np.testing.assert_allclose(out, normalize(images), atol=1e-6)


def test_augment_grayscale(images):
    out = _unnormalize(augment(jax.random.key(2), images, jitter_p=0, gray_p=1, blur_p=0))
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-5)
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-5)


def test_augment_randomness(images):
    a = augment(jax.random.key(3), images)
    b = augment(jax.random.key(4), images)
    assert not np.allclose(a, b)
    # Per-example randomness: identical inputs in one batch get different augmentations.
    same = jnp.broadcast_to(images[:1], images.shape)
    out = augment(jax.random.key(5), same)
    assert not np.allclose(out[0], out[1])


def test_blur_of_constant_is_constant():
    const = jnp.full((16, 16, 3), 0.3, jnp.float32)
    np.testing.assert_allclose(_gaussian_blur(const, jnp.float32(1.7)), const, atol=1e-6)
    tiny = jnp.full((2, 2, 3), 0.6, jnp.float32)  # smaller than the kernel radius: edge mode
    np.testing.assert_allclose(_gaussian_blur(tiny, jnp.float32(2.0)), tiny, atol=1e-6)
    images = jnp.full((2, 24, 24, 3), 77, jnp.uint8)
    out = augment(jax.random.key(6), images, jitter_p=0, gray_p=0, blur_p=1)
    np.testing.assert_allclose(out, normalize(images), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Host -> device


def test_to_global_and_iterator(digits):
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py should force 8 host devices"
    mesh = Mesh(np.asarray(devices), ("data",))
    batch = {
        "image": np.arange(16 * 2 * 2 * 3, dtype=np.uint8).reshape(16, 2, 2, 3),
        "label": np.arange(16, dtype=np.int32),
    }
    out = to_global(batch, mesh)
    for key, value in out.items():
        assert value.sharding.spec == P("data")
        assert value.shape == batch[key].shape
        np.testing.assert_array_equal(np.asarray(value), batch[key])

    ds = eval_dataset(digits, split="test", image_size=8, local_batch=64)
    batches = list(global_iterator(ds, mesh, prefetch=2))
    assert len(batches) == eval_batches(digits, split="test", local_batch=64)
    assert int(sum(b["mask"].sum() for b in batches)) == 360
    assert batches[0]["image"].sharding.spec == P("data")


def test_flip_probability(digits):
    # Whole-image crops: with flip_p=0 both views are the same resized image; with flip_p=1
    # one is exactly the mirror of that image.
    kwargs = dict(split="train", views=2, image_size=8, local_batch=64, seed=2,
                  crop_scale=(1.0, 1.0))
    plain = take(train_dataset(digits, flip_p=0.0, **kwargs), 1)[0]
    np.testing.assert_array_equal(plain["view1"], plain["view2"])
    flipped = take(train_dataset(digits, flip_p=1.0, **kwargs), 1)[0]
    np.testing.assert_array_equal(flipped["view1"], plain["view1"][:, :, ::-1])


# ---------------------------------------------------------------------------------------------
# CIFAR's RandomCrop(S, padding) and per-dataset normalisation (winycg/MCL `main_cifar.py`)


def _coded_source(n: int, size: int):
    """In-memory source whose pixels name their position: R = 1 + 7 row, G = 1 + 7 col,
    B = 1 + index (all > 0, so zero padding is told apart); label = the example's index."""
    import tensorflow as tf

    from disco_jax.data import DataSource

    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    images = np.stack([np.stack([1 + 7 * rows, 1 + 7 * cols, np.full_like(rows, 1 + i)], -1)
                       for i in range(n)]).astype(np.uint8)

    def read(split, start, end, decode):
        return tf.data.Dataset.from_tensor_slices(
            {"image": images[start:end], "label": np.arange(start, end, dtype=np.int64)})

    return DataSource(name="coded", num_classes=n, splits={"train": n}, _read=read,
                      _decode=lambda x: x), images


def _padded_windows(view: np.ndarray, image: np.ndarray, pad: int) -> list[tuple]:
    """Every (top, left, mirrored) whose window of np.pad(image, pad) (zeros) equals `view`."""
    size = image.shape[0]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    hits = []
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            window = padded[top:top + size, left:left + size]
            for mirrored in (False, True):
                if np.array_equal(view, window[:, ::-1] if mirrored else window):
                    hits.append((top, left, mirrored))
    return hits


def test_pad_crop_is_a_window_of_the_zero_padded_image():
    # torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip: every view is exactly the
    # 32x32 window at some offsets (top, left) in [0, 8]^2 of np.pad(image, 4), maybe mirrored;
    # the offsets are uniform integers, so 512 draws cover all 9 values of each.
    size, pad = 32, 4
    source, images = _coded_source(64, size)
    ds = train_dataset(source, split="train", views=2, image_size=size, local_batch=64, seed=1,
                       train_crop="pad_crop", crop_padding=pad)
    tops, lefts, flips = [], [], []
    for batch in take(ds, 4):
        for key in ("view1", "view2"):
            for view, label in zip(batch[key], batch["label"], strict=True):
                hits = _padded_windows(view, images[label], pad)
                assert len(hits) == 1, f"view of example {label} is no padded window: {hits}"
                tops.append(hits[0][0])
                lefts.append(hits[0][1])
                flips.append(hits[0][2])
    assert set(tops) == set(lefts) == set(range(2 * pad + 1))
    assert 0 < np.mean(flips) < 1
    # padding 0 at the image's own size: the image itself, maybe mirrored.
    plain = take(train_dataset(source, split="train", views=1, image_size=size, local_batch=64,
                               seed=1, train_crop="pad_crop", crop_padding=0, flip_p=0.0), 1)[0]
    np.testing.assert_array_equal(plain["image"], images[plain["label"]])


def test_crop_and_normalisation_options_are_validated():
    source, _ = _coded_source(8, 8)
    kw = dict(split="train", views=1, image_size=8, local_batch=8, seed=0)
    with pytest.raises(ConfigError, match="train_crop"):
        train_dataset(source, train_crop="pad", **kw)
    with pytest.raises(ConfigError, match="crop_padding"):
        train_dataset(source, train_crop="pad_crop", crop_padding=-1, **kw)
    from disco_jax import config_lib, data

    c = config_lib.base_config()
    data.validate(c.data, c.augment)
    for key, value, match in (("train_crop", "crop", "train_crop"),
                              ("crop_padding", 1.5, "crop_padding"),
                              ("mean", (0.5, 0.5), "mean"), ("std", (0.2, 0.0, 0.2), "std")):
        with pytest.raises(ConfigError, match=match):
            data.validate({**c.data, key: value}, c.augment)
    for view2, match in (({"blur": 0.1}, "view2.blur"), ({"solarize_p": 1.5}, "solarize_p")):
        with pytest.raises(ConfigError, match=match):
            data.validate(c.data, {**c.augment, "view2": view2})


CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # main_cifar.py transforms.Normalize
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def test_normalize_and_augment_take_the_dataset_statistics(images):
    want = (np.asarray(images, np.float64) / 255 - CIFAR100_MEAN) / CIFAR100_STD
    got = normalize(images, mean=CIFAR100_MEAN, std=CIFAR100_STD)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float32 of |x| <= 2
    out = augment(jax.random.key(7), images, jitter_p=0, gray_p=0, blur_p=0,
                  mean=CIFAR100_MEAN, std=CIFAR100_STD)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_mcl_cifar_recipe_trains_and_evaluates_with_cifar_statistics_and_pad_crop():
    from types import SimpleNamespace

    from disco_jax import sharding, train
    from tests.helpers import load_config

    cfg = load_config("mcl_cifar_resnet32x2.py")
    assert (cfg.data.train_crop, cfg.data.crop_padding) == ("pad_crop", 4)
    assert tuple(cfg.data.mean) == CIFAR100_MEAN and tuple(cfg.data.std) == CIFAR100_STD
    assert cfg.augment.jitter_p == cfg.augment.gray_p == cfg.augment.blur_p == 0.0
    # What evaluators see: the trainer's eval Model normalises with the run's statistics.
    method = SimpleNamespace(eval_outputs=lambda ctx, v, x: {"features": x.reshape(len(x), -1)})
    state = {"params": {}, "batch_stats": {}, "step": 0}
    model = train.eval_model(method, {"mesh": sharding.make_mesh(8)}, cfg, state, None,
                             jnp.float32)
    x = np.random.default_rng(1).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    want = ((x / 255.0 - CIFAR100_MEAN) / CIFAR100_STD).reshape(8, -1)
    np.testing.assert_allclose(model.predict(jnp.asarray(x))["features"], want, rtol=1e-5,
                               atol=1e-5)


def _augment_with(**settings):
    """mocov2_augment with these settings fixed (static, as the trainer's partial makes them)."""
    import functools

    return jax.jit(functools.partial(mocov2_augment, **settings))


def test_augment_solarize_and_per_view_overrides(images):
    unit = np.asarray(images, np.float64) / 255
    out = _unnormalize(_augment_with(jitter_p=0, gray_p=0, blur_p=0, solarize_p=1.0)(
        jax.random.key(8), images))
    np.testing.assert_allclose(out, np.where(unit < 0.5, unit, 1 - unit), atol=1e-5)
    # view2 overrides apply to view=2 only; with none (the default) both views are alike.
    kw = dict(jitter_p=0.8, gray_p=0.2, blur_p=0.5)
    key = jax.random.key(9)
    base = _augment_with(**kw)(key, images)
    view2 = {"solarize_p": 1.0}
    np.testing.assert_array_equal(_augment_with(**kw, view=1, view2=view2)(key, images), base)
    np.testing.assert_array_equal(_augment_with(**kw, view=2, view2=view2)(key, images),
                                  _augment_with(**kw, solarize_p=1.0)(key, images))
    assert not np.allclose(_augment_with(**kw, solarize_p=1.0)(key, images), base)
    np.testing.assert_array_equal(_augment_with(**kw, view=2)(key, images), base)
