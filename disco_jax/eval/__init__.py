"""Evaluators, each a small module picked by name from a config's `evals` dict.

`config.evals.<prefix>` is one entry: `type` names the evaluator (`knn`, `linear_fast`,
`linear`, `classifier`, `semi`, `transfer`, `agreement`), the common keys below say when and on
what it runs, and the rest are the evaluator's own knobs, all written into the config by `block`
so every setting shows in config.json and can be overridden. The caller hands each evaluator a
`Model` (`eval.common`) and never calls evaluation code itself:

    suite = eval.Suite(config.evals, env, steps_per_epoch=..., total_steps=...)
    for name in suite.due(step): metrics = suite.run(name, model)    # during training
    records = suite.run_all(model)                                    # at the end / CLI

Common keys of every entry:
- `type`, `version` (the protocol version; a config asking for another one is refused);
- `every_steps` / `every_epochs` / `every_fraction` (during training; -1: not periodic) and
  `at_end` (at the end of training and in `python -m disco_jax.evaluate`);
- `data.name` / `data.data_dir` ('' : the run's data), `train_split`, `test_split` ('' : the
  run's), `image_size` (-1: the run's);
- `pred`: `student` (the network) or `pair` (student and teacher; distillation monitors).
"""

from __future__ import annotations

import copy
import logging
import time
import types
from typing import Any

import ml_collections as mlc

from disco_jax import when
from disco_jax.errors import ConfigError, unknown_name
from disco_jax.eval import (
    agreement,
    classifier,
    knn,
    linear,
    linear_fast,
    records,
    semi,
    transfer,
)
from disco_jax.eval.common import Env, Model, extract, topk_accuracy
from disco_jax.eval.knn import knn_accuracy
from disco_jax.eval.linear_fast import linear_probe

log = logging.getLogger("disco_jax")

EVALUATORS: dict[str, types.ModuleType] = {
    "knn": knn,
    "linear_fast": linear_fast,
    "linear": linear,
    "classifier": classifier,
    "semi": semi,
    "transfer": transfer,
    "agreement": agreement,
}

__all__ = ["EVALUATORS", "Env", "Model", "Suite", "block", "extract", "knn_accuracy",
           "linear_probe", "records", "topk_accuracy", "validate"]


def _common(evaluator: str, version: int) -> dict:
    return {
        "type": evaluator,
        "version": version,
        "every_steps": -1,
        "every_epochs": -1.0,
        "every_fraction": -1.0,
        "at_end": True,
        "data": {"name": "", "data_dir": ""},
        "train_split": "",
        "test_split": "",
        "image_size": -1,
        "pred": "student",
    }


def _module(evaluator: str) -> types.ModuleType:
    if evaluator not in EVALUATORS:
        raise unknown_name("evaluator", evaluator, EVALUATORS)
    return EVALUATORS[evaluator]


def block(evaluator: str, **overrides: Any) -> mlc.ConfigDict:
    """A complete entry of `config.evals`: common keys, the evaluator's defaults, overrides.

    A `preset` override (evaluators that have presets, e.g. linear's `moco` / `disco`) applies
    the preset's values first; other overrides win over them.
    """
    module = _module(evaluator)
    entry = {**_common(evaluator, module.VERSION), **copy.deepcopy(module.DEFAULTS)}
    if "preset" in overrides:
        presets = getattr(module, "PRESETS", {})
        if overrides["preset"] not in presets:
            raise unknown_name(f"{evaluator} preset", overrides["preset"], presets)
        entry.update(presets[overrides["preset"]])
    bad = sorted(set(overrides) - set(entry))
    if bad:
        raise ConfigError(f"evaluator {evaluator!r} has no setting {', '.join(bad)}; valid:"
                          f" {', '.join(sorted(entry))}")
    entry.update(overrides)
    return mlc.ConfigDict(entry)


def validate(evals: Any, env: Env) -> None:
    """Check every entry (names, keys, versions, values, data splits); raises ConfigError.

    Runs before anything is compiled or written.
    """
    for name in evals:
        cfg = evals[name]
        where = f"evals.{name}"
        if "type" not in cfg:
            raise ConfigError(f"{where} has no 'type' (one of {', '.join(sorted(EVALUATORS))})")
        module = _module(cfg.type)
        expected = set(_common(cfg.type, module.VERSION)) | set(module.DEFAULTS)
        unknown = sorted(set(cfg) - expected)
        if unknown:
            raise ConfigError(f"{where} ({cfg.type}) has no setting {', '.join(unknown)};"
                              f" valid: {', '.join(sorted(expected))}")
        if cfg.version != module.VERSION:
            raise ConfigError(f"{where}: protocol version {cfg.version} of {cfg.type!r} is not"
                              f" available (this disco_jax has version {module.VERSION})")
        if cfg.pred not in ("student", "pair"):
            raise ConfigError(f"{where}.pred must be 'student' or 'pair', got {cfg.pred!r}")
        if cfg.pred == "pair" and not env.has_teacher:
            raise ConfigError(f"{where} compares student and teacher (pred='pair') but this run"
                              " has no teacher; remove the entry")
        when.to_steps(cfg, "every", steps_per_epoch=1, total_steps=1, where=where)
        module.validate(cfg, env, where)


class Suite:
    """The evaluators of one config, built lazily (each builds its data once) and run by name."""

    def __init__(self, evals: Any, env: Env, *, steps_per_epoch: int = 1, total_steps: int = 1):
        self.cfgs = {name: evals[name] for name in evals}
        self.env = env
        self.every = {
            name: when.to_steps(cfg, "every", steps_per_epoch=steps_per_epoch,
                                total_steps=total_steps, where=f"evals.{name}")
            for name, cfg in self.cfgs.items()
        }
        self.total_steps = total_steps
        self._built: dict[str, Any] = {}

    def due(self, step: int) -> list[str]:
        """Entries whose periodic interval falls on `step` (the final step is `at_end`'s)."""
        return [n for n in self.cfgs
                if step < self.total_steps and when.itstime(step, self.every[n], self.total_steps)]

    def at_end(self) -> list[str]:
        return [n for n, cfg in self.cfgs.items() if cfg.at_end]

    def evaluator(self, name: str) -> Any:
        if name not in self._built:
            cfg = self.cfgs[name]
            self._built[name] = _module(cfg.type).Evaluator(cfg, self.env, name)
        return self._built[name]

    def run(self, name: str, model: Model) -> dict:
        """One entry's record: name, evaluator, version, settings, metrics, step, seconds."""
        cfg = self.cfgs[name]
        t0 = time.time()
        log.info("evaluating %s (%s v%d) at step %d", name, cfg.type, cfg.version, model.step)
        metrics = self.evaluator(name).run(model)
        seconds = round(time.time() - t0, 1)
        summary = ", ".join(f"{k} {v:.2f}" for k, v in list(metrics.items())[:6])
        log.info("%s: %s (%.1f s)", name, summary, seconds)
        record = {"name": name, "evaluator": cfg.type, "version": cfg.version,
                  "settings": cfg.to_dict(), "metrics": metrics, "step": model.step,
                  "seconds": seconds}
        deviations = getattr(_module(cfg.type), "deviations", None)
        if deviations is not None and deviations(cfg):
            record["deviations"] = deviations(cfg)
        return record

    def run_all(self, model: Model, names: list[str] | None = None) -> list[dict]:
        names = self.at_end() if names is None else names
        out = [self.run(name, model) for name in names]
        self.env.features_cache.clear()
        return out


def flat(records: list[dict]) -> dict[str, float]:
    """`{prefix/metric: value}` of a list of records (metrics.jsonl, TensorBoard)."""
    return {f"{r['name']}/{k}": v for r in records for k, v in r["metrics"].items()}
