"""Bad input stops before compiling with one clear line, and leaves the workdir untouched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from disco_jax import train
from disco_jax.errors import ConfigError
from tests.helpers import ROOT, load_config


@pytest.fixture
def cfg(data_dir, tmp_path):
    c = load_config("seed_mbv3.py:smoke", data_dir)
    c.teacher.init = str(tmp_path / "no_such_teacher")
    return c


def _set(cfg, key, value):
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("student.model", "mobilenet_v9", r"unknown model 'mobilenet_v9'; valid models: .*resnet"),
        ("teacher.model", "resnet5", r"unknown model 'resnet5'; valid models:"),
        ("method", "seeed", r"unknown method 'seeed'; valid methods: moco_v2, seed"),
        ("data.name", "cifar_10", r"cifar_10"),
        ("queue_size", 60, r"queue size 60 must be a positive multiple of the global batch 16"),
        ("batch_size", 12, r"global batch_size 12 is not divisible by the 8 devices"),
        ("loss.teacher_temp", 0.0, r"loss.teacher_temp must be positive, got 0.0"),
        ("loss.student_temp", -0.2, r"loss.student_temp must be positive"),
        ("teacher.init", "", r"needs teacher.init"),
    ],
)
def test_bad_input_gives_one_clear_error(cfg, tmp_path, key, value, message):
    _set(cfg, key, value)
    workdir = tmp_path / "w"
    with pytest.raises(ConfigError, match=message) as info:
        train.run(cfg, str(workdir))
    assert "\n" not in str(info.value)
    assert not workdir.exists()  # nothing was written


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


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "disco_jax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_official_seed_recipe_without_imagenet_says_how_to_prepare(tmp_path):
    empty = tmp_path / "tfds"
    empty.mkdir()
    proc = _cli("--config=configs/seed_mbv3.py", f"--workdir={tmp_path / 'w'}",
                f"--config.data.data_dir={empty}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "imagenet2012" in last and "manual" in last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_cli_unknown_override_key_fails(tmp_path):
    proc = _cli("--config=configs/seed_mbv3.py:smoke", f"--workdir={tmp_path / 'w'}",
                "--config.no_such_field=1")
    assert proc.returncode != 0 and "no_such_field" in proc.stderr
    assert not (tmp_path / "w").exists()
