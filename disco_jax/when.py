"""One vocabulary for "when": a duration is steps, epochs or a fraction of the run.

`to_steps(cfg, "every", ...)` reads `every_steps`, `every_epochs` and `every_fraction` from a
config entry (at most one of them positive) and turns it into steps; `itstime` decides whether
a periodic action is due at a step. Every periodic piece of work (evaluations, logging) asks
these two, so "every 10 epochs" means the same thing everywhere (big_vision's `u.steps` /
`u.itstime`).
"""

from __future__ import annotations

import math
from typing import Any

from disco_jax.errors import ConfigError

UNITS = ("steps", "epochs", "fraction")


def to_steps(cfg: Any, name: str, *, steps_per_epoch: int, total_steps: int,
             where: str = "") -> int:
    """`{name}_steps` / `{name}_epochs` / `{name}_fraction` of `cfg` in steps; -1 when unset.

    Values <= 0 mean "unset". Setting two units at once is an error (which one would win?).
    """
    where = f"{where}." if where else ""
    given = {u: cfg.get(f"{name}_{u}", -1) for u in UNITS if f"{name}_{u}" in cfg}
    given = {u: v for u, v in given.items() if v is not None and v > 0}
    if len(given) > 1:
        raise ConfigError(f"{where}{name}: set one of {', '.join(f'{name}_{u}' for u in given)},"
                          " not several")
    if not given:
        return -1
    (unit, value), = given.items()
    if unit == "steps":
        if int(value) != value:
            raise ConfigError(f"{where}{name}_steps must be an integer, got {value}")
        return int(value)
    if unit == "epochs":
        return max(1, int(math.ceil(value * steps_per_epoch)))
    if value > 1:
        raise ConfigError(f"{where}{name}_fraction must be in (0, 1], got {value}")
    return max(1, int(math.ceil(value * total_steps)))


def itstime(step: int, every: int, total: int, *, last: bool = False) -> bool:
    """Is a periodic action (every `every` steps; -1: never) due at `step` of `total`?

    `last=True` also fires at the final step even when it is not a multiple of `every`.
    """
    if every <= 0:
        return False
    return step % every == 0 or (last and step == total)
