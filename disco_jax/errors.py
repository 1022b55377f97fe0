"""The two exception types a user sees as one line instead of a traceback.

- `ConfigError`: bad input. Anything a user can get wrong (a config value, a name, a missing
  file or dataset) raises it with a single line that says what is wrong and how to fix it.
  The command lines print that line and exit with status 2 (`EXIT_BAD_INPUT`).
- `RunError`: the environment failed a valid run (the disk filled up, a peer process never
  arrived or died). Running the same command again may well succeed once the cause is gone, so
  it is kept apart from bad input: one line, exit status 4 (`EXIT_RUN_FAILED`).

A non-finite training step exits with status 3 (`EXIT_NONFINITE`, `disco_jax.main`).
"""

from __future__ import annotations

from collections.abc import Iterable

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_RUN_FAILED = 4


class ConfigError(ValueError):
    """Bad input: the message is one actionable line (exit status 2)."""


class RunError(RuntimeError):
    """The environment failed a valid run (disk, peers): one line, exit status 4."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> ConfigError:
    """Error for a name that is not in a registry, listing the valid ones."""
    return ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")
