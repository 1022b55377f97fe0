"""Method registry: name -> module.

A method is a small module with plain functions, plugged into the one trainer (`train.py`).
Required:

- `loss_fn(params, state, batch, rng, teacher_vars, ctx) -> (loss, (metrics, updates))`: the
  differentiated function; `updates` replaces train-state entries after the step (new BN
  statistics, the enqueued queue, the momentum encoder). `batch` holds every array the input
  pipeline yields: `image` (1 view) or `view1`/`view2` (2 views), `label`, and `crops`
  (N, n, s, s, 3) when `data_options` asks for small crops. `rng` is this step's key (augment
  it, and pass a split of it as the `dropout` rng to the student).

Knobs: `LOSS_DEFAULTS: dict` names every `config.loss` key the method reads, with its
official default. `config_lib.base_config(method)` writes them into a recipe's `config.loss`
(so each appears in config.json and can be set with `--config.loss.<knob>=...`), and the trainer
fills in any a hand-made config lacks and refuses keys that are not knobs (`resolve_loss`).
Method code reads `config.loss.<knob>` directly.

Optional (the defaults below apply when a module does not define them):

- `NEEDS_TEACHER: bool` (False): the trainer loads `config.teacher.init` and checks it;
- `views(config) -> int` (1): 1 gives `batch["image"]`, 2 gives `view1`, `view2`;
- `data_options(config) -> dict` ({}): extra keyword arguments for `data.train_dataset`
  (e.g. `small_crops=6`, `small_size=96`);
- `validate(config) -> None`: raise ConfigError for bad settings, before anything compiles;
- `build_student(config, dtype) -> nn.Module`: the trained network(s) (default: the encoder
  of `config.student`); its `apply(..., train=False)` returns a dict with `features`;
- `build_teacher(manifest, dtype) -> nn.Module`: the frozen teacher from its manifest;
- `host_init(config, ctx) -> dict` ({}): host-side work before the state is created (read
  every train label, load a checkpoint): numpy arrays, handed to `init_extra` as `ctx["host"]`;
- `init_extra(config, rng, student_vars, ctx) -> dict` ({}): extra train-state entries
  (queues, momentum encoders, banks), traced inside the jitted, sharded initialisation;
- `eval_outputs(ctx, variables, images) -> dict`: what evaluators see, in inference mode:
  `features` (pooled backbone; kNN and probes), `embedding`, and `logits` (N, C) or, for a
  cohort, `logits_nets` (M, N, C) when the network classifies (default: the student's
  `features`, `embedding` and `logits` if it has them);
- `export(config, variables) -> (variables, manifest)`: what is written to `W/encoder`.

`ctx` is a dict of static things the trainer builds: `student` / `teacher` modules,
`augment(rng, uint8_images) -> float images`, `config`, `mesh`, and facts about the run that
methods must not recompute: `total_steps`, `steps_per_epoch`. Adding a method never touches the
training loop.
"""

from __future__ import annotations

import copy
import types
from typing import Any

import ml_collections as mlc

from disco_jax import models
from disco_jax.errors import ConfigError, unknown_name
from disco_jax.methods import byol, disco, kd, lmcl, mcl, moco, seed, simclr, ssld, supervised

METHODS: dict[str, types.ModuleType] = {
    "moco_v2": moco,
    "seed": seed,
    "disco": disco,
    "kd": kd,
    "mcl": mcl,
    "lmcl": lmcl,
    "ssld": ssld,
    "supervised": supervised,
    "simclr": simclr,
    "byol": byol,
}

ENCODER_KEYS = ("model", "model_kwargs", "head", "head_hidden", "embed_dim", "num_classes",
                "head_input")


def encoder_manifest(net: Any, **extra: Any) -> dict:
    """The JSON manifest of an encoder config: enough to rebuild it with build_encoder."""
    out = {}
    for k in ENCODER_KEYS:
        if k in net:
            out[k] = dict(net[k]) if k == "model_kwargs" else net[k]
    return out | extra


def _views(config: Any) -> int:
    return 1


def _data_options(config: Any) -> dict:
    return {}


def _validate(config: Any) -> None:
    return None


def _build_student(config: Any, dtype: Any) -> Any:
    return models.build_encoder(config.student, dtype)


def _build_teacher(manifest: dict, dtype: Any) -> Any:
    return models.build_encoder(manifest, dtype)


def _host_init(config: Any, ctx: dict) -> dict:
    return {}


def _init_extra(config: Any, rng: Any, student_vars: dict, ctx: dict) -> dict:
    return {}


def _eval_outputs(ctx: dict, variables: dict, images: Any) -> dict:
    out = ctx["student"].apply(variables, images, train=False)
    return {k: out[k] for k in ("features", "embedding", "logits") if k in out}


def _export(config: Any, variables: dict) -> tuple[dict, dict]:
    return variables, encoder_manifest(config.student)


DEFAULTS: dict[str, Any] = {
    "NEEDS_TEACHER": False,
    "LOSS_DEFAULTS": {},
    "views": _views,
    "data_options": _data_options,
    "validate": _validate,
    "build_student": _build_student,
    "build_teacher": _build_teacher,
    "host_init": _host_init,
    "init_extra": _init_extra,
    "eval_outputs": _eval_outputs,
    "export": _export,
}


def get(name: str) -> types.SimpleNamespace:
    """The method's functions, with the defaults filled in for those it does not define."""
    if name not in METHODS:
        raise unknown_name("method", name, METHODS)
    module = METHODS[name]
    if not hasattr(module, "loss_fn"):
        raise TypeError(f"method module {module.__name__} defines no loss_fn")
    return types.SimpleNamespace(
        name=name, **{k: getattr(module, k, v) for k, v in DEFAULTS.items()},
        loss_fn=module.loss_fn,
    )


def loss_defaults(name: str) -> mlc.ConfigDict:
    """The method's knobs with their official defaults, as a fresh `config.loss`."""
    return mlc.ConfigDict(dict(get(name).LOSS_DEFAULTS))


def resolve_loss(config: Any) -> Any:
    """`config` with every knob of its method in `config.loss` (the defaults filled in where
    missing), so config.json lists them all; a key that is no knob of the method is refused
    (a misspelt knob would otherwise be silently ignored). Returns a copy."""
    knobs = get(config.method).LOSS_DEFAULTS
    unknown = sorted(set(config.loss) - set(knobs))
    if unknown:
        raise ConfigError(
            f"loss.{unknown[0]} is not a knob of method {config.method!r}"
            f"{f' (nor are {unknown[1:]})' if len(unknown) > 1 else ''}; its knobs: "
            f"{', '.join(sorted(knobs)) or 'none'}"
        )
    out = copy.deepcopy(config)  # the caller's config is untouched
    with out.unlocked():
        for k, v in knobs.items():
            if k not in out.loss:
                out.loss[k] = v
    return out
