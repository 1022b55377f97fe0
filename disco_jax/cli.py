"""What the command lines share (no flags are defined here): quiet start-up, recipes by name,
log filtering, one-line errors for config flags (exit status 2).

Start-up noise: `quiet_start()` sets `TF_CPP_MIN_LOG_LEVEL=2` where the environment leaves it
unset, which hides the INFO and WARNING lines of TensorFlow's and XLA's C++ logging (CPU
feature notes, device and plugin registration); `DISCO_JAX_VERBOSE=1` leaves the environment
as it is, so they show.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from absl import flags

from disco_jax.errors import EXIT_BAD_INPUT

# Environment defaults of a quiet start, applied where unset (and not with DISCO_JAX_VERBOSE=1).
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
BAD_INPUT = EXIT_BAD_INPUT  # the exit status of every bad-input error


def quiet_start() -> None:
    """Hide TensorFlow/XLA start-up chatter; call before either starts (they read the
    variable then)."""
    if os.environ.get("DISCO_JAX_VERBOSE", "") not in ("", "0"):
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def as_program(module_name: str, doc: str | None) -> None:
    """Make `--help` of a console script (whose `__main__` is a generated stub) show the
    module's docstring and flags, as `python -m module` does."""
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    program = sys.modules.get("__main__")
    if program is not None and not program.__doc__:
        program.__doc__ = doc


def fail(message: str) -> NoReturn:
    """The one-line bad-input exit: `error: message` on stderr, status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(BAD_INPUT)


# ------------------------------------------------------------------------ recipes by name


def recipe_dirs() -> list[Path]:
    """Where recipes are looked up by name: the wheel's `disco_jax/configs`, else the
    checkout's top-level `configs/` (a checkout, or an editable install of one)."""
    here = Path(__file__).resolve().parent
    return [d for d in (here / "configs", here.parent / "configs") if d.is_dir()][:1]


def recipe_names(subdir: str = "") -> list[str]:
    return sorted(p.stem for d in recipe_dirs() for p in (d / subdir).glob("*.py")
                  if not p.name.startswith("_"))


def resolve_recipe(value: str, subdir: str = "") -> str:
    """`--config` value -> a config file path. A value ending in `.py` or naming an existing
    path stays as it is; else `NAME[:variant]` is the packaged recipe `NAME.py` (in `subdir`
    of the recipes first, then at their top), the `:variant` kept. Unknown names fail (exit 2)
    with the list of names."""
    name, sep, variant = value.partition(":")
    if name.endswith(".py") or os.path.exists(name) or not name:
        return value
    for d in recipe_dirs():
        for folder in dict.fromkeys((d / subdir, d)):
            path = folder / f"{name}.py"
            if path.is_file():
                return f"{path}{sep}{variant}"
    names = recipe_names(subdir)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    fail(f"--config={value}: no file {name!r} and no recipe of that name{hint}; recipes:"
         f" {', '.join(names) or 'none (no recipes folder found)'}")


def resolve_recipe_argv(argv: list[str], subdir: str = "") -> list[str]:
    """argv with its `--config` value (`--config=V` or `--config V`) through resolve_recipe."""
    out = list(argv)
    for i, arg in enumerate(out[1:], 1):
        m = re.match(r"^--?config(=(.*))?$", arg)
        if not m:
            continue
        if m.group(1) is not None:
            out[i] = f"--config={resolve_recipe(m.group(2), subdir)}"
        elif i + 1 < len(out):
            out[i + 1] = resolve_recipe(out[i + 1], subdir)
        break
    return out


class QuietLibraries(logging.Filter):
    """Keep orbax/clu/tensorflow INFO chatter off the console; our own lines stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(s in record.pathname for s in ("orbax", "clu/", "tensorflow", "etils"))
        return record.levelno >= logging.WARNING or not noisy or "work unit notes" in record.msg


def _config_argument(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a.startswith(("--config=", "-config=")):
            return a.split("=", 1)[1]
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return "(see --config)"


def _flag_error(e: BaseException, argv: list[str]) -> str:
    """One line: the flag at fault and the innermost reason, without ml_collections' wrapping
    (which embeds whole tracebacks of the config file in its message)."""
    root = e
    while root.__cause__ is not None or (root.__context__ is not None
                                         and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    text = str(e).strip()
    if root is e:
        return text.splitlines()[0] if text else type(e).__name__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(root).__name__
    if isinstance(root, SyntaxError):
        reason = f"{root.msg} ({root.filename}, line {root.lineno})"
    head = text.split(": ", 1)[0] if text.startswith("flag --") else (
        f"--config={_config_argument(argv)}")
    return f"{head}: {reason}"


def flat_keys(config) -> list[str]:
    """Every field of a ConfigDict as a dotted path, nested ConfigDicts included."""
    out = []
    for key, value in config.items():
        out.append(key)
        if hasattr(value, "items") and not isinstance(value, str):
            out.extend(f"{key}.{k}" for k in flat_keys(value))
    return out


def load_config_file(value: str):
    """`path[:arg]` -> the config, as ml_collections' `--config` loads it (`get_config(arg)`,
    or `get_config()` without an argument)."""
    path, sep, arg = value.partition(":")
    spec = importlib.util.spec_from_file_location("_disco_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def _overrides(argv: list[str]) -> list[tuple[str, str]]:
    """(argument, dotted field) of each `--config.FIELD[=v]` / `--noconfig.FIELD` in argv."""
    found = []
    for arg in argv[1:]:
        m = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
        if m:
            found.append((arg.split("=", 1)[0], m.group(1)))
    return found


def unknown_field(argv: list[str]) -> str | None:
    """The one-line message for the first `--config.FIELD` the config lacks, with the closest
    existing field; None when every override names a field (or the config does not load)."""
    try:
        config = load_config_file(_config_argument(argv))
        keys = flat_keys(config)
    except Exception:  # noqa: BLE001 -- reported by the caller's generic path instead
        return None
    for arg, field in _overrides(argv):
        if field in keys:
            continue
        close = difflib.get_close_matches(field, keys, n=1, cutoff=0.6)
        hint = (f"did you mean {close[0]!r}?" if close else
                "check its spelling against the config file (a run writes its resolved config"
                " to WORKDIR/config.json)")
        return f"{arg}: the config has no field {field!r} ({hint})"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every config or flag problem as one line, exit status 2 and
    no traceback.

    ml_collections raises a bare AttributeError for `--config.no_such_field=1`, loads a config
    file that does not exist lazily (failing at first use), and wraps errors raised inside a
    config file with its traceback.
    """
    try:
        args = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value
        if config is not None:
            config.get("method")  # a config file that failed to load raises here
        return args
    except SystemExit as e:
        # absl ends --help/--helpfull with status 1; asking for help is no error.
        helps = ("help", "?", "helpshort", "helpfull", "helpxml")
        if e.code == 1 and any(a.split("=", 1)[0].lstrip("-") in helps for a in argv[1:]):
            sys.exit(0)
        raise
    except (AttributeError, KeyError) as e:
        fail(unknown_field(argv) or _flag_error(e, argv))
    except Exception as e:  # noqa: BLE001 -- anything a config file raises while loading
        fail(f"{_flag_error(e, argv)} (--helpfull lists the flags)")
