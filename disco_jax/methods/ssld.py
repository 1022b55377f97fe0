"""SSLD (Cui et al. 2021; PaddleClas `JSDivLoss` / `DMLLoss`): a classifier student matches a
frozen supervised classifier teacher's class distribution with half the symmetric KL.

The same augmented view goes to both networks; no labels, no projection head, temperature 1.
Teacher BN: `loss.teacher_bn="train"` (default, the PaddleClas docs: batch statistics, per BN
group of `loss.bn_group_size` images as on each GPU, its running statistics never updated;
76.00 vs 75.84 for MobV3-L) or "eval". `bn_group_size` (0: the global batch) also groups the
student's BN; the MobV3-L recipe's 5760 images on 24 GPUs are 240 per GPU. `loss.eps` is the
epsilon inside the logs (1e-12 current code, 0 the 2020 code). Unlabelled data comes in through
`data.extra` (mixed into the training stream, labels ignored anyway).

`student.init` (optional, an encoder directory of the same architecture) starts the student
from a trained encoder: the second SSLD stage fine-tunes the distilled student on ImageNet-1k
only at ~1/100 of the lr. `supervised` shares this hook.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from disco_jax import checkpoint, losses
from disco_jax.errors import ConfigError
from disco_jax.methods.common import (
    TEACHER_BN_MODES,
    bn_knobs,
    check_bn_groups,
    check_choice,
    student_forward,
    teacher_forward,
)

NEEDS_TEACHER = True
LOSS_DEFAULTS = {"teacher_bn": "train", "temperature": 1.0, "eps": 1e-12, **bn_knobs(0)}


def views(config: Any) -> int:
    return 1


def _num_classes(net: Any) -> int:
    return int(net.get("num_classes", 0) or 0)


def validate_student_init(config: Any) -> None:
    """`student.init`, when set, must be an encoder dir of the student's own architecture."""
    path = config.student.get("init", "")
    if not path:
        return
    manifest = checkpoint.read_manifest(path)
    for key in ("model", "num_classes"):
        want, got = config.student.get(key), manifest.get(key, 0 if key == "num_classes" else None)
        if want != got:
            raise ConfigError(
                f"student.init {manifest['path']!r} holds {key}={got!r} but student.{key} is"
                f" {want!r}; point student.init at an encoder of the same architecture"
            )


def validate(config: Any) -> None:
    cfg = config.loss
    if _num_classes(config.student) <= 0 or _num_classes(config.teacher) <= 0:
        raise ConfigError("ssld needs classifiers: set student.num_classes and "
                          "teacher.num_classes > 0 (the teacher's classes)")
    if _num_classes(config.student) != _num_classes(config.teacher):
        raise ConfigError(f"ssld: student.num_classes ({config.student.num_classes}) must equal "
                          f"teacher.num_classes ({config.teacher.num_classes})")
    check_choice(config, "teacher_bn", TEACHER_BN_MODES)
    check_bn_groups(config)
    if not cfg.temperature > 0:
        raise ConfigError(f"loss.temperature must be positive, got {cfg.temperature}")
    if not cfg.eps >= 0:
        raise ConfigError(f"loss.eps must be >= 0, got {cfg.eps}")
    if config.teacher.get("init"):  # a directory, or "random" (the config's own classifier)
        manifest = checkpoint.teacher_manifest(config.teacher)
        if int(manifest.get("num_classes", 0) or 0) != _num_classes(config.student):
            raise ConfigError(
                f"ssld teacher {manifest['path']!r} has num_classes="
                f"{manifest.get('num_classes', 0)}, need a classifier with "
                f"{config.student.num_classes} classes (train one with method 'supervised')"
            )
    validate_student_init(config)


def host_init(config: Any, ctx: dict) -> dict:
    """With `student.init`: its params / BN statistics, read on the host (numpy)."""
    path = config.student.get("init", "")
    if not path:
        return {}
    variables, _ = checkpoint.load_encoder(path)
    return {"student_init": {k: variables[k] for k in ("params", "batch_stats")}}


def init_extra(config: Any, rng: jax.Array, student_vars: dict, ctx: dict) -> dict:
    """With `student.init`: the loaded encoder replaces the fresh params / BN statistics."""
    loaded = ctx["host"].get("student_init")
    if loaded is None:
        return {}
    want = jax.tree_util.tree_map(lambda x: tuple(x.shape), student_vars)
    got = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), loaded)
    if want != got:
        raise ConfigError(f"student.init {config.student.init!r}: its variables do not match"
                          " the student's (different width or options?)")
    return jax.tree_util.tree_map(lambda x, ref: x.astype(ref.dtype), loaded, student_vars)


def loss_fn(params, state, batch, rng, teacher_vars, ctx):
    cfg = ctx["config"].loss
    rng_aug, rng_drop, rng_t = jax.random.split(rng, 3)
    images = ctx["augment"](rng_aug, batch["image"])
    # "train": batch statistics, its running statistics left as they are (update dropped).
    t_logits = teacher_forward(ctx["teacher"], teacher_vars, images, ctx, rng_t,
                               cfg.teacher_bn)["logits"]
    s, batch_stats = student_forward(params, state, images, ctx, rng=rng_drop)
    loss = losses.ssld_loss(s["logits"], t_logits, cfg.temperature, cfg.eps)
    agree = (s["logits"].argmax(-1) == t_logits.argmax(-1)).mean()
    return loss, ({"teacher_agreement": 100.0 * agree}, {"batch_stats": batch_stats})
