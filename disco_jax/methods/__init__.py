"""Method registry: name -> module.

A method is a small module with plain functions, plugged into the one trainer (`train.py`):

- `NEEDS_TEACHER: bool` and `views(config) -> int` (1: `batch["image"]`; 2: `view1`, `view2`);
- `validate(config) -> None`: raise ConfigError for bad settings, before anything compiles;
- `init_extra(config, rng, student_vars, ctx) -> dict`: extra train-state entries (queues,
  momentum encoders, ...), traced inside the jitted, sharded initialisation;
- `loss_fn(params, state, batch, rng, teacher_vars, ctx) -> (loss, (metrics, updates))`: the
  differentiated function; `updates` replaces train-state entries after the step (new BN
  statistics, the enqueued queue, the momentum encoder).

`ctx` is a dict of static things the trainer builds: `student` / `teacher` Encoder modules,
`augment(rng, uint8_images) -> float images`, and `config`. Adding a method never touches the
training loop.
"""

from __future__ import annotations

from types import ModuleType

from disco_jax.errors import unknown_name
from disco_jax.methods import moco, seed

METHODS: dict[str, ModuleType] = {"moco_v2": moco, "seed": seed}


def get(name: str) -> ModuleType:
    if name not in METHODS:
        raise unknown_name("method", name, METHODS)
    return METHODS[name]
