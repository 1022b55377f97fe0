"""The host input-pipeline benchmark (`disco_jax.bench.host`) on a handful of tiny JPEGs.

Checks fields, the JSON, and that every derived figure (per core, ratio to the floor, targets)
is consistent with the measured rates. No speed is asserted: benchmarks report figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from disco_jax.bench import host
from disco_jax.errors import ConfigError

TINY = {
    "images": 6, "seconds": 0.3, "host_warmup": 1, "host_batch": 2, "host_image_size": 16,
    "jpeg_size": "48x32", "jpeg_kb": 2.0, "aug_batch": 2, "steps": 3,
}
FIELDS = ("bench", "case", "img_per_sec", "img_per_sec_per_core", "cores", "batch",
          "image_size", "seconds", "images", "ratio_to_floor", "floor_case", "mean_jpeg_bytes",
          "tf_version", "jax_version", "views")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("host_bench")
    records = host.run(str(out), argparse.Namespace(**TINY))
    return out, records


@pytest.mark.slow
def test_every_case_has_the_fields(full_run):
    _, records = full_run
    assert [r["case"] for r in records] == list(host.CASES)
    for r in records:
        missing = [f for f in FIELDS if f not in r]
        assert not missing, (r["case"], missing)
        assert r["bench"] == "host"
        assert r["img_per_sec"] > 0 and r["images"] > 0
        assert r["seconds"] > 0
        assert r["image_size"] == TINY["host_image_size"]
        assert r["mean_jpeg_bytes"] > 0
    streams = [r for r in records if r["case"] != "device_augment"]
    for r in streams:
        assert r["batch"] == TINY["host_batch"]
        assert r["images"] % r["batch"] == 0
        assert r["seconds"] >= TINY["seconds"]
        assert r["img_per_sec"] == pytest.approx(r["images"] / r["seconds"])
        assert r["cores"] == host.available_cores()
        assert r["img_per_sec_per_core"] == pytest.approx(r["img_per_sec"] / r["cores"])
        assert 0 < r["cpu_util"]
    aug = records[-1]
    assert aug["case"] == "device_augment" and aug["batch"] == TINY["aug_batch"]
    assert aug["device_kind"] and aug["calls"] == TINY["steps"]
    assert aug["images"] == aug["batch"] * aug["calls"]
    assert aug["img_per_sec"] == pytest.approx(1e3 * aug["batch"] / aug["ms_per_batch_median"])
    assert aug["ms_per_batch_p90"] >= aug["ms_per_batch_median"] > 0


@pytest.mark.slow
def test_ratios_and_targets_follow_from_the_rates(full_run):
    _, records = full_run
    by_case = {r["case"]: r for r in records}
    assert by_case["train_2view"]["floor_case"] == "floor_2view"
    assert by_case["train_1view"]["floor_case"] == "fused_1view"
    for r in records:
        if r["floor_case"] is None:
            assert r["ratio_to_floor"] is None
            continue
        floor = by_case[r["floor_case"]]
        assert r["ratio_to_floor"] == r["img_per_sec"] / floor["img_per_sec"]
    two = by_case["train_2view"]
    assert two["meets_target"] == {
        "img_per_sec_per_core": two["img_per_sec_per_core"] >= host.TARGET_PER_CORE,
        "ratio_to_floor": two["ratio_to_floor"] >= host.TARGET_RATIO,
    }
    assert set(by_case["train_1view"]["meets_target"]) == {"ratio_to_floor"}
    assert "meets_target" not in by_case["floor_2view"]


@pytest.mark.slow
def test_json_matches_the_records(full_run):
    out, records = full_run
    written = json.loads((out / "host_bench.json").read_text())
    assert written["records"] == json.loads(json.dumps(records))
    setup = written["setup"]
    assert setup["dataset"]["images"] == TINY["images"]
    assert setup["dataset"]["mean_jpeg_bytes"] == records[0]["mean_jpeg_bytes"]
    assert 30 <= setup["dataset"]["jpeg_quality"] <= 100


def test_a_case_subset_gets_its_floor_and_threads_bound_the_cores(tmp_path):
    args = argparse.Namespace(**{**TINY, "host_cases": "train_1view", "threads": 1,
                                 "host_data_dir": str(tmp_path / "jpegs")})
    records = host.run(str(tmp_path / "out"), args)
    assert [r["case"] for r in records] == ["fused_1view", "train_1view"]
    assert all(r["cores"] == 1 and r["threads"] == 1 for r in records)
    # The dataset was kept in --data-dir and is reused, not rewritten.
    meta = json.loads(next((tmp_path / "jpegs").glob("*.json")).read_text())
    again = host.make_jpeg_dataset(str(tmp_path / "jpegs"), host.options(args), lambda m: None)
    assert again == meta


def test_quality_is_tuned_to_the_target_size():
    rng = np.random.default_rng(0)
    images = [host.synth_image(rng, 48, 64) for _ in range(2)]
    sizes = {q: np.mean([len(host._encode(im, q)) for im in images]) for q in (40, 95)}
    target = (sizes[40] + sizes[95]) / 2
    q = host.tune_quality(images, target)
    assert 40 < q < 95
    mean = np.mean([len(host._encode(im, q)) for im in images])
    for other in (q - 1, q + 1):
        assert abs(mean - target) <= abs(
            np.mean([len(host._encode(im, other)) for im in images]) - target)


def test_no_antialias_reaches_every_stream_and_the_record(tmp_path, monkeypatch):
    from disco_jax import data

    seen = []
    real_train, real_finish = data.train_dataset, host._finish

    def train_dataset(*a, **kw):
        seen.append(("train", kw["antialias"]))
        return real_train(*a, **kw)

    def finish(crop, size, antialias=True):
        seen.append(("floor", antialias))
        return real_finish(crop, size, antialias)

    monkeypatch.setattr(data, "train_dataset", train_dataset)
    monkeypatch.setattr(host, "_finish", finish)
    args = argparse.Namespace(**{**TINY, "host_cases": "train_2view", "antialias": False})
    records = host.run(str(tmp_path / "out"), args)
    assert set(seen) == {("train", False), ("floor", False)}
    assert [r["case"] for r in records] == ["floor_2view", "train_2view"]
    setup = json.loads((tmp_path / "out" / "host_bench.json").read_text())["setup"]
    assert setup["antialias"] is False
    parsed = host.parse_args(["--out", "x", "--no-antialias"])
    assert host.options(parsed)["antialias"] is False
    assert host.options(host.parse_args(["--out", "x"]))["antialias"] is True
    with pytest.raises(ConfigError, match="^antialias must be true or false, got 'no'$"):
        host.options(argparse.Namespace(**{**TINY, "antialias": "no"}))


@pytest.mark.parametrize("name, value, flag", [
    ("images", 0, "--images"), ("seconds", 0.0, "--seconds"), ("host_cases", "warp", "case"),
    ("jpeg_size", "500", "--jpeg-size"), ("host_batch", 7, "--batch"),
])
def test_bad_options_fail_before_anything_is_written(tmp_path, name, value, flag):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=flag):
        host.run(str(out), argparse.Namespace(**{**TINY, name: value}))
    assert not out.exists()


# The driver's `--suite host` hands the host module its own flags (--cases is the streams').
@pytest.mark.parametrize("entry", [["disco_jax.bench.host"],
                                   ["disco_jax.bench", "--suite", "host"]], ids=["host", "driver"])
@pytest.mark.parametrize("argv", [["--images", "0"], ["--images", "many"], ["--cases", "warp"]])
def test_cli_bad_option_is_one_error_line_and_exit_2(tmp_path, entry, argv):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", *entry, "--out", str(out), *argv],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not out.exists()
