"""SSLD (untrained teacher), SimCLR and BYOL on the one trainer: smoke configs end to end, the
`data.extra` mixture and `student.init`. Their steps (and `supervised`'s) on 8 vs 1 device are
checked at step level in tests/test_steps.py."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from disco_jax import checkpoint, data, main, methods, train
from disco_jax.errors import ConfigError
from disco_jax.methods import ssld
from tests.helpers import load_config, read_metrics, tiny_nets


def final_state(workdir):
    mngr = checkpoint.manager(workdir, keep=5, every_steps=1)
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    mngr.close()
    return jax.tree_util.tree_map(np.asarray, dict(restored["state"]))


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


@pytest.fixture(scope="module")
def ssld_run(tmp_path_factory, data_dir):
    """configs/ssld_mbv3.py:smoke through main.run_stages, no teacher flag (an untrained
    10-class teacher): SSLD on digits + an extra source, SSLD fine-tune from the distilled
    encoder. Both networks of both stages on `TINY_NET` (the recipe's smoke ResNet-18s: SSLD's
    code paths are the same on any classifier)."""
    cfg = load_config("ssld_mbv3.py:smoke", data_dir)
    for name in cfg.stage_order:
        tiny_nets(cfg.stages[name], teachers=None)
    workdir = str(tmp_path_factory.mktemp("ssld"))
    summary = main.run_stages(cfg, workdir)
    return cfg, workdir, summary


@pytest.mark.slow
def test_ssld_smoke_stages_run_end_to_end_and_finetune_starts_from_distilled(ssld_run):
    cfg, workdir, summary = ssld_run
    assert 0 <= summary["stages"]["finetune"]["linear_top1"] <= 100
    assert os.path.exists(os.path.join(workdir, "results.md"))
    assert list(summary["stages"]) == ["distill", "finetune"]
    teachers = []
    for name in ("distill", "finetune"):
        assert summary["stages"][name]["step"] == 3
        assert np.isfinite([r["loss"] for r in read_metrics(os.path.join(workdir, name))]).all()
        teachers.append(json.load(open(os.path.join(workdir, name, "run_info.json")))[0]
                        ["teacher"])
    # Both stages built the same untrained teacher (the same seed), recorded as such.
    assert teachers[0] == teachers[1] and teachers[0]["path"] == "random"
    # The SSLD loss starts positive (student != teacher) and the agreement metric is logged.
    first = read_metrics(os.path.join(workdir, "distill"))[0]
    assert first["loss"] > 0 and 0 <= first["teacher_agreement"] <= 100
    # Fine-tune: 3 steps at lr ~6e-5 from the distilled encoder stay next to it; a fresh
    # initialisation would be O(1) away.
    distilled, _ = checkpoint.load_encoder(os.path.join(workdir, "distill", "encoder"))
    tuned, _ = checkpoint.load_encoder(os.path.join(workdir, "finetune", "encoder"))
    diff = np.abs(flat(distilled["params"]) - flat(tuned["params"]))
    assert 0 < diff.max() < 1e-2


@pytest.mark.slow
def test_ssld_student_init_loads_and_rejects_mismatches(ssld_run):
    cfg, workdir, _ = ssld_run
    stage = cfg.stages["finetune"].copy_and_resolve_references()
    # run_stages resolves "{workdir}" in its own copy of each stage, not in `cfg`.
    stage.teacher.init = stage.teacher.init.format(workdir=os.path.abspath(workdir))
    enc = os.path.join(workdir, "distill", "encoder")
    stage.student.init = enc
    variables, _ = checkpoint.load_encoder(enc)
    zeros = jax.tree_util.tree_map(np.zeros_like, {k: variables[k]
                                                   for k in ("params", "batch_stats")})
    ctx = {"host": ssld.host_init(stage, {})}  # read on the host, then handed to init_extra
    got = ssld.init_extra(stage, None, zeros, ctx)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got["params"], variables["params"])
    bad = jax.tree_util.tree_map(lambda x: np.zeros((*x.shape, 1)), zeros)
    with pytest.raises(ConfigError, match="do not match"):
        ssld.init_extra(stage, None, bad, ctx)
    stage.student.model = "mobilenet_v3_large"
    with pytest.raises(ConfigError, match="student.init"):
        ssld.validate(stage)


@pytest.mark.slow
def test_ssld_validate_rejects_non_classifiers_and_bad_options(ssld_run):
    cfg, workdir, _ = ssld_run
    stage = cfg.stages["distill"].copy_and_resolve_references()
    ssld.validate(stage)  # its untrained teacher: the config's own 10-class classifier
    for key, value, match in [("teacher_bn", "frozen", "teacher_bn"),
                              ("temperature", 0.0, "temperature"), ("eps", -1.0, "eps")]:
        old = stage.loss[key]
        stage.loss[key] = value
        with pytest.raises(ConfigError, match=match):
            ssld.validate(stage)
        stage.loss[key] = old
    stage.student.num_classes = 0
    with pytest.raises(ConfigError, match="classifiers"):
        ssld.validate(stage)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simclr_r50.py", "byol_r50.py"])
def test_ssl_smoke_config_runs_end_to_end(name, tmp_path, data_dir):
    # On `TINY_NET`: the runs, LARS and the evaluators are under test here; ResNet-18 trains in
    # seed_r18's run (tests/test_methods_disco.py) and at model level (tests/test_models.py).
    cfg = tiny_nets(load_config(f"{name}:smoke", data_dir))
    cfg.total_steps = 3
    cfg.checkpoint_every_steps = 3
    cfg.log_every_steps = 1
    cfg.mesh.num_devices = 1  # the step on 8 devices: tests/test_steps.py (half the compile)
    res = train.run(cfg, str(tmp_path / "w"))
    assert 0 <= res["knn_top1"] <= 100 and 0 <= res["linear_top1"] <= 100
    assert np.isfinite([r["loss"] for r in read_metrics(str(tmp_path / "w"))]).all()
    # The exported encoder is the online backbone + projector (BYOL's predictor left out).
    variables, manifest = checkpoint.load_encoder(str(tmp_path / "w" / "encoder"))
    assert set(variables["params"]) == {"backbone", "head"}
    assert manifest["method"] == cfg.method
    if cfg.method == "byol":
        state = final_state(str(tmp_path / "w"))
        assert set(state["params"]) == {"encoder", "predictor"}
        # The target lags the online encoder, with BYOL's cosine tau schedule (K = 3 steps).
        assert np.abs(flat(state["ema"]["params"]) - flat(state["params"]["encoder"])).max() > 0
        taus = [r["tau"] for r in read_metrics(str(tmp_path / "w"))]
        base = 1 - cfg.loss.tau_base  # 0.99 at the recipe's 300 epochs (the official preset)
        want = [1 - base * (np.cos(np.pi * k / 3) + 1) / 2 for k in range(3)]
        np.testing.assert_allclose(taus, want, rtol=1e-6)


def test_data_extra_mixes_unlabelled_examples_into_the_training_stream_only(data_dir):
    extra = ({"name": "digits", "split": "test"},)
    src = data.get_source({"name": "digits", "data_dir": data_dir, "train_split": "train",
                           "extra": extra})
    plain = data.get_source({"name": "digits", "data_dir": data_dir})
    n_train, n_test = plain.num_examples("train"), plain.num_examples("test")
    # Training view: both parts, evenly interleaved in every shard; extras labelled -1.
    assert src.shard_size("train") == n_train + n_test
    for p in range(2):
        labels = np.array([e["label"] for e in src.dataset("train", p, 2).as_numpy_iterator()])
        assert len(labels) == (n_train + n_test) // 2
        assert abs(np.sum(labels == -1) - n_test // 2) <= 1
        assert np.all(labels[labels >= 0] < 10)
    # Evaluation view (every example once) and num_examples: the labelled split alone.
    assert src.num_examples("train") == n_train
    assert src.shard_size("train", drop_remainder=False) == n_train
    ev = list(src.dataset("train", drop_remainder=False).as_numpy_iterator())
    assert len(ev) == n_train and min(e["label"] for e in ev) >= 0
    # The training stream stays a pure function of (seed, step): resume == straight run.
    kw = dict(split="train", views=1, image_size=8, local_batch=16, seed=3)
    straight = list(data.train_dataset(src, **kw).take(5).as_numpy_iterator())
    resumed = list(data.train_dataset(src, start_step=3, **kw).take(2).as_numpy_iterator())
    for a, b in zip(straight[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert data.steps_per_epoch(src, split="train", local_batch=16) == (n_train + n_test) // 16
    with pytest.raises(ConfigError, match="name"):
        data.get_source({"name": "digits", "data_dir": data_dir, "extra": ({"split": "x"},)})


# ---------------------------------------------------------------------------------------------
# BYOL's asymmetric views and SimCLR's projection head (recipes against the official codes)


def test_byol_views_draw_their_own_blur_and_solarize_probabilities():
    """deepmind-research/byol augmentations.py: blur p 1.0 / 0.1, solarize p 0 / 0.2 for view 1
    / view 2. Images with every pixel above the threshold 0.5 make both events visible per
    image: a solarised image lies wholly below 0.5 (blurring keeps it above), and a blurred one
    (sigma in [1, 2] here, so its 3-tap kernel moves noise by far more than float error)
    differs from its input."""
    import functools

    import jax.numpy as jnp

    cfg = load_config("byol_r50.py")
    settings = {**cfg.augment, "jitter_p": 0.0, "gray_p": 0.0, "blur_sigma": (1.0, 2.0)}
    mean, std = np.asarray(cfg.data.mean), np.asarray(cfg.data.std)
    n = 2000
    x = np.random.default_rng(0).integers(160, 256, (n, 8, 8, 3), dtype=np.uint8)
    unit = x / 255.0
    frac = {}
    for view in (1, 2):
        aug = jax.jit(functools.partial(data.mocov2_augment, **settings, view=view,
                                        mean=tuple(mean), std=tuple(std)))
        out = np.asarray(aug(jax.random.PRNGKey(view), jnp.asarray(x)), np.float64) * std + mean
        solarized = out.reshape(n, -1).max(1) < 0.5
        assert np.all(solarized | (out.reshape(n, -1).min(1) > 0.5))  # all or nothing
        before = np.where(solarized[:, None, None, None], 1.0 - out, out)
        blurred = np.abs(before - unit).reshape(n, -1).max(1) > 1e-3
        frac[view] = (blurred.mean(), solarized.mean())
    assert frac[1] == (1.0, 0.0)  # p = 1 and p = 0: exact
    # Binomial counts of n draws: 6 standard deviations.
    for got, p in zip(frac[2], (0.1, 0.2), strict=True):
        assert abs(got - p) < 6 * np.sqrt(p * (1 - p) / n), frac[2]


def test_byol_loss_augments_view2_as_view_2_and_reads_total_steps_from_ctx():
    """Traced only (eval_shape): which setting each batch view is augmented with, and tau from
    ctx["total_steps"] (no import of the trainer at trace time)."""
    import jax.numpy as jnp

    from disco_jax.methods import byol

    cfg = methods.resolve_loss(load_config("byol_r50.py:smoke"))
    student = byol.build_student(cfg, jnp.float32)
    x = jnp.zeros((4, 16, 16, 3), jnp.uint8)
    variables = jax.eval_shape(lambda: student.init(jax.random.PRNGKey(0),
                                                    jnp.zeros((4, 16, 16, 3)), train=False))
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
             "step": jnp.zeros((), jnp.int32)}
    state["ema"] = jax.eval_shape(lambda s: byol.init_extra(cfg, None, s, {})["ema"], state)
    seen, calls = {}, []

    def augment(rng, images, view=1):
        calls.append((view, images is seen["batch"]["view1"], images is seen["batch"]["view2"]))
        return images.astype(jnp.float32)

    ctx = {"student": student, "augment": augment, "config": cfg, "mesh": None,
           "total_steps": 7, "steps_per_epoch": 7}

    def loss(params, state, batch):
        seen["batch"] = batch
        return byol.loss_fn(params, state, batch, jax.random.PRNGKey(1), None, ctx)

    _, (metrics, _) = jax.eval_shape(loss, state["params"], state,
                                     {"view1": x, "view2": x, "label": jnp.zeros(4, jnp.int32)})
    assert calls == [(1, True, False), (2, False, True)]
    assert metrics["tau"].shape == ()


def test_simclr_recipe_head_batch_normalises_its_output_without_centre():
    """google-research/simclr ProjectionHead: the last LinearLayer(use_bias=False,
    use_bn=True) is Dense without bias, then BN with a scale and no centre. Checked against a
    float64 NumPy forward of the recipe's head in train mode (batch statistics)."""
    from disco_jax import models

    cfg = load_config("simclr_r50.py")
    net = cfg.student
    head = models.create_head(net.head, out_dim=net.embed_dim, hidden_dim=net.head_hidden)
    feats = np.random.default_rng(0).normal(size=(64, 2048)).astype(np.float32)
    variables = head.init(jax.random.PRNGKey(0), feats, train=False)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    assert set(p["fc_3"]) == {"kernel"} and set(p["fc_4"]) == {"scale"}
    out, mutated = head.apply(variables, feats, train=True, mutable=["batch_stats"])

    def bn(z, scale, bias=0.0):  # train mode: biased batch variance, eps 1e-5
        return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5) * scale + bias

    h = feats.astype(np.float64) @ p["fc_0"]["kernel"] + p["fc_0"]["bias"]
    h = np.maximum(bn(h, p["fc_1"]["scale"], p["fc_1"]["bias"]), 0.0)
    z = h @ p["fc_3"]["kernel"]
    want = bn(z, p["fc_4"]["scale"])
    # float32 matmuls over 2048 terms of O(1): ~1e-6 relative; normalised outputs are O(1).
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(mutated["batch_stats"]["fc_4"]["mean"]),
                               0.1 * z.mean(0), rtol=1e-4, atol=1e-6)


def test_byol_recipe_takes_the_official_preset_of_its_length():
    # deepmind-research/byol configs/byol.py: lr / wd / EMA presets per number of epochs.
    for epochs, (lr, wd, tau) in {300: (0.3, 1e-6, 0.99), 1000: (0.2, 1.5e-6, 0.996),
                                  100: (0.45, 1e-6, 0.99)}.items():
        c = load_config(f"byol_r50.py:epochs={epochs}")
        assert (c.optimizer.base_lr, c.optimizer.weight_decay, c.loss.tau_base) == (lr, wd, tau)
        assert c.total_epochs == epochs
    with pytest.raises(ValueError, match="no official preset"):
        load_config("byol_r50.py:epochs=200")
