"""Command line: `python -m disco_jax.main --config RECIPE[:variant] --workdir DIR`.

RECIPE is a config file (`configs/seed_mbv3.py`) or a recipe's name (`seed_mbv3`: the file of
that name in configs/, which an installed package carries inside it). `--config.x=y` overrides
any field. A config with `stages` (configs/demo.py) runs several trainings in order, each in
`DIR/<stage>`, and writes a results table to `DIR/results.{json,md}`; its stages share JAX's
persistent compilation cache in `DIR/compile_cache` (unless JAX_COMPILATION_CACHE_DIR is set).
`--dry_run` checks the config as a run would, prints the resolved config and the plan (steps,
epochs, devices, batch per device, the student's FLOPs per image) and exits without compiling or
writing anything (`--workdir` may then be left out). Installed, the same command is
`disco-jax-train`. Bad input ends with one `error:` line and exit status 2, never a traceback.
TensorFlow's and XLA's start-up lines are hidden (`TF_CPP_MIN_LOG_LEVEL=2` where unset);
`DISCO_JAX_VERBOSE=1` shows them.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from disco_jax import cli as cli_lib
from disco_jax.cli import QuietLibraries, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
# Multi-process runs (see disco_jax/distributed.py and launch/README.md).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (env DISCO_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (env DISCO_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id in [0, num_processes) (env DISCO_PROCESS_ID).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "on: jax cluster auto-detection (TPU pods, SLURM); auto: when SLURM/TPU env shows several"
    " processes or the flags above are given; off: single process.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Check the config, print it resolved and the run's plan (steps, devices,"
    " batch per device, FLOPs per image), and exit without compiling or writing the workdir.")
_DIST_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300,
    "Seconds to wait for every process to arrive, and for a silent peer mid-run before it is"
    " declared lost (a killed peer is noticed at once).")


def _seeds(config, name: str) -> tuple:
    """The seeds stage `name` runs with: `config.seeds` for the stages in `config.seeded`
    (each in DIR/<stage>/seed<k>), else its own config's seed once (in DIR/<stage>)."""
    return tuple(config.seeds) if name in config.get("seeded", ()) else (None,)


def run_stages(config, workdir: str, extra_actions: tuple = ()) -> dict:
    """Run each stage of a multi-stage config (some once per seed), evaluate the reference
    rows of `config.baselines` (`disco_jax.baselines`), and write the results table.
    `extra_actions` go to every stage's `train.run`."""
    from disco_jax import baselines, jit_util, report, train

    # Seeds of a stage compile the same programs: the 2nd and 3rd load them from this cache.
    jit_util.enable_compile_cache(os.path.join(workdir, "compile_cache"))
    results, t0 = {}, time.time()
    for name in config.stage_order:
        runs = []
        for seed in _seeds(config, name):
            stage = copy.deepcopy(config.stages[name])
            if stage.teacher.init:
                stage.teacher.init = stage.teacher.init.format(workdir=os.path.abspath(workdir))
            if stage.student.get("init"):  # a later stage starting from an earlier one's encoder
                stage.student.init = stage.student.init.format(workdir=os.path.abspath(workdir))
            stage_dir = os.path.join(workdir, name)
            if seed is not None:
                stage.seed = seed
                stage_dir = os.path.join(stage_dir, f"seed{seed}")
            logging.getLogger("disco_jax").info("=== stage %s (%s, seed %d)", name,
                                                stage.method, stage.seed)
            t = time.time()
            res = {**train.run(stage, stage_dir, extra_actions), "seed": stage.seed,
                   "stage_seconds": round(time.time() - t, 1)}
            runs.append(res)
            if res.get("preempted"):  # later stages need this one finished
                results[name] = report.aggregate(runs)
                return {"stages": results, "preempted": True, "step": res["step"],
                        "wall_seconds": round(time.time() - t0, 1)}
        results[name] = report.aggregate(runs)
    for kind in config.get("baselines", ()):
        stage = config.stages[config.baseline_stage]
        t = time.time()
        res = baselines.evaluate(kind, stage, os.path.join(workdir, kind))
        results[kind] = report.aggregate([{**res, "seed": stage.seed,
                                           "stage_seconds": round(time.time() - t, 1)}])
    summary = {"stages": results, "wall_seconds": round(time.time() - t0, 1)}
    report.write(workdir, summary, config)
    return summary


def dry_run(config) -> None:
    """`--dry_run`: validate, print the resolved config and the plan; compile and write nothing.
    A ConfigError propagates (one line, exit 2) as it would from a run."""
    import jax

    from disco_jax import methods, plan

    if "stages" in config:
        plans = plan.plan_stages(config)
        resolved = {name: json.loads(methods.resolve_loss(config.stages[name])
                                     .to_json_best_effort()) for name in config.stage_order}
    else:
        plans = {"": plan.plan(config)}
        resolved = json.loads(methods.resolve_loss(config).to_json_best_effort())
    if jax.process_index() > 0:
        return
    print(json.dumps(resolved, indent=2, sort_keys=True))
    for name, p in plans.items():
        print(f"plan{f' of stage {name}' if name else ''}:")
        for line in plan.describe(p):
            print(f"  {line}")
    print("dry run: the config is valid; nothing was compiled or written")


def main(argv: list[str], extra_actions: tuple = ()) -> None:
    """The program; `extra_actions` go to `train.run` (tests/signal_run.py passes one)."""
    del argv
    from disco_jax.errors import EXIT_NONFINITE, EXIT_RUN_FAILED, ConfigError, RunError

    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_handler().addFilter(QuietLibraries())
    config, workdir = _CONFIG.value, _WORKDIR.value
    if config is None or not (workdir or _DRY_RUN.value):
        cli_lib.fail("both --config and --workdir are required")
    import jax

    from disco_jax import distributed

    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               timeout_s=_DIST_TIMEOUT.value, mode=_DISTRIBUTED.value)
        if jax.process_index() > 0:  # one progress log per run: process 0's
            absl_logging.set_verbosity(absl_logging.WARNING)
        from disco_jax import train

        if _DRY_RUN.value:
            dry_run(config)
            results = {}
        elif "stages" in config:
            results = run_stages(config, workdir, extra_actions)
            if not results.get("preempted"):
                print(open(os.path.join(workdir, "results.md")).read())
                print(json.dumps({"wall_seconds": results["wall_seconds"]}))
        else:
            results = train.run(config, workdir, extra_actions)
        distributed.finish(ok=True)  # peers must not take this exit for a death
        if results.get("preempted"):
            print(f"preempted: saved step {results['step']} in {workdir}; run the same"
                  " command again to resume", file=sys.stderr)
    except ConfigError as e:
        distributed.finish(ok=False)
        cli_lib.fail(str(e))
    except (FloatingPointError, RunError) as e:  # a valid run stopped: non-finite, disk, peers
        distributed.finish(ok=False)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE if isinstance(e, FloatingPointError) else EXIT_RUN_FAILED)
    except KeyboardInterrupt:
        distributed.finish(ok=False)
        raise
    except Exception:
        distributed.explain_failure()  # a lost peer process is named here (and exits)
        raise


def cli(extra_actions: tuple = ()) -> None:
    """The program (`python -m disco_jax.main`, `disco-jax-train`); `extra_actions`: more
    periodic work for `train.run`, `action(step, state)` (tests/signal_run.py)."""
    cli_lib.quiet_start()
    cli_lib.as_program(__name__, __doc__)
    sys.argv = cli_lib.resolve_recipe_argv(sys.argv)
    app.run(functools.partial(main, extra_actions=extra_actions), flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
