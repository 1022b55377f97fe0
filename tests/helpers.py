"""Shared test utilities."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


# A stand-in network for runs whose subject is the method, the run or the pipeline rather than
# the network: the CIFAR ResNet-8 (three stages of one basic block) at width 0.25 compiles in a
# fraction of the time of the recipes' ResNet-18/32/50, EfficientNet and MobileNetV3, and in
# about 0.6-0.8x that of the 4-stage ResNet-10 used before (one train step, 2 cores: L-MCL's
# 24.6 s -> 14.3 s, DisCo's on 8 devices 12.1 s -> 8.3 s, SEED's 6.6 s -> 5.1 s). Where each
# recipe network trains instead (end to end, or a step at model level in tests/test_models*.py):
# README, "Install and run the tests".
TINY_NET = {"model": "resnet8", "model_kwargs": {"width": 0.25}}
# Where the number of stages is what a method builds on (L-MCL's ImageNet form: a head per stage
# and an auxiliary branch on every stage but the last, as for its ResNet-34): the ResNet-10, one
# basic block in each of a torchvision ResNet's 4 stages.
TINY_NET_4_STAGES = {"model": "resnet10", "model_kwargs": {"width": 0.25, "stem": "cifar"}}
RESNETS = ("resnet10", "resnet18", "resnet32", "resnet34", "resnet50")


def tiny_nets(cfg, teachers: tuple[str, ...] | None = RESNETS, tiny: dict = TINY_NET):
    """`cfg` with `tiny` (default `TINY_NET`) as its student, and as its teacher where the
    teacher's model is in `teachers` (None: any). Assigned, not merged: the recipe's own
    model_kwargs (a MobileNet's dropout, an EfficientNet's drop-connect) would not fit the
    ResNet. Returns `cfg`."""
    for net in ("student", "teacher"):
        if net not in cfg or (net == "teacher" and teachers is not None
                              and cfg.teacher.model not in teachers):
            continue
        cfg[net].model, cfg[net].model_kwargs = tiny["model"], dict(tiny["model_kwargs"])
    return cfg


# The larger members of a model family: the code of a smaller member in the same tier, with other
# block counts, widths or channel lists. The quick tier (`-m "not slow"`) checks each family on
# its smaller members, the full run on every member (`sizes`).
LARGER_SIZES = frozenset({
    "resnet101", "resnet152", "resnet56", "wrn_40_2", "wrn_28_4", "swav_resnet50w4",
    "swav_resnet50w5", "efficientnet_b1", "timm_efficientnet_b1", "seed_efficientnet_b1",
    "mobilenet_v3_large", "mobilenetv3_large_100", "seed_mobilenetv3_large",
})


def slow_where(names, slow) -> list:
    """`names` as pytest parameters, those for which `slow(name)` holds marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if slow(n) else n for n in names]


def sizes(names, model=lambda name: name) -> list:
    """`names` as pytest parameters, those whose `model(name)` is in `LARGER_SIZES` marked
    slow."""
    return slow_where(names, lambda n: model(n) in LARGER_SIZES)


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
