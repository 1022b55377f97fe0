"""What the command lines share (no flags are defined here): log filtering, one-line errors
for config flags."""

from __future__ import annotations

import logging
import sys

from absl import flags


class QuietLibraries(logging.Filter):
    """Keep orbax/clu/tensorflow INFO chatter off the console; our own lines stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(s in record.pathname for s in ("orbax", "clu/", "tensorflow", "etils"))
        return record.levelno >= logging.WARNING or not noisy or "work unit notes" in record.msg


def _config_argument() -> str:
    return next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                "(see --config)")


def _flag_error(e: BaseException) -> str:
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
        f"--config={_config_argument()}")
    return f"{head}: {reason}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every config problem as one line and no traceback.

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
    except (AttributeError, KeyError) as e:
        field = str(e).strip("\"'")
        culprit = next((a for a in argv if a.startswith("--config.") and field in a), None)
        if culprit is None:
            sys.exit(f"error: {_flag_error(e)}")
        sys.exit(f"error: {culprit}: the config has no field {field!r}; check its spelling"
                 " against the config file (a run writes its resolved config to"
                 " WORKDIR/config.json)")
    except Exception as e:  # noqa: BLE001 -- anything a config file raises while loading
        sys.exit(f"error: {_flag_error(e)} (--helpfull lists the flags)")


