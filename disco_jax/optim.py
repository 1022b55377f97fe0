"""Optimizer and learning-rate schedule.

The default reproduces the official SEED/MoCo-v2 recipe exactly (`tools/utils.py:
adjust_learning_rate` in jacobswan1/SEED):

- lr_max = base_lr x global_batch / 256;
- warm-up: lr = base_lr + (lr_max - base_lr) * epoch / warmup_epochs (it starts at base_lr,
  not at 0);
- then cosine over the *whole* run: lr = lr_max * 0.5 * (1 + cos(pi * epoch / total_epochs))
  (so there is a small step down when warm-up ends, as in the official code);
- the lr changes once per epoch (`granularity="epoch"`, official). `granularity="step"` is the
  smooth alternative.

Other official schedules are options (defaults: the SEED behaviour above):

- `warmup_from="zero"`: lr = lr_max * epoch / warmup_epochs during the warm-up, from 0 at step 0
  (PaddleClas `LinearWarmup(start_lr=0)` in SSLD's CosineWarmup, SimCLR
  `WarmUpAndCosineDecay`, BYOL `learning_schedule`);
- `cosine_after_warmup=True`: the cosine runs over the epochs after the warm-up,
  lr = lr_max * 0.5 * (1 + cos(pi * (epoch - W) / (E - W))), so it starts at lr_max when the
  warm-up ends (the same three codes: cosine over total - warmup steps).

SGD with momentum 0.9 and L2 weight decay added to the gradient before momentum, on every
parameter (torch.optim.SGD semantics, as the official codes). `weight_decay_mask="kernels"`
is the common alternative that spares BN scales and biases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from disco_jax.errors import ConfigError, unknown_name

Schedule = Callable[[jax.Array], jax.Array]

DECAYS = ("cosine", "step", "constant")
GRANULARITIES = ("epoch", "step")
WARMUP_FROM = ("base", "zero")  # SEED / MoCo: from base_lr; PaddleClas, SimCLR, BYOL: from 0


def lr_schedule(
    *,
    base_lr: float,
    global_batch: int,
    steps_per_epoch: int,
    total_steps: int,
    warmup_epochs: float = 0.0,
    decay: str = "cosine",
    granularity: str = "epoch",
    scale_with_batch: bool = True,
    step_milestones: tuple[int, ...] = (120, 160),
    warmup_from: str = "base",
    cosine_after_warmup: bool = False,
) -> Schedule:
    """The learning rate as a jittable function of the optimizer step (see the module doc)."""
    if decay not in DECAYS:
        raise unknown_name("lr decay", decay, DECAYS)
    if granularity not in GRANULARITIES:
        raise unknown_name("lr granularity", granularity, GRANULARITIES)
    if warmup_from not in WARMUP_FROM:
        raise unknown_name("warmup_from", warmup_from, WARMUP_FROM)
    lr_max = base_lr * global_batch / 256 if scale_with_batch else base_lr
    total_epochs = total_steps / steps_per_epoch
    # Where the cosine starts and how long it runs.
    offset = warmup_epochs if cosine_after_warmup else 0.0
    cosine_epochs = total_epochs - offset
    if decay == "cosine" and cosine_epochs <= 0:
        raise ConfigError(
            f"optimizer.warmup_epochs={warmup_epochs} leaves no epochs for the cosine after the"
            f" warm-up (the run has {total_epochs:g}); shorten the warm-up"
        )
    warm_start = base_lr if warmup_from == "base" else 0.0

    def schedule(step: jax.Array) -> jax.Array:
        epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
        if granularity == "epoch":
            epoch = jnp.floor(epoch)
        if decay == "cosine":
            lr = lr_max * 0.5 * (1.0 + jnp.cos(math.pi * (epoch - offset) / cosine_epochs))
        elif decay == "step":
            lr = lr_max * 0.1 ** sum((epoch >= m).astype(jnp.float32) for m in step_milestones)
        else:
            lr = jnp.asarray(lr_max, jnp.float32)
        if warmup_epochs > 0:
            warm = warm_start + (lr_max - warm_start) / warmup_epochs * epoch
            lr = jnp.where(epoch < warmup_epochs, warm, lr)
        return lr

    return schedule


def _kernel_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", "")) == "kernel", params
    )


def make_optimizer(
    cfg: Mapping[str, Any], schedule: Schedule
) -> optax.GradientTransformation:
    """SGD (official) or LARS/AdamW from the `optimizer` config block."""
    name = cfg["name"]
    wd = float(cfg.get("weight_decay", 0.0))
    mask_name = cfg.get("weight_decay_mask", "all")
    if mask_name not in ("all", "kernels"):
        raise unknown_name("weight_decay_mask", mask_name, ["all", "kernels"])
    mask = None if mask_name == "all" else _kernel_mask
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(wd, mask=mask) if wd else optax.identity(),
            optax.sgd(
                schedule, momentum=cfg.get("momentum", 0.9), nesterov=cfg.get("nesterov", False)
            ),
        )
    if name == "lars":
        # SimCLR / BYOL LARS: BN parameters and biases get neither the trust-ratio adaptation
        # (always, as both official codes) nor, with weight_decay_mask="kernels", weight decay.
        return optax.lars(
            schedule, weight_decay=wd, weight_decay_mask=mask or True,
            trust_ratio_mask=_kernel_mask, momentum=cfg.get("momentum", 0.9),
        )
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=wd, mask=mask)
    raise unknown_name("optimizer", name, ["sgd", "lars", "adamw"])


def schedule_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `lr_schedule` keywords an `optimizer` config block sets (all but the run's size)."""
    return {
        "base_lr": cfg["base_lr"],
        "warmup_epochs": cfg.get("warmup_epochs", 0.0),
        "decay": cfg.get("decay", "cosine"),
        "granularity": cfg.get("granularity", "epoch"),
        "scale_with_batch": cfg.get("scale_with_batch", True),
        "step_milestones": tuple(cfg.get("step_milestones", (120, 160))),
        "warmup_from": cfg.get("warmup_from", "base"),
        "cosine_after_warmup": cfg.get("cosine_after_warmup", False),
    }


def validate(cfg: Mapping[str, Any]) -> None:
    if cfg["base_lr"] <= 0:
        raise ConfigError(f"optimizer.base_lr must be positive, got {cfg['base_lr']}")
    if cfg.get("warmup_epochs", 0) < 0:
        raise ConfigError("optimizer.warmup_epochs must be >= 0")
    opts = schedule_options(cfg)
    for name, value, valid in (("decay", opts["decay"], DECAYS),
                               ("granularity", opts["granularity"], GRANULARITIES),
                               ("warmup_from", opts["warmup_from"], WARMUP_FROM)):
        if value not in valid:
            raise ConfigError(f"optimizer.{name} must be one of {', '.join(valid)}, got"
                              f" {value!r}")
    if not isinstance(opts["cosine_after_warmup"], bool):
        raise ConfigError("optimizer.cosine_after_warmup must be True or False, got"
                          f" {opts['cosine_after_warmup']!r}")
    if opts["cosine_after_warmup"] and opts["decay"] != "cosine":
        raise ConfigError("optimizer.cosine_after_warmup=True needs decay='cosine', got"
                          f" decay={opts['decay']!r}")
