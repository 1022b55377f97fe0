"""Evaluate any encoder as the papers do, without retraining and without a teacher.

    python -m disco_jax.evaluate --encoder DIR --workdir OUT [--config configs/eval/NAME.py[:v]]
        [--config.x=y] [--teacher DIR]
    python -m disco_jax.evaluate --workdir W          # W: a finished training run

`--config` also takes a protocol's name (`linear:smoke`: configs/eval/linear.py, which an
installed package carries inside it). Installed, the same command is `disco-jax-evaluate`.

`DIR` is an encoder directory (`W/encoder` of a run, or what `python -m disco_jax.convert`
wrote). Given only `--workdir W` of a training run, its encoder is evaluated and the results go
into W. The data is `--config.data.name=...` (default: the dataset the encoder's manifest
records). The evaluators are the config's `evals` (default: kNN with a k sweep and the quick
probe; configs/eval/ has the paper protocols). Writes OUT/eval.json (one record per evaluator:
name, protocol version, settings, metrics), OUT/eval.md, TensorBoard events and OUT/plots/
(t-SNE of test embeddings; with `--teacher DIR`, student vs teacher similarities). Long
protocols checkpoint under OUT/<name>/ and resume when the command is run again.
Bad input ends with one `error:` line and exit status 2, before anything is written.
TensorFlow's and XLA's start-up lines are hidden (`TF_CPP_MIN_LOG_LEVEL=2` where unset);
`DISCO_JAX_VERBOSE=1` shows them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval",
                               "protocols.py")
_FLAGS: dict = {}


def define_flags() -> None:
    """The command line's flags; defined only when this module runs as the program, so that
    importing it (tests, other tools) never clashes with disco_jax.main's `--config`."""
    # Default None: with a default file, ml_collections would apply `--config.x` overrides at
    # definition time, before our one-line error handling exists; `__main__` inserts it.
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Evaluation config file (default: disco_jax/eval/protocols.py).",
        lock_config=True)
    _FLAGS["encoder"] = flags.DEFINE_string("encoder", None, "Encoder directory to evaluate.")
    _FLAGS["workdir"] = flags.DEFINE_string(
        "workdir", None, "Output directory (or a finished training run whose encoder is"
        " evaluated).")
    _FLAGS["teacher"] = flags.DEFINE_string(
        "teacher", None, "Optional teacher encoder directory: student vs teacher similarity"
        " plot and agreement evaluators.")


log = logging.getLogger("disco_jax")


def _is_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "encoder", "manifest.json")) or os.path.isdir(
        os.path.join(path, "checkpoints"))


def resolve_dirs(encoder: str | None, workdir: str | None) -> tuple[str, str]:
    """(encoder directory, output directory) from the two flags; ConfigError if ambiguous."""
    from disco_jax.errors import ConfigError

    if not encoder and not workdir:
        raise ConfigError("give --encoder DIR --workdir OUT, or --workdir W of a finished"
                          " training run")
    if not encoder:
        if not _is_run(workdir):
            raise ConfigError(f"--workdir {workdir!r} is not a training run (no encoder/ inside);"
                              " give --encoder DIR too")
        return os.path.join(workdir, "encoder"), workdir
    if not workdir:
        raise ConfigError("--encoder needs --workdir OUT (where eval.json is written)")
    if _is_run(workdir) and os.path.abspath(os.path.join(workdir, "encoder")) != os.path.abspath(
            encoder):
        raise ConfigError(f"--workdir {workdir!r} is a training run with its own encoder and"
                          f" --encoder names another one; give only one of them, or another"
                          " --workdir for the output")
    if not os.path.isdir(encoder):
        raise ConfigError(f"encoder directory {encoder!r} does not exist")
    return encoder, workdir


def _data_defaults(config: Any, manifest: dict) -> None:
    """Fill data.name / image_size / eval split from the manifest (what the encoder saw)."""
    from disco_jax.errors import ConfigError

    seen = manifest.get("data") or {}
    with config.unlocked():
        if not config.data.name:
            if not seen.get("name"):
                raise ConfigError(f"the encoder's manifest ({manifest['path']}) records no"
                                  " dataset: pass --config.data.name=NAME (digits, a TFDS name"
                                  " or folder:/path)")
            config.data.name = seen["name"]
        if config.data.image_size <= 0:
            same = seen.get("name") == config.data.name
            config.data.image_size = int(seen.get("image_size", 224)) if same else 224
        if config.data.get("mean") is None and seen.get("mean") and seen.get("std"):
            # The normalisation the encoder was trained with (manifests before it: ImageNet's).
            config.data.mean, config.data.std = tuple(seen["mean"]), tuple(seen["std"])


def _fix_eval_split(config: Any) -> None:
    from disco_jax import data

    source = data.get_source(config.data)
    with config.unlocked():
        if config.data.eval_split not in source.splits and "validation" in source.splits:
            config.data.eval_split = "validation"  # imagenet2012 has no labelled test split
        if config.data.train_split not in source.splits:
            from disco_jax.errors import unknown_name

            raise unknown_name("split", config.data.train_split, source.splits)


def _outputs(out: dict) -> dict:
    import jax.numpy as jnp

    keep = ("features", "embedding", "logits")
    return {k: out[k].astype(jnp.float32) for k in keep if k in out}


def build_model(module: Any, host_vars: dict, manifest: dict, mesh: Any, dtype: Any,
                teacher: tuple | None = None, stats: tuple | None = None) -> Any:
    """An `eval.Model` over an encoder (and optionally a teacher for the pair predictions)."""
    import jax

    from disco_jax import eval as evaluation
    from disco_jax import sharding

    repl = sharding.replicated(mesh)
    variables = {"params": host_vars["params"], "batch_stats": host_vars.get("batch_stats", {})}
    if teacher is not None:
        variables["teacher"] = {k: teacher[1][k] for k in ("params", "batch_stats")
                                if k in teacher[1]}
    variables = jax.device_put(variables, repl)

    def fn(v, x):
        own = {"params": v["params"], "batch_stats": v["batch_stats"]}
        return _outputs(module.apply(own, evaluation.common.normalize(x, dtype, stats),
                                     train=False))

    pair = None
    if teacher is not None:
        t_module = teacher[0]

        def pair(v, x):
            x = evaluation.common.normalize(x, dtype, stats)
            own = {"params": v["params"], "batch_stats": v["batch_stats"]}
            s = module.apply(own, x, train=False)["embedding"]
            t = t_module.apply(v["teacher"], x, train=False)["embedding"]
            return {"student": s.astype("float32"), "teacher": t.astype("float32")}

    return evaluation.Model(
        fn=fn, variables=variables, mesh=mesh, step=int(manifest.get("step", 0)), pair=pair,
        encoder=lambda: (module, host_vars, manifest),
        has_classifier=int(manifest.get("num_classes") or 0) > 0,
        tag=str(manifest.get("fingerprint", manifest["path"])))


def prepare(config: Any, encoder_flag: str | None, workdir_flag: str | None,
            teacher_flag: str | None) -> dict:
    """Everything checked before a compile or a write; returns what `evaluate` needs."""
    import jax

    from disco_jax import checkpoint, models, sharding, train
    from disco_jax import eval as evaluation

    encoder_dir, out = resolve_dirs(encoder_flag, workdir_flag)
    manifest = checkpoint.read_manifest(encoder_dir, role="encoder")
    dtype = train.compute_dtype(config.dtype)
    module = models.build_encoder(manifest, dtype)  # an unknown model name fails here
    _data_defaults(config, manifest)
    _fix_eval_split(config)
    teacher_manifest = None
    if teacher_flag:
        teacher_manifest = checkpoint.read_manifest(teacher_flag, role="teacher")
        models.build_encoder(teacher_manifest, dtype)
    mesh = sharding.make_mesh(config.mesh.num_devices)
    sharding.check_batch(config.batch_size, mesh)
    env = evaluation.Env(mesh=mesh, data=config.data, workdir=out, seed=config.seed,
                         batch_size=config.batch_size, dtype=dtype,
                         has_classifier=int(manifest.get("num_classes") or 0) > 0,
                         has_teacher=bool(teacher_flag))
    evaluation.validate(config.evals, env)
    # Weights last (the slowest check): unreadable or mismatched ones are one line too.
    host_vars, manifest = checkpoint.load_encoder(encoder_dir, role="encoder")
    train.check_variables(module, host_vars, manifest, config.data.image_size, dtype,
                          role="encoder")
    teacher = None
    if teacher_flag:
        t_vars, teacher_manifest = checkpoint.load_encoder(teacher_flag, role="teacher")
        t_module = models.build_encoder(teacher_manifest, dtype)
        train.check_variables(t_module, t_vars, teacher_manifest, config.data.image_size,
                              dtype, role="teacher")
        teacher = (t_module, t_vars, teacher_manifest)
    del jax
    return {"out": out, "env": env, "manifest": manifest, "teacher": teacher,
            "model": build_model(module, host_vars, manifest, mesh, dtype, teacher,
                                 evaluation.common.norm_stats(config.data))}


def evaluate(config: Any, prepared: dict) -> list[dict]:
    """Run every evaluator with `at_end`, write eval.json / eval.md / events / plots."""
    import jax

    from disco_jax import eval as evaluation
    from disco_jax.eval import records
    from disco_jax.run_log import metric_writers  # clu, once TF's GPUs are hidden

    out, env, model, manifest = (prepared[k] for k in ("out", "env", "model", "manifest"))
    os.makedirs(out, exist_ok=True)
    suite = evaluation.Suite(config.evals, env)
    t0 = time.time()
    results = suite.run_all(model)
    header = {"encoder": manifest["path"], "model": manifest.get("model"),
              "fingerprint": manifest.get("fingerprint"),
              "data": config.data.to_dict(), "step": model.step,
              "seconds": round(time.time() - t0, 1)}
    if jax.process_index() == 0:
        records.write(out, results, header)
        writer = metric_writers.create_default_writer(out, just_logging=False)
        writer.write_scalars(model.step, {k: v for k, v in evaluation.flat(results).items()
                                          if isinstance(v, float)})
        writer.close()
    if config.plots:
        _plots(config, prepared)
    return results


def _plots(config: Any, prepared: dict) -> None:
    """t-SNE of test embeddings; with a teacher, the similarity distributions."""
    import jax

    from disco_jax import data, plot
    from disco_jax.eval import common

    env, model = prepared["env"], prepared["model"]
    source = data.get_source(config.data)
    feats = common.extract(model, source, config.data.eval_split, size=config.data.image_size,
                           batch_size=env.batch_size, limit=config.plot_points)
    teacher = None
    if prepared["teacher"] is not None:
        pair = common.extract(model, source, config.data.eval_split,
                              size=config.data.image_size, batch_size=env.batch_size,
                              keys=("student", "teacher"), limit=config.plot_points, pair=True)
        teacher = pair["teacher"]
    if jax.process_index() != 0:
        return
    out = prepared["out"]
    n = config.plot_points
    plot.save_embeddings(out, feats["features"][:n], feats["label"][:n],
                         None if teacher is None else teacher[:n])
    paths = [plot.tsne(feats["features"][:n], feats["label"][:n],
                       os.path.join(out, "plots", "tsne.png"), max_points=n,
                       title=f"{prepared['manifest'].get('model')} on {source.name}")]
    if teacher is not None:
        paths.append(plot.similarity(pair["student"][:n], teacher[:n],
                                     os.path.join(out, "plots", "similarity.png"), max_points=n))
    log.info("plots: %s", ", ".join(paths))


def main(argv: list[str]) -> None:
    del argv
    from disco_jax import cli as cli_lib
    from disco_jax.errors import EXIT_RUN_FAILED, ConfigError, RunError
    from disco_jax.eval.linear import Preempted

    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_handler().addFilter(cli_lib.QuietLibraries())
    config = _FLAGS["config"].value
    try:
        prepared = prepare(config, _FLAGS["encoder"].value, _FLAGS["workdir"].value,
                           _FLAGS["teacher"].value)
        results = evaluate(config, prepared)
    except ConfigError as e:
        cli_lib.fail(str(e))
    except RunError as e:  # the environment failed a valid evaluation (disk full)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_RUN_FAILED)
    except Preempted as e:
        print(f"{e}; run the same command again to resume", file=sys.stderr)
        return
    from disco_jax.eval import records

    print(records.table(results))
    print(f"wrote {os.path.join(prepared['out'], 'eval.json')}")


def _with_default_config(argv: list[str]) -> list[str]:
    """argv with `--config=<default>` first when none is given (before any override)."""
    if any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        return argv
    return [argv[0], f"--config={_DEFAULT_CONFIG}", *argv[1:]]


def cli() -> None:
    """The program (`python -m disco_jax.evaluate`, `disco-jax-evaluate`)."""
    from disco_jax import cli as cli_lib

    cli_lib.quiet_start()
    define_flags()
    cli_lib.as_program(__name__, __doc__)
    sys.argv = cli_lib.resolve_recipe_argv(_with_default_config(sys.argv), subdir="eval")
    app.run(main, flags_parser=cli_lib.parse_flags)


if __name__ == "__main__":
    cli()
