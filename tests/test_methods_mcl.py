"""MCL: the class-balanced sampler and example index, bad settings, and each config's smoke
variant end to end on 1 device (the three loss forms' steps on 8 devices vs 1:
tests/test_steps.py)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from disco_jax import checkpoint, methods, models, train
from disco_jax.data import get_source, train_dataset
from disco_jax.errors import ConfigError
from tests.helpers import load_config, read_metrics, tiny_nets


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


# ------------------------------------------------------------------------------ training

CONFIGS = ["mcl_cifar_resnet32x2.py", "mcl_r18x2.py", "mcl_moco_r18x2.py"]


# The in-batch and memory-bank forms end to end. The MoCo form (mcl_moco_r18x2) at step level
# only (tests/test_steps.py, "mcl_moco"): its run would add nothing these two and the queue runs
# of SEED and DisCo do not check.
@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS[:2])
def test_smoke_config_runs_end_to_end(tmp_path, data_dir, name):
    # One straight run on 1 device is the end-to-end check (train, checkpoint, export, kNN,
    # linear); every form's step on 8 devices against 1 is in tests/test_steps.py.
    cfg = load_config(f"{name}:smoke", data_dir)
    if name != "mcl_cifar_resnet32x2.py":  # on TINY_NET: ResNet-18 trains end to end with
        tiny_nets(cfg)                      # seed_r18 and kd_r18 (tests/test_methods_disco.py)
    cfg.log_every_steps = 1
    cfg.mesh.num_devices = 1
    results = train.run(cfg, str(tmp_path / "a"))
    assert results["step"] == 4 and np.isfinite(results["linear_top1"])
    if "classifier" in cfg.evals:  # the supervised forms: every network's own top-1
        ev = results["evals"]
        nets = [ev[f"classifier/net{i}_top1"] for i in range(cfg.loss.num_nets)]
        assert ev["classifier/top1"] == max(nets) and 0 <= ev["classifier/ensemble_top1"] <= 100
        assert ev["classifier/net0_top5"] >= ev["classifier/net0_top1"]
    a = read_metrics(str(tmp_path / "a"))
    terms = ("loss", "vcl", "icl", "soft_vcl", "soft_icl")
    assert all(a[0][k] > 0 for k in terms)
    assert a[-1]["loss"] != a[0]["loss"]
    # The export is network 0 as a plain encoder: it rebuilds and runs without the cohort.
    variables, manifest = checkpoint.load_encoder(str(tmp_path / "a" / "encoder"))
    assert set(variables["params"]) == {"backbone", "head"}
    out = models.build_encoder(manifest).apply(variables, np.zeros((2, 16, 16, 3), np.float32))
    assert out["embedding"].shape == (2, 128)


def _smoke(name, data_dir, **overrides):
    cfg = load_config(f"{name}:smoke", data_dir)
    for k, v in overrides.items():
        cfg.loss[k] = v
    return cfg


@pytest.mark.parametrize("name,overrides,match", [
    (CONFIGS[0], {"form": "bank"}, "loss.form"),
    (CONFIGS[0], {"num_nets": 1}, "num_nets"),
    (CONFIGS[0], {"per_class": 1}, "per_class"),
    (CONFIGS[0], {"shared_stem": True}, "shared_stem"),
    (CONFIGS[0], {"tau": 0.0}, "tau"),
    (CONFIGS[1], {"neg_k": 0}, "neg_k"),
    (CONFIGS[2], {"momentum": 1.0}, "momentum"),
])
def test_bad_settings_fail_before_compiling(data_dir, name, overrides, match):
    with pytest.raises(ConfigError, match=match):
        methods.get("mcl").validate(_smoke(name, data_dir, **overrides))


def test_too_few_classes_in_the_classifier(data_dir):
    cfg = _smoke(CONFIGS[0], data_dir)
    cfg.student.num_classes = 5
    with pytest.raises(ConfigError, match="num_classes=10"):
        methods.get("mcl").validate(cfg)
