"""`transfer`: linear evaluation on another dataset (SimCLR / BYOL's transfer protocol).

The frozen backbone's pooled features (eval mode, centre crop) of the other dataset's train,
validation and test images; an L2-regularised multinomial logistic regression (scikit-learn,
L-BFGS) for each inverse strength C on a log grid (BYOL: 45 values from 1e-6 to 1e5), the C with
the best validation top-1 kept, refit on train + validation, reported on test. The validation
split is `val_split` if the dataset has one, else a fixed `val_fraction` of the train split.
Features are standardised with the train set's mean and variance.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from disco_jax.errors import ConfigError
from disco_jax.eval import common

log = logging.getLogger("disco_jax")

VERSION = 1
DEFAULTS = {"val_split": "", "val_fraction": 0.2, "c_min": 1e-6, "c_max": 1e5, "num_c": 45,
            "max_iter": 1000, "train_limit": 0}


def validate(cfg: Any, env: Any, where: str) -> None:
    if not cfg.data.name:
        raise ConfigError(f"{where}: transfer needs the other dataset: set {where}.data.name"
                          " (a TFDS name or folder:/path)")
    if not 0 < cfg.val_fraction < 1 or not 0 < cfg.c_min <= cfg.c_max or cfg.num_c < 1:
        raise ConfigError(f"{where}: need 0 < val_fraction < 1, 0 < c_min <= c_max, num_c >= 1")
    train, test = common.splits(cfg, env)
    need = (train, test) + ((cfg.val_split,) if cfg.val_split else ())
    common.get_source(cfg, env, need)


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [(x - mean) / std for x in (train, *others)]


def fit_logreg(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter).fit(x, y)


def scores(clf: Any, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Class scores over all `num_classes` (classes absent from training score -inf)."""
    d = clf.decision_function(x)
    if d.ndim == 1:  # two classes: sklearn returns the positive class's margin only
        d = np.stack([-d, d], 1)
    out = np.full((len(x), num_classes), -np.inf)
    out[:, clf.classes_] = d
    return out


def select_and_fit(tr_x, tr_y, va_x, va_y, te_x, te_y, *, num_classes: int, grid: np.ndarray,
                   max_iter: int) -> dict[str, float]:
    """Pick C on validation, refit on train + validation, score on test."""
    tr_x, va_x, te_x = standardise(tr_x, va_x, te_x)
    val = []
    for c in grid:
        clf = fit_logreg(tr_x, tr_y, float(c), max_iter)
        val.append(common.topk_accuracy(scores(clf, va_x, num_classes), va_y, (1,))["top1"])
    best = int(np.argmax(val))  # ties: the strongest regularisation (smallest C) first
    all_x, all_y = np.concatenate([tr_x, va_x]), np.concatenate([tr_y, va_y])
    clf = fit_logreg(all_x, all_y, float(grid[best]), max_iter)
    out = common.topk_accuracy(scores(clf, te_x, num_classes), te_y)
    return {**out, "val_top1": float(val[best]), "best_c": float(grid[best])}


class Evaluator(common.Evaluator):
    def _features(self, model: common.Model, split: str, limit: int = 0) -> dict:
        return common.extract(model, self.source, split, size=self.size,
                              batch_size=self.env.batch_size, limit=limit)

    def run(self, model: common.Model) -> dict[str, float]:
        cfg = self.cfg
        tr = self._features(model, self.train_split, cfg.train_limit)
        te = self._features(model, self.test_split)
        if cfg.val_split:
            va = self._features(model, cfg.val_split)
            tr_x, tr_y, va_x, va_y = tr["features"], tr["label"], va["features"], va["label"]
        else:
            perm = np.random.default_rng(self.env.seed).permutation(len(tr["label"]))
            n_val = max(1, int(round(cfg.val_fraction * len(perm))))
            va_i, tr_i = perm[:n_val], perm[n_val:]
            tr_x, tr_y = tr["features"][tr_i], tr["label"][tr_i]
            va_x, va_y = tr["features"][va_i], tr["label"][va_i]
        grid = np.logspace(np.log10(cfg.c_min), np.log10(cfg.c_max), cfg.num_c)
        log.info("%s: logistic regression on %d train / %d val / %d test features of %s,"
                 " %d values of C", self.name, len(tr_y), len(va_y), len(te["label"]),
                 self.source.name, len(grid))
        return select_and_fit(tr_x, tr_y, va_x, va_y, te["features"], te["label"],
                              num_classes=self.source.num_classes, grid=grid,
                              max_iter=cfg.max_iter)
