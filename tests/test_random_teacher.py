"""`teacher.init="random"`: an untrained teacher of the configured architecture, which every
teacher-based smoke variant uses (so `configs/NAME.py:smoke` runs with no other flag); refused
for a recipe that is not a smoke or benchmark variant unless `force_random_teacher` is set.

The smoke variants train end to end with it in test_methods_disco (SEED, DisCo, KD),
test_train (seed_mbv3, also resumed through the CLI) and test_methods_ssl (both SSLD stages).
"""

from __future__ import annotations

import copy
import glob
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from disco_jax import methods, resilience, sharding, train
from disco_jax.errors import ConfigError
from tests.helpers import ROOT, load_config

RECIPES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _stages(cfg):
    return [cfg.stages[s] for s in cfg.stage_order] if "stages" in cfg else [cfg]


def _validate(cfg):
    cfg = methods.resolve_loss(cfg)
    return train.validate(cfg, methods.get(cfg.method), sharding.make_mesh(cfg.mesh.num_devices))


@pytest.mark.parametrize("name", RECIPES)
def test_every_smoke_variant_validates_with_no_teacher_flag(name, data_dir):
    for stage in _stages(load_config(f"{name}:smoke", data_dir)):
        stage = copy.deepcopy(stage)  # as run_stages does: demo's stages share their networks
        if "{workdir}" in stage.teacher.init:
            continue  # an earlier stage's teacher (demo.py): test_demo_smoke_runs_all_stages
        if "{workdir}" in stage.student.get("init", ""):
            stage.student.init = ""  # an earlier stage's encoder (SSLD's fine-tune)
        _, manifest = _validate(stage)
        assert stage.variant == "smoke"
        if methods.get(stage.method).NEEDS_TEACHER:
            assert stage.teacher.init == "random"
            assert manifest["model"] == stage.teacher.model
            assert manifest["embed_dim"] == stage.teacher.embed_dim
            assert manifest["num_classes"] == stage.teacher.num_classes


def _full(name, data_dir):
    """The recipe as published (its first stage), on the digits data, teacher.init=random."""
    cfg = _stages(load_config(name, data_dir))[0]
    cfg.data.name, cfg.data.train_split, cfg.data.eval_split = "digits", "train", "test"
    if cfg.batch_size > 1024:  # digits has 1437 train images: SSLD's batch of 5760 is cut
        cfg.batch_size = cfg.loss.bn_group_size  # to one BN group (240)
    cfg.teacher.init = "random"
    return cfg


@pytest.mark.parametrize("name", ["seed_r18.py", "disco_mbv3.py", "kd_r18.py", "ssld_mbv3.py"])
def test_random_teacher_on_a_full_recipe_is_refused_unless_forced(name, data_dir):
    cfg = _full(name, data_dir)
    with pytest.raises(ConfigError, match=r"force_random_teacher=True") as info:
        _validate(cfg)
    assert "\n" not in str(info.value) and "variant is 'full'" in str(info.value)
    cfg.force_random_teacher = True
    _, manifest = _validate(cfg)  # validation only: nothing is trained
    assert manifest["path"] == "random" and manifest["model"] == cfg.teacher.model
    if cfg.method == "ssld":  # the classifier teacher, built from the config
        assert manifest["num_classes"] == cfg.student.num_classes == 1000
    # Neither key changes a run's trajectory: a checkpoint made before they existed resumes.
    assert not {"variant", "force_random_teacher"} & set(resilience.trajectory_config(cfg))


@pytest.mark.slow
def test_cli_random_teacher_on_a_full_recipe_exits_2_naming_the_flag(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "disco_jax.main", "--config=configs/seed_r18.py",
         f"--workdir={tmp_path / 'w'}", "--config.teacher.init=random"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--config.force_random_teacher=True" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_random_teacher_is_the_configured_classifier_and_the_same_each_time(data_dir, caplog):
    cfg = _stages(load_config("ssld_mbv3.py:smoke", data_dir))[0]
    method = methods.get(cfg.method)
    with caplog.at_level(logging.WARNING, logger="disco_jax"):
        module, variables, manifest = train.load_teacher(cfg, method, jnp.float32)
    assert "teacher.init=random: the teacher is untrained" in caplog.text
    assert manifest["path"] == "random" and len(manifest["fingerprint"]) == 64
    x = jnp.zeros((2, cfg.data.image_size, cfg.data.image_size, 3))
    out = jax.eval_shape(lambda v: module.apply(v, x, train=False), variables)
    assert out["logits"].shape == (2, cfg.teacher.num_classes)
    # Every process and every resume rebuilds the same teacher; another seed, another one.
    assert train.load_teacher(cfg, method, jnp.float32)[2] == manifest
    cfg.seed += 1
    other = train.load_teacher(cfg, method, jnp.float32)[2]
    assert other["fingerprint"] != manifest["fingerprint"]
