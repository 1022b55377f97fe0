"""disco_jax.plot: curves, t-SNE and similarity PNGs, redraw and its CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from disco_jax import plot
from disco_jax.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_line(step: int) -> dict:
    return {"step": step, "loss": 2.0 / step, "loss_ce": 1.5 / step, "distill": 0.5 / step,
            "lr": 0.1 * step / 40, "grad_norm": 3.0 / step, "param_norm": 50.0 + step,
            "update_norm": 0.01, "steps_per_sec": 12.5, "note": "text is ignored"}


def _write_metrics(workdir: str) -> None:
    lines = [_train_line(s) for s in (10, 20, 30, 40)]
    lines.insert(2, {"step": 20, "knn/top1_k20": 41.0, "knn/top1_k200": 39.5,
                     "agree/cos": 0.8})
    lines.append({"step": 40, "knn/top1_k20": 55.0, "knn/top1_k200": 52.0, "agree/cos": 0.9})
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
        f.write('{"step": 50, "loss": 0.0')  # a line cut short by a preemption: skipped


def _check_png(path: str, min_bytes: int = 5000) -> np.ndarray:
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > min_bytes
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    return img


def _blobs(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centers = rng.normal(size=(classes, d)) * 4
    return centers[labels] + rng.normal(size=(n, d)), labels


def test_curve_groups_place_keys(tmp_path):
    _write_metrics(str(tmp_path))
    records = plot.read_metrics(str(tmp_path / "metrics.jsonl"))
    groups = plot.curve_groups(records)
    assert groups == {
        "loss": ["loss", "loss_ce", "distill"],
        "lr": ["lr"],
        "norms": ["grad_norm", "param_norm", "update_norm"],
        "knn": ["knn/top1_k20", "knn/top1_k200"],
        "agree": ["agree/cos"],
    }


def test_curve_groups_legacy_and_missing_panels():
    records = [{"step": 1, "loss": 1.0, "finite": 1.0, "steps_per_sec": 3.0},
               {"step": 1, "knn_top1": 40.0, "linear_top1": 50.0}]
    assert plot.curve_groups(records) == {"loss": ["loss"], "eval": ["knn_top1", "linear_top1"]}


def test_series_sorted_last_value_wins():
    records = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 30, "loss": 1.0},
               {"step": 20, "loss": 2.5}, {"step": 30, "loss": 1.5}, {"step": 25, "lr": 0.1}]
    steps, values = plot.series(records, "loss")
    assert steps.tolist() == [10, 20, 30] and values.tolist() == [3.0, 2.5, 1.5]


def test_curves_png_and_axes(tmp_path):
    workdir = str(tmp_path)
    _write_metrics(workdir)
    path = plot.curves(workdir)
    assert path == os.path.join(workdir, "plots", "curves.png")
    _check_png(path)
    fig = plot.curves_figure(plot.read_metrics(os.path.join(workdir, "metrics.jsonl")))
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["loss", "lr", "norms", "knn", "agree"]
    assert axes[2].get_yscale() == "log" and axes[0].get_yscale() == "linear"
    assert len(axes[0].get_lines()) == 3 and len(axes[3].get_lines()) == 2
    other = plot.curves(workdir, out=str(tmp_path / "elsewhere" / "c.png"))
    _check_png(other)


@pytest.mark.parametrize("content", [None, "", "\n\n", "not json\n"])
def test_curves_missing_or_empty_metrics(tmp_path, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ConfigError, match="metrics.jsonl") as e:
        plot.curves(str(tmp_path))
    assert "\n" not in str(e.value)


def test_tsne_png(tmp_path):
    features, labels = _blobs(150, 16, classes=5)
    path = plot.tsne(features, labels, str(tmp_path / "t.png"), max_points=120, title="digits")
    _check_png(path)


def test_tsne_many_classes_no_legend(tmp_path):
    features, labels = _blobs(60, 8, classes=25)
    _check_png(plot.tsne(features, labels, str(tmp_path / "t.png")))


def test_tsne_bad_labels(tmp_path):
    with pytest.raises(ConfigError, match="labels"):
        plot.tsne(np.zeros((10, 3)), np.zeros(9), str(tmp_path / "t.png"))


def test_sample_deterministic():
    a = plot._sample(1000, 50, seed=3)
    assert np.array_equal(a, plot._sample(1000, 50, seed=3))
    assert len(np.unique(a)) == 50 and np.all(np.diff(a) > 0)
    assert np.array_equal(plot._sample(40, 50, seed=3), np.arange(40))


def test_similarity_correlation_matches_numpy():
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=(40, 12))
    student = teacher[:, :6] @ rng.normal(size=(6, 5)) + 0.3 * rng.normal(size=(40, 5))

    def cos_pairs(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        return np.array([sim[i, j] for i in range(len(x)) for j in range(i + 1, len(x))])

    s, t = plot.pair_similarities(student, teacher)
    np.testing.assert_allclose(s, cos_pairs(student), atol=1e-12)
    np.testing.assert_allclose(t, cos_pairs(teacher), atol=1e-12)
    want = np.corrcoef(cos_pairs(student), cos_pairs(teacher))[0, 1]
    assert plot.similarity_correlation(student, teacher) == pytest.approx(want, abs=1e-10)
    assert plot.similarity_correlation(teacher, teacher) == pytest.approx(1.0)


def test_similarity_png_and_row_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(120, 32))
    student = teacher[:, :8] + 0.5 * rng.normal(size=(120, 8))
    _check_png(plot.similarity(student, teacher, str(tmp_path / "s.png"), max_points=100))
    with pytest.raises(ConfigError, match="rows"):
        plot.similarity(student[:10], teacher, str(tmp_path / "s2.png"))


def test_redraw_with_embeddings(tmp_path):
    workdir = str(tmp_path)
    _write_metrics(workdir)
    assert plot.redraw(workdir) == [os.path.join(workdir, "plots", "curves.png")]
    features, labels = _blobs(80, 10, classes=4)
    teacher = np.concatenate([features, np.ones((80, 3))], axis=1)
    npz = plot.save_embeddings(workdir, features, labels, teacher=teacher)
    assert npz == os.path.join(workdir, "plots", "embeddings.npz")
    f2, l2, t2 = plot.load_embeddings(npz)
    assert f2.dtype == np.float32 and np.array_equal(l2, labels) and t2.shape == (80, 13)
    paths = plot.redraw(workdir)
    assert [os.path.basename(p) for p in paths] == ["curves.png", "tsne.png", "similarity.png"]
    for p in paths:
        _check_png(p)
    plot.save_embeddings(workdir, features, labels)  # no teacher: no similarity plot
    assert [os.path.basename(p) for p in plot.redraw(workdir)] == ["curves.png", "tsne.png"]


def test_redraw_bad_embeddings(tmp_path):
    _write_metrics(str(tmp_path))
    (tmp_path / "plots").mkdir(exist_ok=True)
    (tmp_path / "plots" / "embeddings.npz").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="embeddings.npz"):
        plot.redraw(str(tmp_path))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "disco_jax.plot", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def test_cli_redraws(tmp_path):
    _write_metrics(str(tmp_path))
    res = _cli(str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [os.path.join(str(tmp_path), "plots", "curves.png")]
    _check_png(res.stdout.strip())


@pytest.mark.parametrize("missing_dir", [True, False])
def test_cli_bad_input(tmp_path, missing_dir):
    workdir = tmp_path / "nope" if missing_dir else tmp_path  # or: a dir without metrics.jsonl
    res = _cli(str(workdir))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
