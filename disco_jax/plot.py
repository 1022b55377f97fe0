"""PNG plots of a run: training curves, a t-SNE of embeddings, student vs teacher similarities.

Everything draws on `matplotlib.figure.Figure` objects with an explicit Agg canvas, so the
plots work headless and importing this module never selects (or changes) a pyplot backend.
matplotlib and scikit-learn are imported inside the functions: `import disco_jax.plot` is cheap.

    python -m disco_jax.plot WORKDIR    # redraw WORKDIR/plots/*.png and print their paths
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zipfile
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from disco_jax.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
EMBEDDINGS_FILE = "embeddings.npz"
NORM_KEYS = ("grad_norm", "param_norm", "update_norm")
# Training scalars that do not belong in the loss panel (lr and the norms get their own panels).
NOT_LOSS = frozenset({"step", "lr", "steps_per_sec", "finite", *NORM_KEYS})
SCATTER_PAIRS = 20000  # at most this many pairs drawn in the similarity scatter
LEGEND_MAX_CLASSES = 20


# ---------------------------------------------------------------------------------- helpers


def _new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure with an Agg canvas: no global backend state is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: str) -> str:
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


def _plots_dir(workdir: str) -> str:
    return os.path.join(workdir, PLOTS_DIR)


def _sample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of a deterministic random subset of at most `max_points` of `n` rows."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------- curves


def read_metrics(path: str) -> list[dict[str, float]]:
    """The records of a metrics.jsonl: numeric values only, each with a "step".

    Lines that are not JSON objects (say, a line cut short by a preemption) and lines without a
    numeric step are skipped. A missing file or one without any record is a `ConfigError`.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"no metrics file {path}; point at a workdir that a training run wrote")
    records = []
    with open(path) as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(obj, dict) or not _is_number(obj.get("step")):
                continue
            records.append({k: float(v) for k, v in obj.items() if _is_number(v)})
    if not records:
        raise ConfigError(f"metrics file {path} has no records; train for at least one log step")
    return records


def _is_train_record(record: dict[str, float]) -> bool:
    return "loss" in record or "lr" in record


def _group_of(key: str, train_line: bool) -> str | None:
    """The panel of one key; None for keys that are not drawn."""
    if "/" in key:
        return key.split("/", 1)[0]
    if key in NORM_KEYS:
        return "norms"
    if key == "lr":
        return "lr"
    if key in NOT_LOSS:
        return None
    # A scalar without a prefix on an evaluation line (e.g. "knn_top1" of older runs).
    return "loss" if train_line else "eval"


def curve_groups(records: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """Which keys go in which panel, in panel order: loss, lr, norms, then one per eval prefix.

    Any key with a "/" is "prefix/metric" and lands in the prefix's panel. Training lines (with
    "loss" or "lr") put every other scalar except lr, steps_per_sec, the norms and finite in
    "loss"; unprefixed scalars of other lines go in "eval". A key is placed by the first line
    that has it. Empty panels are left out.
    """
    groups: dict[str, list[str]] = {"loss": [], "lr": [], "norms": []}
    seen: set[str] = set()
    for record in records:
        train_line = _is_train_record(record)
        for key, value in record.items():
            if key in seen or not _is_number(value):
                continue
            seen.add(key)
            group = _group_of(key, train_line)
            if group is not None:
                groups.setdefault(group, []).append(key)
    if "loss" in groups["loss"]:  # the total first
        groups["loss"].remove("loss")
        groups["loss"].insert(0, "loss")
    if "eval" in groups:  # the unprefixed evaluation panel last
        groups["eval"] = groups.pop("eval")
    return {name: keys for name, keys in groups.items() if keys}


def series(records: list[dict[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one key, sorted by step; a step logged twice keeps its last value.

    A resumed run appends the steps since its last checkpoint again: the rerun's values win.
    """
    by_step = {r["step"]: r[key] for r in records if key in r}
    steps = np.asarray(sorted(by_step))
    return steps, np.asarray([by_step[s] for s in steps])


def _draw_panel(ax: Any, records: list[dict[str, float]], name: str, keys: list[str]) -> None:
    is_eval = name not in ("loss", "lr", "norms")
    all_values = []
    for key in keys:
        steps, values = series(records, key)
        all_values.append(values)
        label = key.split("/", 1)[1] if "/" in key else key
        ax.plot(steps, values, label=label, marker="o" if is_eval else None,
                markersize=3, linewidth=1.2)
    values = np.concatenate(all_values)
    if name == "norms" and np.any(values[np.isfinite(values)] > 0):
        ax.set_yscale("log")
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if len(keys) > 1 or is_eval:
        ax.legend(fontsize="small")


def curves_figure(records: list[dict[str, float]]) -> Figure:
    """The curves of `records` (see `read_metrics`): one subplot per `curve_groups` panel."""
    groups = curve_groups(records)
    if not groups:
        raise ConfigError("no numeric metrics to plot besides the step")
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = _new_figure(4.5 * ncols, 3.2 * nrows)
    for i, (name, keys) in enumerate(groups.items()):
        _draw_panel(fig.add_subplot(nrows, ncols, i + 1), records, name, keys)
    return fig


def curves(workdir: str, out: str | None = None) -> str:
    """Draw WORKDIR/metrics.jsonl to `out` (default WORKDIR/plots/curves.png); return the path."""
    records = read_metrics(os.path.join(workdir, METRICS_FILE))
    out = out or os.path.join(_plots_dir(workdir), "curves.png")
    return _save(curves_figure(records), out)


# ---------------------------------------------------------------------------------- t-SNE


def _check_rows(name: str, a: np.ndarray, n: int | None = None, min_rows: int = 2) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array (rows x features), got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ConfigError(f"{name} has {a.shape[0]} rows but {n} were expected (the same images)")
    if a.shape[0] < min_rows:
        raise ConfigError(f"{name} has {a.shape[0]} rows; at least {min_rows} are needed")
    return a


def tsne_embed(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (pca init, perplexity min(30, (n-1)/3)) of the rows of `features`."""
    from sklearn.manifold import TSNE

    x = _check_rows("features", features, min_rows=4)
    perplexity = min(30.0, (x.shape[0] - 1) / 3)
    init = "pca" if x.shape[1] >= 2 else "random"
    return TSNE(n_components=2, perplexity=perplexity, init=init,
                random_state=seed).fit_transform(x)


def _class_colors(n_classes: int) -> list[Any]:
    from matplotlib import colormaps

    name = "tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else "turbo"
    cmap = colormaps[name]
    if name == "turbo":
        return [cmap(i / max(n_classes - 1, 1)) for i in range(n_classes)]
    return [cmap(i) for i in range(n_classes)]


def tsne(features: np.ndarray, labels: np.ndarray, out: str, *, max_points: int = 5000,
         seed: int = 0, title: str = "") -> str:
    """A t-SNE scatter of (a deterministic subset of) `features`, coloured by `labels`."""
    features = _check_rows("features", features, min_rows=4)
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != features.shape[0]:
        raise ConfigError(f"{labels.shape[0]} labels for {features.shape[0]} feature rows")
    idx = _sample(features.shape[0], max_points, seed)
    xy = tsne_embed(features[idx], seed=seed)
    labels = labels[idx]
    classes = np.unique(labels)
    colors = _class_colors(len(classes))
    fig = _new_figure(7, 6.2)
    ax = fig.add_subplot()
    for cls, color in zip(classes, colors, strict=True):
        m = labels == cls
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=color, label=str(cls), alpha=0.8,
                   linewidths=0, rasterized=True)
    if len(classes) <= LEGEND_MAX_CLASSES:
        ax.legend(fontsize="small", markerscale=2.5, loc="center left", bbox_to_anchor=(1, 0.5),
                  title="class")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(idx)} embeddings, {len(classes)} classes")
    return _save(fig, out)


# ---------------------------------------------------------------------------------- similarity


def _cosine_pairs(x: np.ndarray) -> np.ndarray:
    """Cosine similarity of every unordered pair of distinct rows (upper triangle, row-major)."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return (x @ x.T)[np.triu_indices(x.shape[0], k=1)]


def pair_similarities(student: np.ndarray,
                      teacher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise cosine similarities among the student rows and among the teacher rows.

    Row i of both is the same image; the widths may differ. Pair k of one output is pair k of
    the other.
    """
    s = _check_rows("student", student)
    t = _check_rows("teacher", teacher, n=s.shape[0])
    return _cosine_pairs(s), _cosine_pairs(t)


def similarity_correlation(student: np.ndarray, teacher: np.ndarray) -> float:
    """Pearson correlation of student-pair and teacher-pair cosine similarities (nan if flat)."""
    s, t = pair_similarities(student, teacher)
    s, t = s - s.mean(), t - t.mean()
    denom = math.sqrt(float(np.dot(s, s)) * float(np.dot(t, t)))
    return float(np.dot(s, t) / denom) if denom > 0 else float("nan")


def similarity(student: np.ndarray, teacher: np.ndarray, out: str, *, max_points: int = 2000,
               seed: int = 0) -> str:
    """Student vs teacher pairwise cosine similarities of the same images (after SEED's figure).

    Left: overlaid histograms of the two distributions. Right: student-pair against teacher-pair
    similarity (at most `SCATTER_PAIRS` pairs drawn), the Pearson correlation in the title.
    """
    student = _check_rows("student", student)
    teacher = _check_rows("teacher", teacher, n=student.shape[0])
    idx = _sample(student.shape[0], max_points, seed)
    s, t = pair_similarities(student[idx], teacher[idx])
    r = similarity_correlation(student[idx], teacher[idx])
    fig = _new_figure(11, 4.6)
    ax_hist, ax_scat = fig.subplots(1, 2)
    bins = np.linspace(-1, 1, 101)
    for name, v in (("teacher", t), ("student", s)):
        ax_hist.hist(v, bins=bins, density=True, alpha=0.5, label=f"{name} (mean {v.mean():.2f})")
    ax_hist.set_xlabel("pairwise cosine similarity")
    ax_hist.set_ylabel("density")
    ax_hist.set_title(f"{len(s)} pairs of {len(idx)} images")
    ax_hist.legend(fontsize="small")
    shown = _sample(len(s), SCATTER_PAIRS, seed + 1)
    ax_scat.scatter(t[shown], s[shown], s=2, alpha=0.3, linewidths=0, rasterized=True)
    lo = float(min(s.min(), t.min()))
    hi = float(max(s.max(), t.max()))
    ax_scat.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8, linestyle="--")
    ax_scat.set_xlabel("teacher pair similarity")
    ax_scat.set_ylabel("student pair similarity")
    ax_scat.set_title(f"Pearson r = {r:.3f}")
    ax_scat.grid(True, alpha=0.3)
    return _save(fig, out)


# ---------------------------------------------------------------------------------- workdirs


def save_embeddings(workdir: str, features: np.ndarray, labels: np.ndarray,
                    teacher: np.ndarray | None = None) -> str:
    """Write WORKDIR/plots/embeddings.npz (features, labels, optional teacher) for `redraw`.

    Save all the rows you plotted with: `redraw` samples them again with the same default
    seed, so the redrawn plots match. Written to a temporary file first, then renamed.
    """
    arrays = {"features": np.asarray(features, dtype=np.float32),
              "labels": np.asarray(labels).reshape(-1)}
    if teacher is not None:
        arrays["teacher"] = np.asarray(teacher, dtype=np.float32)
    folder = _plots_dir(workdir)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, EMBEDDINGS_FILE)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_embeddings(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(features, labels, teacher or None) from a `save_embeddings` file."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(f"cannot read {path} ({e}); delete it or write it again with"
                          " disco_jax.plot.save_embeddings") from None
    if "features" not in arrays or "labels" not in arrays:
        raise ConfigError(f"{path} lacks 'features' or 'labels'; write it with"
                          " disco_jax.plot.save_embeddings")
    return arrays["features"], arrays["labels"], arrays.get("teacher")


def redraw(workdir: str) -> list[str]:
    """Redraw a workdir's plots: curves.png, and tsne.png / similarity.png from embeddings.npz."""
    if not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir} does not exist")
    paths = [curves(workdir)]
    emb = os.path.join(_plots_dir(workdir), EMBEDDINGS_FILE)
    if os.path.isfile(emb):
        features, labels, teacher = load_embeddings(emb)
        paths.append(tsne(features, labels, os.path.join(_plots_dir(workdir), "tsne.png")))
        if teacher is not None:
            paths.append(similarity(features, teacher,
                                    os.path.join(_plots_dir(workdir), "similarity.png")))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disco_jax.plot",
                                     description="Redraw the PNG plots of a workdir.")
    parser.add_argument("workdir", help="a run's workdir (with metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        for path in redraw(args.workdir):
            print(path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
