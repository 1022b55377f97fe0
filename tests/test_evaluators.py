"""Evaluators on small data against independent references, and their reduced protocols.

The network is a random-init ResNet-18 (width 0.25, CIFAR stem, with a 10-way classifier) on
the embedded digits at 16 px: cheap to compile, and its features are informative enough that
the kNN and probes land well above chance.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from disco_jax import data, evaluate, models, sharding
from disco_jax import eval as evaluation
from disco_jax.data import sources
from disco_jax.errors import ConfigError
from disco_jax.eval import agreement, classifier, common, linear, semi, transfer
from tests.helpers import TINY_NET

SIZE = 16
# The evaluators are under test, not the network: `TINY_NET` compiles fastest.
NET = {**TINY_NET, "head": "mlp", "head_hidden": 0, "embed_dim": 16, "num_classes": 10}


@pytest.fixture(scope="module")
def encoder():
    module = models.build_encoder(NET)
    variables = jax.jit(functools.partial(module.init, train=False))(
        jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
    host = jax.tree_util.tree_map(np.asarray, dict(variables))
    return module, host, {**NET, "path": "random", "fingerprint": "r0"}


def make_env(data_dir, tmp_path, mesh=None, **kw):
    cfg = mlc.ConfigDict({"name": "digits", "data_dir": data_dir, "train_split": "train",
                          "eval_split": "test", "image_size": SIZE, "bad_images": "error"})
    return evaluation.Env(mesh=mesh or sharding.make_mesh(8), data=cfg,
                          workdir=str(tmp_path), batch_size=64, **kw)


def make_model(encoder, mesh=None):
    module, host, manifest = encoder
    return evaluate.build_model(module, host, manifest, mesh or sharding.make_mesh(8),
                                jnp.float32)


def run_entry(entry, env, model, name="e"):
    evals = mlc.ConfigDict({name: entry})
    evaluation.validate(evals, env)
    return evaluation.Suite(evals, env).run(name, model)


# --------------------------------------------------------------------------- references


def np_knn(train_f, train_y, test_f, test_y, k, temp, num_classes):
    a = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
    b = test_f / np.linalg.norm(test_f, axis=1, keepdims=True)
    top1 = top5 = 0
    for row, y in zip(b @ a.T, test_y, strict=True):
        idx = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, train_y[idx], np.exp(row[idx] / temp))
        order = np.argsort(-votes, kind="stable")
        top1 += order[0] == y
        top5 += y in order[:5]
    return 100 * top1 / len(test_y), 100 * top5 / len(test_y)


@pytest.mark.slow
def test_knn_evaluator_matches_numpy_over_the_k_sweep(encoder, data_dir, tmp_path):
    env = make_env(data_dir, tmp_path)
    model = make_model(encoder)
    rec = run_entry(evaluation.block("knn", ks=(1, 5, 20, 100)), env, model)
    src = data.get_source(env.data)
    tr = common.extract(model, src, "train", size=SIZE, batch_size=64)
    te = common.extract(model, src, "test", size=SIZE, batch_size=64)
    assert len(tr["label"]) == 1437 and len(te["label"]) == 360  # every example once
    for k in (1, 5, 20, 100):
        top1, top5 = np_knn(tr["features"].astype(np.float64), tr["label"],
                            te["features"].astype(np.float64), te["label"], k, 0.07, 10)
        # float32 vs float64 similarities: a vote can only flip on a near-tie, 1 image = 0.28 %
        assert abs(rec["metrics"][f"top1_k{k}"] - top1) <= 0.3, k
        assert abs(rec["metrics"][f"top5_k{k}"] - top5) <= 0.3, k
    assert rec["metrics"]["top1"] == rec["metrics"]["top1_k20"]
    assert 50 < rec["metrics"]["top1"] <= 100  # random conv features of digits: informative
    assert rec["version"] == 1 and rec["settings"]["temp"] == 0.07


# Slow, as the other 8-vs-1 tests: kNN's own 8-vs-1 and NumPy checks on synthetic features are
# quick (tests/test_knn.py); this one is on a real extraction (14 s of the quick tier's time).
@pytest.mark.slow
def test_knn_8_devices_equal_1_device(encoder, data_dir, tmp_path):
    # Same features in, the same metrics out: only where the bank lives differs.
    model8 = make_model(encoder)
    src = data.get_source(make_env(data_dir, tmp_path).data)
    tr = common.extract(model8, src, "train", size=SIZE, batch_size=64)
    te = common.extract(model8, src, "test", size=SIZE, batch_size=64)
    outs = [evaluation.knn.knn_topk(tr["features"], tr["label"], te["features"], te["label"],
                                    num_classes=10, ks=(10, 200), mesh=sharding.make_mesh(n),
                                    chunk=100)
            for n in (8, 1)]
    assert outs[0] == outs[1]


def test_linear_fast_and_classifier(encoder, data_dir, tmp_path):
    env = make_env(data_dir, tmp_path, has_classifier=True)
    model = make_model(encoder)
    lin = run_entry(evaluation.block("linear_fast", epochs=10), env, model)["metrics"]
    assert set(lin) == {"top1", "top5"} and 50 < lin["top1"] <= lin["top5"] <= 100
    cls = run_entry(evaluation.block("classifier"), env, model)["metrics"]
    # An untrained classifier: its logits against an explicit NumPy top-k.
    src = data.get_source(env.data)
    out = common.extract(model, src, "test", size=SIZE, batch_size=64, keys=("logits",))
    order = np.argsort(-out["logits"], axis=1)
    assert cls["top1"] == pytest.approx(100 * np.mean(order[:, 0] == out["label"]))
    assert cls["top5"] == pytest.approx(
        100 * np.mean((order[:, :5] == out["label"][:, None]).any(1)))


def test_cohort_classifier_metrics_against_numpy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 50)
    logits = rng.normal(size=(3, 50, 7))
    logits[1, np.arange(50), labels] += 2.0  # network 1 is the best
    got = classifier.cohort_metrics(logits, labels)
    for i in range(3):
        assert got[f"net{i}_top1"] == pytest.approx(100 * np.mean(logits[i].argmax(1) == labels))
        top5 = np.argsort(-logits[i], 1)[:, :5]
        assert got[f"net{i}_top5"] == pytest.approx(100 * np.mean((top5 == labels[:, None]).any(1)))
    assert got["best_net"] == 1 and got["top1"] == got["net1_top1"]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert got["ensemble_top1"] == pytest.approx(100 * np.mean(probs.mean(0).argmax(1) == labels))


def test_agreement_metrics_against_numpy():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(40, 8))
    s = t + 0.3 * rng.normal(size=(40, 8))
    q = rng.normal(size=(30, 8))
    got = agreement.agreement_metrics(s, t, q)
    un = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    assert got["cos"] == pytest.approx(np.mean([un(s)[i] @ un(t)[i] for i in range(40)]))
    nn_s, nn_t = (un(s) @ un(q).T).argmax(1), (un(t) @ un(q).T).argmax(1)
    assert got["queue_nn"] == pytest.approx(100 * np.mean(nn_s == nn_t))
    iu = np.triu_indices(40, 1)
    want = np.corrcoef((un(s) @ un(s).T)[iu], (un(t) @ un(t).T)[iu])[0, 1]
    assert got["sim_corr"] == pytest.approx(want)
    assert agreement.agreement_metrics(t, t, q) == pytest.approx(
        {"cos": 1.0, "queue_nn": 100.0, "sim_corr": 1.0})


# --------------------------------------------------------------------------- augmented probe


def official_lr(epoch, lr, milestones, gamma):
    """moco/main_lincls.py `adjust_learning_rate` (gamma 0.1) and DisCo's halving (0.5)."""
    for m in milestones:
        lr *= gamma if epoch >= m else 1.0
    return lr


@pytest.mark.parametrize("preset", ["moco", "disco", "seed"])
def test_probe_lr_schedule_is_the_official_one(preset):
    cfg = evaluation.block("linear", preset=preset)
    spe = 7
    lr = jax.jit(linear.schedule(cfg, spe))
    for epoch in range(100):
        if preset == "seed" and epoch < 5:
            want = 30.0 * (epoch + 1) / 5  # lr x 256/256 warmed up over 5 epochs
        else:
            want = official_lr(epoch, {"moco": 30.0, "seed": 30.0, "disco": 3.0}[preset],
                               cfg.milestones, cfg.gamma)
        for step in (epoch * spe, epoch * spe + spe - 1):  # constant within an epoch
            assert float(lr(step)) == pytest.approx(want, rel=1e-6), (epoch, step)
    if preset == "disco":
        assert official_lr(99, 3.0, cfg.milestones, 0.5) == pytest.approx(3.0 / 2 ** 11)
    assert linear.epoch_lr(61, lr=30, batch=256, milestones=(60, 80), gamma=0.1) == 3.0


def test_probe_transforms(data_dir, tmp_path):
    """Train: RandomResizedCrop(scale 0.08-1) + flip from the training pipeline; test: the
    centre crop. The probe's stream is the trainer's pipeline with the probe's settings."""
    env = make_env(data_dir, tmp_path)
    cfg = evaluation.block("linear", probe_batch_size=32)
    ev = linear.Evaluator(cfg, env, "linear")
    assert tuple(cfg.crop_scale) == (0.08, 1.0) and cfg.flip_p == 0.5
    src = data.get_source(env.data)
    got = next(ev.training.stream(0).as_numpy_iterator())
    want = next(data.train_dataset(src, split="train", views=1, image_size=SIZE,
                                   crop_scale=(0.08, 1.0), flip_p=0.5, local_batch=32, seed=0,
                                   shuffle_buffer=cfg.shuffle_buffer).as_numpy_iterator())
    np.testing.assert_array_equal(got["image"], want["image"])
    # A resumed stream continues exactly (a pure function of (seed, step)).
    it = ev.training.stream(0).as_numpy_iterator()
    third = [next(it) for _ in range(3)][2]
    np.testing.assert_array_equal(next(ev.training.stream(2).as_numpy_iterator())["image"],
                                  third["image"])
    # Random crops differ from the deterministic centre view of the same split.
    centre = next(data.eval_dataset(src, split="train", image_size=SIZE,
                                    local_batch=32).as_numpy_iterator())
    assert not np.array_equal(centre["image"], got["image"])


@pytest.mark.slow
def test_augmented_probe_trains_and_resumes(encoder, data_dir, tmp_path):
    env = make_env(data_dir, tmp_path / "a")
    model = make_model(encoder)
    # Reduced: 2 epochs; milder crops, 8x8 digits do not survive 8 % crops at 16 px.
    entry = evaluation.block("linear", preset="moco", epochs=2, probe_batch_size=64, lr=0.1,
                             crop_scale=(0.6, 1.0), checkpoint_every_steps=10)
    rec = run_entry(entry, env, model)
    assert rec["deviations"] == ["checkpoint_every_steps", "crop_scale", "epochs", "lr",
                                 "probe_batch_size"]
    # Chance is 10 % (36 of 360); 17 % is 3 standard deviations of a guessing probe above it.
    assert 17 < rec["metrics"]["top1"] <= 100
    ckpt = tmp_path / "a" / "e" / "checkpoints"
    steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
    assert steps[-1] == 2 * (1437 // 64)  # 22 steps per epoch, the last one saved
    # Resume: drop the final checkpoint; the rerun continues from step 20 to the same head.
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "e" / "checkpoints" / str(steps[-1]))
    again = run_entry(entry, make_env(data_dir, tmp_path / "b"), model)
    assert again["metrics"] == rec["metrics"]
    # A checkpoint of other weights is refused, not silently reused.
    other = evaluate.build_model(*encoder[:2], {**encoder[2], "fingerprint": "other"},
                                 sharding.make_mesh(8), jnp.float32)
    with pytest.raises(ConfigError, match="holds a e run of other weights"):
        run_entry(entry, make_env(data_dir, tmp_path / "b"), other)


# --------------------------------------------------------------------------- semi, transfer


def test_per_class_subset_and_subset_source(data_dir):
    src = data.get_source({"name": "digits", "data_dir": data_dir})
    labels = sources.split_labels(src, "train")
    ids = sources.per_class_subset(labels, fraction=0.1, seed=0)
    counts = np.bincount(labels[ids], minlength=10)
    want = np.array([max(1, round(0.1 * c)) for c in np.bincount(labels, minlength=10)])
    np.testing.assert_array_equal(counts, want)
    assert np.array_equal(ids, sources.per_class_subset(labels, fraction=0.1, seed=0))
    sub = sources.subset(src, "train", ids, "train_10pct")
    assert sub.num_examples("train_10pct") == len(ids)
    got = [int(ex["label"]) for ex in sub.dataset("train_10pct").as_numpy_iterator()]
    assert got == labels[ids].tolist()
    # Shards of the subset cover it exactly once.
    halves = [int(ex["label"]) for i in range(2)
              for ex in sub.dataset("train_10pct", i, 2, drop_remainder=False)
              .as_numpy_iterator()]
    assert halves == got


@pytest.mark.slow
def test_semi_linear_and_finetune_reduced(encoder, data_dir, tmp_path):
    env = make_env(data_dir, tmp_path)
    model = make_model(encoder)
    small = dict(epochs=2, probe_batch_size=16, log_every_steps=5, checkpoint_every_steps=50)
    counts = np.bincount(sources.split_labels(data.get_source(env.data), "train"))
    n10 = sum(max(1, round(0.1 * c)) for c in counts)  # 10 % of each class
    lin = run_entry(evaluation.block("semi", preset="disco", subset="10pct", **small), env,
                    model)["metrics"]
    assert lin["labelled"] == n10 and 0 <= lin["top1"] <= lin["top5"] <= 100
    entry = evaluation.block("semi", preset="simclr_10pct", **small)
    with pytest.raises(ConfigError, match="holds a e run of other settings"):
        run_entry(entry, env, model)  # the linear run's checkpoints are never mixed in
    ft = run_entry(entry, env, model, name="ft")
    assert ft["metrics"]["labelled"] == n10 and 0 <= ft["metrics"]["top1"] <= 100
    assert ft["settings"]["nesterov"] and ft["settings"]["mode"] == "finetune"


def _write_folder(root, n_per_class=12, classes=3, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_per_class), ("test", n_per_class // 2)):
        for c in range(classes):
            os.makedirs(root / split / f"c{c}", exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (20, 20, 3)).astype(np.uint8)
                img[..., c] += 150  # the class is the dominant colour
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.png")


def test_transfer_on_a_folder_dataset(encoder, data_dir, tmp_path):
    _write_folder(tmp_path / "imgs")
    env = make_env(data_dir, tmp_path)
    entry = evaluation.block("transfer", num_c=4, c_min=1e-2, c_max=1e1, max_iter=300)
    entry.data.name = f"folder:{tmp_path / 'imgs'}"
    got = run_entry(entry, env, make_model(encoder))["metrics"]
    assert got["top1"] > 80 and got["best_c"] in np.logspace(-2, 1, 4)


def test_select_and_fit_against_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    w = rng.normal(size=(6, 3))
    x = rng.normal(size=(300, 6))
    y = (x @ w + 0.5 * rng.normal(size=(300, 3))).argmax(1)
    grid = np.array([1e-3, 1e-1, 10.0])
    got = transfer.select_and_fit(x[:150], y[:150], x[150:200], y[150:200], x[200:], y[200:],
                                  num_classes=3, grid=grid, max_iter=500)
    tr, va, te = transfer.standardise(x[:150], x[150:200], x[200:])
    val = [LogisticRegression(C=c, max_iter=500).fit(tr, y[:150]).score(va, y[150:200])
           for c in grid]
    best = grid[int(np.argmax(val))]
    clf = LogisticRegression(C=best, max_iter=500).fit(np.concatenate([tr, va]), y[:200])
    assert got["best_c"] == best
    assert got["top1"] == pytest.approx(100 * clf.score(te, y[200:]))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("entry, message", [
    (lambda: {"type": "nope"}, "unknown evaluator 'nope'"),
    (lambda: evaluation.block("knn", temp=-1.0), "temp must be positive"),
    (lambda: evaluation.block("knn", ks=(10, 0)), "every k must be a positive integer"),
    (lambda: evaluation.block("knn", k=0), "every k must be a positive integer"),
    (lambda: evaluation.block("linear_fast", epochs=0), "epochs must be a positive integer"),
    (lambda: evaluation.block("linear", epochs=0), "epochs must be a positive integer"),
    (lambda: evaluation.block("semi", subset="5pct"), "subset '5pct' does not exist"),
    (lambda: evaluation.block("semi", probe_batch_size=64), "fewer than probe_batch_size=64"),
    (lambda: evaluation.block("knn", test_split="validation"), "needs split 'validation'"),
    (lambda: evaluation.block("knn", version=7), "protocol version 7 of 'knn'"),
    (lambda: evaluation.block("classifier"), "has no classifier"),
    (lambda: evaluation.block("transfer"), "transfer needs the other dataset"),
    (lambda: evaluation.block("agreement", pred="pair"), "has no teacher"),
])
def test_bad_entries_are_one_line_errors(data_dir, tmp_path, entry, message):
    env = make_env(data_dir, tmp_path, mesh=sharding.make_mesh(1))
    with pytest.raises(ConfigError, match=message) as e:
        evaluation.validate(mlc.ConfigDict({"e": entry()}), env)
    assert "\n" not in str(e.value)
    assert not os.listdir(tmp_path)  # validation writes nothing


def test_block_refuses_unknown_settings():
    with pytest.raises(ConfigError, match="has no setting nope"):
        evaluation.block("knn", nope=1)
    with pytest.raises(ConfigError, match="unknown linear preset 'mocco'"):
        evaluation.block("linear", preset="mocco")


def test_semi_on_imagenet_uses_the_tfds_subset(encoder, tmp_path):
    """The ImageNet path: `imagenet2012_subset/1pct` through TFDS's own builder (written
    offline in the same format), tested on imagenet2012's validation split."""
    from tests.imagenet_mock import write_all

    d = str(tmp_path / "tfds")
    write_all(d)
    cfg = mlc.ConfigDict({"name": "imagenet2012", "data_dir": d, "train_split": "train",
                          "eval_split": "validation", "image_size": SIZE,
                          "bad_images": "error"})
    env = evaluation.Env(mesh=sharding.make_mesh(8), data=cfg, workdir=str(tmp_path / "w"),
                         batch_size=16)
    entry = evaluation.block("semi", preset="disco", subset="1pct", epochs=2,
                             probe_batch_size=8)
    ev = semi.Evaluator(entry, env, "semi")
    assert ev.source.name == "imagenet2012_subset/1pct" and ev.source.num_classes == 1000
    assert (ev.train_split, ev.test_split) == ("train", "validation")
    rec = run_entry(entry, env, make_model(encoder, sharding.make_mesh(8)))
    assert rec["metrics"]["labelled"] == 16 and 0 <= rec["metrics"]["top1"] <= 100
    with pytest.raises(ConfigError, match="subset '2pct' does not exist"):
        evaluation.validate(mlc.ConfigDict({"e": evaluation.block("semi", subset="2pct")}), env)


@pytest.mark.slow
def test_long_protocol_preempted_by_sigterm_resumes_exactly(encoder, data_dir, tmp_path,
                                                            monkeypatch):
    import signal

    model = make_model(encoder)
    entry = evaluation.block("linear", epochs=1, probe_batch_size=64, lr=0.1,
                             checkpoint_every_steps=100)
    straight = run_entry(entry, make_env(data_dir, tmp_path / "s"), model)
    real = common.Progress.update

    def update(self, n=1):  # a preemption notice right after step 3
        real(self, n)
        if self.desc.endswith("training") and self.done == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(common.Progress, "update", update)
    env = make_env(data_dir, tmp_path / "p")
    with pytest.raises(linear.Preempted) as e:
        run_entry(entry, env, model)
    assert e.value.step == 3
    assert max(int(s) for s in os.listdir(tmp_path / "p" / "e" / "checkpoints")) == 3
    monkeypatch.undo()
    assert run_entry(entry, env, model)["metrics"] == straight["metrics"]
