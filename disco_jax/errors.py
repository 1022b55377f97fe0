"""The one exception type for bad user input.

Anything a user can get wrong (a config value, a name, a missing file or dataset) raises
`ConfigError` with a single line that says what is wrong and how to fix it. `disco_jax.main`
prints that line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A user-facing error: the message is one actionable line."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> ConfigError:
    """Error for a name that is not in a registry, listing the valid ones."""
    return ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")
