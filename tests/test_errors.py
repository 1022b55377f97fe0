"""Bad input stops before compiling with one clear line, and leaves the workdir untouched."""

from __future__ import annotations

import os

import numpy as np
import pytest

from disco_jax import train
from disco_jax.errors import ConfigError
from tests.helpers import load_config, override


@pytest.fixture
def cfg(data_dir, tmp_path):
    c = load_config("seed_mbv3.py:smoke", data_dir)
    c.teacher.init = str(tmp_path / "no_such_teacher")
    return c


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("student.model", "mobilenet_v9", r"unknown model 'mobilenet_v9'; valid models: .*resnet"),
        ("teacher.model", "resnet5", r"unknown model 'resnet5'; valid models:"),
        ("method", "seeed", r"unknown method 'seeed'; valid methods: byol, disco, .*seed"),
        ("data.name", "cifar_10", r"cifar_10"),
        ("queue_size", 60, r"queue size 60 must be a positive multiple of the global batch 16"),
        ("batch_size", 12, r"global batch_size 12 is not divisible by the 8 devices"),
        ("loss.teacher_temp", 0.0, r"loss.teacher_temp must be positive, got 0.0"),
        ("loss.student_temp", -0.2, r"loss.student_temp must be positive"),
        ("teacher.init", "", r"needs teacher.init"),
        ("nonfinite", "ignore", r"nonfinite must be 'stop' or 'skip', got 'ignore'"),
        ("data.num_shards", 3, r"data.num_shards=3 must be a positive multiple"),
        ("data.bad_images", "keep", r"data.bad_images must be 'error' or 'skip'"),
        # An evaluator setting is validated with the rest (a negative kNN temperature used to
        # be accepted and silently inverted the vote).
        ("evals.knn.temp", -1.0, r"evals.knn.temp must be positive"),
        ("evals.knn_online.k", 0, r"every k must be a positive integer, got 0"),
        ("evals.linear_fast.epochs", 0, r"evals.linear_fast.epochs must be a positive integer"),
        ("evals.knn.type", "knm", r"unknown evaluator 'knm'; valid evaluators: agreement,"),
        ("evals.agree.pred", "student", r"evals.agree: the agreement monitor needs pred='pair'"),
    ],
)
def test_bad_input_gives_one_clear_error(cfg, tmp_path, key, value, message):
    override(cfg, **{key: value})
    workdir = tmp_path / "w"
    with pytest.raises(ConfigError, match=message) as info:
        train.run(cfg, str(workdir))
    assert "\n" not in str(info.value)
    assert not workdir.exists()  # nothing was written


@pytest.mark.parametrize("key, value, message", [
    ("queue_size", 60, r"queue size 60"), ("student.model", "resnet11", r"unknown model"),
    ("optimizer.base_lr", 0.0, r"base_lr must be positive"), ("dtype", "float8", r"float8")])
def test_the_config_is_checked_before_the_dataset(cfg, tmp_path, monkeypatch, key, value,
                                                  message):
    """A bad option fails before the dataset is looked up (the lookup imports TensorFlow, seconds
    on a small machine): with an unknown dataset too, the option's error is the one raised."""
    from disco_jax import data

    def no_lookup(*args, **kwargs):
        raise AssertionError("the dataset was looked up before the config's own checks")

    monkeypatch.setattr(data, "get_source", no_lookup)
    override(cfg, **{key: value, "data.name": "no_such_dataset"})
    with pytest.raises(ConfigError, match=message):
        train.run(cfg, str(tmp_path / "w"))


def test_missing_teacher_checkpoint(cfg, tmp_path):
    with pytest.raises(ConfigError, match="teacher checkpoint .*no_such_teacher.* not found"):
        train.run(cfg, str(tmp_path / "w"))


def test_failed_validation_leaves_an_existing_workdir_untouched(cfg, tmp_path):
    workdir = tmp_path / "existing"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"precious": true}')
    cfg.queue_size = 60
    with pytest.raises(ConfigError):
        train.run(cfg, str(workdir))
    assert (workdir / "config.json").read_text() == '{"precious": true}'
    assert sorted(os.listdir(workdir)) == ["config.json"]


# Unknown fields, malformed values, bad config files or variants, and an official recipe without
# its ImageNet on the command line: tests/test_cli.py (`test_main_bad_input_exits_2`,
# `test_unknown_field_names_it_and_the_...`).


# ------------------------------------------------------------------ teachers, workdirs, data


def _tiny(data_dir, teacher_dir, **overrides):
    from tests.robust_util import tiny_config

    return tiny_config(data_dir, teacher_dir, **overrides)


@pytest.fixture(scope="module")
def good_teacher(tmp_path_factory, data_dir):
    from tests.robust_util import make_teacher

    return make_teacher(str(tmp_path_factory.mktemp("teacher") / "enc"), data_dir)


def _fails_untouched(cfg, workdir, message):
    """train.run raises one ConfigError line matching `message`; `workdir` is unchanged."""
    before = sorted(os.walk(workdir)) if os.path.exists(workdir) else None
    with pytest.raises(ConfigError, match=message) as info:
        train.run(cfg, str(workdir))
    assert "\n" not in str(info.value)
    assert (sorted(os.walk(workdir)) if os.path.exists(workdir) else None) == before


def test_teacher_of_the_wrong_architecture(tmp_path, data_dir, good_teacher):
    import json
    import shutil

    bad = tmp_path / "wide"
    shutil.copytree(good_teacher, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["model_kwargs"]["width"] = 0.25  # the weights are of a width-0.125 ResNet-8
    (bad / "manifest.json").write_text(json.dumps(manifest))
    cfg = _tiny(data_dir, str(bad))
    _fails_untouched(cfg, tmp_path / "w", r"teacher weights in .*wide.* do not fit a 'resnet8'"
                     r".*mismatched arrays")
    cfg.teacher.model = "resnet50"  # a manifest naming another model is caught before loading
    _fails_untouched(cfg, tmp_path / "w", r"holds a 'resnet8' but teacher.model is 'resnet50'")


def test_truncated_teacher_checkpoint(tmp_path, data_dir, good_teacher):
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(good_teacher, bad)
    files = [os.path.join(r, f) for r, _, fs in os.walk(bad / "variables") for f in fs]
    for path in files:  # every data file cut to half its length
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    _fails_untouched(_tiny(data_dir, str(bad)), tmp_path / "w",
                     r"cannot read teacher weights in .*truncated")


def test_teacher_path_that_is_not_a_checkpoint(tmp_path, data_dir):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "manifest.json").write_text("this is not json")
    _fails_untouched(_tiny(data_dir, str(junk)), tmp_path / "w", r"teacher manifest .* unreadable")
    plain = tmp_path / "weights.pth"
    plain.write_bytes(b"\0" * 64)
    _fails_untouched(_tiny(data_dir, str(plain)), tmp_path / "w",
                     r"teacher checkpoint .* not found")


def test_workdir_of_a_different_config_is_refused(tmp_path, data_dir, good_teacher):
    """A checkpoint remembers its config; resuming with other settings needs force_resume."""
    from disco_jax import checkpoint, resilience

    workdir = tmp_path / "w"
    saved = resilience.trajectory_config(_tiny(data_dir, good_teacher))
    mngr = checkpoint.manager(str(workdir), keep=1, every_steps=1)  # a checkpoint of step 2
    checkpoint.save(mngr, 2, {"step": np.zeros((), np.int32)}, {"config": saved}, force=True)
    checkpoint.wait(mngr)
    mngr.close()
    (workdir / "config.json").write_text("{}")
    cfg = _tiny(data_dir, good_teacher, **{"optimizer.base_lr": 0.1, "log_every_steps": 1})
    _fails_untouched(cfg, workdir, r"different config \(optimizer.base_lr: 0.03 -> 0.1\).*"
                     r"force_resume=True")
    # Fields that do not change the trajectory (logging, paths, mesh) may change freely.
    ok = _tiny(data_dir, good_teacher, log_every_steps=1, **{"mesh.num_devices": 8})
    resilience.check_same_config(saved, resilience.trajectory_config(ok), str(workdir), False)
    resilience.check_same_config(saved, resilience.trajectory_config(cfg), str(workdir), True)


def _image_folder(root, *, train=6, test=2, corrupt=(), empty_test=False):
    """folder:/root with two classes of 16x16 PNGs, plus `corrupt` (name, bytes) files."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", 0 if empty_test else test)):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                (d / f"{i}.png").write_bytes(tf.io.encode_png(img).numpy())
    for name, payload in corrupt:
        (root / "train" / "a" / name).write_bytes(payload)
    return f"folder:{root}"


def test_corrupt_images_in_a_folder_error_or_are_skipped(tmp_path, data_dir, good_teacher, caplog):
    import logging

    from disco_jax import data

    name = _image_folder(tmp_path / "imgs", corrupt=[
        ("notes.jpg", b"these are not pixels at all"),       # a non-image with an image name
        ("cut.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),    # a PNG cut short (no IEND)
        ("empty.jpg", b""),
    ])
    cfg = _tiny(data_dir, good_teacher, **{"data.name": name, "batch_size": 8})
    _fails_untouched(cfg, tmp_path / "w", r"has 3 corrupt or non-image file\(s\), e.g. .*"
                     r"data.bad_images='skip'")
    with caplog.at_level(logging.WARNING, logger="disco_jax"):
        source = data.get_source({"name": name, "bad_images": "skip"})
    assert source.num_examples("train") == 12  # the 3 bad files are not counted
    assert "skipped 3 corrupt or non-image file(s)" in caplog.text


def test_empty_split(tmp_path, data_dir, good_teacher):
    name = _image_folder(tmp_path / "imgs", empty_test=True)
    cfg = _tiny(data_dir, good_teacher, **{"data.name": name, "batch_size": 8})
    cfg.eval.enabled = True
    _fails_untouched(cfg, tmp_path / "w", r"split 'test' of folder:.* is empty")
