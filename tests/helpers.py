"""Shared test utilities."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str, data_dir: str | None = None):
    """Load `configs/NAME.py[:arg]` as the CLI does, optionally pointing data at data_dir."""
    name, _, arg = spec.partition(":")
    path = os.path.join(ROOT, "configs", name)
    module_spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    if data_dir is not None:
        stages = [cfg.stages[s] for s in cfg.stage_order] if "stages" in cfg else [cfg]
        for stage in stages:
            stage.data.data_dir = data_dir
    return cfg


def override(cfg, **dotted):
    """Set each `a.b.c=value` in `cfg` (nested keys joined by dots; pass them as
    `**{"loss.student_temp": 0.1}`) and return `cfg`. A misspelt key fails as ConfigDict does."""
    for key, value in dotted.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def random_variables(variables):
    """Numpy-filled model variables (fan-in scaled kernels, unit BN): no compiled init needed."""
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)
        return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, variables)


def group_permutation(cfg, seed: int = 0) -> np.ndarray:
    """A reordering of the batch rows within each BN group (`loss.bn_group_size`, 0: the whole
    batch): the same groups, so the same math, with the float32 sums over each group in
    another order."""
    n, size = cfg.batch_size, cfg.loss.bn_group_size or cfg.batch_size
    rng = np.random.default_rng(seed)
    return np.concatenate([g * size + rng.permutation(size) for g in range(n // size)])
