"""The training CLI with a signal at a step, for the tests that kill or preempt a run.

`python -m tests.signal_run STEP SIGNUM --config=... --workdir=... [flags]` runs the command
`python -m disco_jax.main --config=... --workdir=... [flags]` would, with one more action:
right after step STEP's update the process sends itself signal SIGNUM. SIGKILL (9) dies on the
spot, perhaps while an async checkpoint write is in flight; SIGTERM (15) is a preemption notice
(the run checkpoints at that step and exits 0). In-process runs pass `signal_at(...)` to
`train.run(..., extra_actions=...)` directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def signal_at(step: int, signum: int) -> Callable[[int, dict], None]:
    """An extra action for `train.run`: this process sends itself `signum` after step `step`."""

    def action(current: int, state: dict) -> None:
        del state
        if current == step:
            os.kill(os.getpid(), signum)

    return action


def command(step: int, signum: int) -> list[str]:
    """The start of the command line, in place of `[python, -m, disco_jax.main]`."""
    return [sys.executable, "-m", "tests.signal_run", str(step), str(signum)]


def cli(config_file: str, workdir: str, step: int, signum: int, *flags: str,
        env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """tests/robust_util.cli with `signum` sent after step `step`."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run(
        [*command(step, signum), f"--config={config_file}", f"--workdir={workdir}", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env,
    )


if __name__ == "__main__":
    at_step, signum = int(sys.argv[1]), int(sys.argv[2])
    del sys.argv[1:3]  # the rest is the training CLI's own command line
    from disco_jax import main

    main.cli(extra_actions=(signal_at(at_step, signum),))
