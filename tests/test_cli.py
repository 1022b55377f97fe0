"""The command lines: bad input is one `error:` line and exit status 2, recipes by name,
`--dry_run` (plan, no compile, no workdir), quiet start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from disco_jax import cli
from tests.helpers import ROOT, load_config

RECIPE = "configs/moco_v2_r50.py:smoke"  # needs no teacher


def _run(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def _one_error(proc: subprocess.CompletedProcess) -> str:
    """The run's single `error:` line; exit status 2 and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


# ------------------------------------------------------------------------- unknown fields


@pytest.mark.slow
@pytest.mark.parametrize("override, field, close", [
    ("--config.batchsize=512", "batchsize", "batch_size"),
    ("--config.optimizr.base_lr=0.1", "optimizr.base_lr", "optimizer.base_lr"),
])
def test_unknown_field_names_it_and_the_closest_field(tmp_path, override, field, close):
    proc = _run("disco_jax.main", f"--config={RECIPE}", f"--workdir={tmp_path / 'w'}", override)
    flag = override.split("=", 1)[0]
    assert _one_error(proc) == (f"error: {flag}: the config has no field {field!r}"
                                f" (did you mean {close!r}?)")
    assert not (tmp_path / "w").exists()


def test_unknown_field_suggestion_comes_from_the_flattened_config():
    cfg = load_config("moco_v2_r50.py:smoke")
    keys = cli.flat_keys(cfg)
    assert {"batch_size", "optimizer", "optimizer.base_lr", "data.crop_scale"} <= set(keys)
    assert "student.model_kwargs" in keys


# ------------------------------------------------------------------- every bad input: 2


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (("--workdir={w}",), "error: both --config and --workdir are required"),
    ((f"--config={RECIPE}",), "error: both --config and --workdir are required"),
    ((f"--config={RECIPE}", "--workdir={w}", "--workdirr=x"), "Unknown command line flag"),
    ((f"--config={RECIPE}", "--workdir={w}", "--config.batch_size=abc"),
     "--config.batch_size=abc: invalid literal for int()"),
    ((f"--config={RECIPE}", "--workdir={w}", "--config.optimizer.base_lr=fast"),
     "base_lr=fast: could not convert string to float"),
    (("--config=configs/seed_mbv3.py:smok", "--workdir={w}"),
     "unknown config argument 'smok' in 'smok'; this config takes: smoke=False"),
    (("--config=configs/mcl_cifar_resnet32x2.py:smoke,m=four", "--workdir={w}"),
     "config argument m='four' is not an integer"),
    (("--config=configs/no_such.py", "--workdir={w}"),
     "error: --config=configs/no_such.py: [Errno 2] No such file"),
    # A validation error of the trainer (ConfigError), raised before anything compiles.
    ((f"--config={RECIPE}", "--workdir={w}", "--config.queue_size=60"),
     "queue size 60 must be a positive multiple"),
    # An official recipe where its data is not prepared: how to prepare it.
    (("--config=configs/seed_mbv3.py", "--workdir={w}"),
     "/downloads/manual/ and run `tfds build imagenet2012 --data_dir "),
])
def test_main_bad_input_exits_2(tmp_path, data_dir, args, message):
    args = [a.format(w=tmp_path / "w") for a in args]
    if any(a.startswith("--config=") for a in args):
        args.append(f"--config.data.data_dir={data_dir}")
    assert message in _one_error(_run("disco_jax.main", *args))
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_evaluate_bad_input_exits_2(tmp_path):
    # A field the evaluation config lacks: named, with the closest one.
    line = _one_error(_run("disco_jax.evaluate", f"--encoder={tmp_path}",
                           f"--workdir={tmp_path / 'out'}", "--config.evals.knn.tempp=0.1"))
    assert line == ("error: --config.evals.knn.tempp: the config has no field"
                    " 'evals.knn.tempp' (did you mean 'evals.knn.temp'?)")
    # A protocol name that does not exist lists the protocols (before anything imports jax).
    line = _one_error(_run("disco_jax.evaluate", "--config=lineer:smoke",
                           f"--workdir={tmp_path / 'out'}"))
    assert "did you mean 'linear'?" in line and "classifier, default, linear, semi" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_convert_bad_input_exits_2(tmp_path):
    line = _one_error(_run("disco_jax.convert", "export", str(tmp_path / "no_such_encoder"),
                           str(tmp_path / "out.pth")))
    assert "no_such_encoder" in line
    proc = _run("disco_jax.convert", "torchvision")  # argparse: missing arguments
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_convert_without_torch_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    from disco_jax.convert.__main__ import main

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    assert main(["export", str(tmp_path), str(tmp_path / "out.pth")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "pip install 'disco_jax[torch]'" in line


# -------------------------------------------------------------------------- recipes by name


def test_recipe_names_resolve_to_the_recipe_files(monkeypatch, tmp_path):
    configs = os.path.join(ROOT, "configs")
    assert cli.resolve_recipe("seed_mbv3:smoke") == os.path.join(configs, "seed_mbv3.py:smoke")
    assert cli.resolve_recipe("seed_mbv3") == os.path.join(configs, "seed_mbv3.py")
    # Evaluation protocols: configs/eval/ first, then the top level.
    assert cli.resolve_recipe("linear:smoke", "eval") == os.path.join(configs, "eval",
                                                                       "linear.py:smoke")
    assert cli.resolve_recipe("eval/semi", "eval") == os.path.join(configs, "eval", "semi.py")
    # Paths stay paths: a .py file, or anything that exists.
    assert cli.resolve_recipe("configs/seed_mbv3.py:smoke") == "configs/seed_mbv3.py:smoke"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").write_text("")
    assert cli.resolve_recipe("mine:x") == "mine:x"
    argv = ["prog", "--config", "demo:smoke", "--config.seed=1"]
    assert cli.resolve_recipe_argv(argv)[2] == os.path.join(configs, "demo.py:smoke")
    argv = ["prog", "--config=demo", "--workdir=w"]
    assert cli.resolve_recipe_argv(argv) == ["prog", f"--config={configs}/demo.py", "--workdir=w"]


def test_unknown_recipe_name_lists_the_names(capsys):
    with pytest.raises(SystemExit) as info:
        cli.resolve_recipe("seed_mbv4:smoke")
    assert info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --config=seed_mbv4:smoke: no file 'seed_mbv4'")
    assert "did you mean 'seed_mbv3'?" in line and "moco_v2_r50, " in line


# --------------------------------------------------------------------------------- dry run


@pytest.mark.slow
def test_dry_run_prints_config_and_plan_without_compiling_or_writing(tmp_path, data_dir):
    workdir = tmp_path / "w"
    # By name, from the checkout; JAX_LOG_COMPILES logs every XLA compilation.
    proc = _run("disco_jax.main", "--config=moco_v2_r50:smoke", f"--workdir={workdir}",
                f"--config.data.data_dir={data_dir}", "--config.batch_size=32", "--dry_run",
                env={"JAX_LOG_COMPILES": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    resolved = json.loads(out[:out.index("\nplan:") + 1])  # the resolved config comes first
    assert resolved["method"] == "moco_v2" and resolved["batch_size"] == 32
    assert resolved["loss"]["temp"] == 0.2  # method knobs resolved
    lines = [line.strip() for line in out[out.index("\nplan:"):].splitlines() if line.strip()]
    cfg = load_config("moco_v2_r50.py:smoke", data_dir)
    assert "steps per epoch" in out and "epochs: " in out
    assert f"steps: {cfg.total_steps} in total" in lines
    assert any(line.startswith("devices: 8 x cpu in 1 process(es)") for line in lines)
    assert "batch: 32 global, 4 per device" in lines
    flops = [line for line in lines if line.startswith("student: ")]
    assert len(flops) == 1 and "GFLOPs" in flops[0] and "n/a" not in flops[0]
    assert lines[-1].startswith("dry run: the config is valid")
    assert "Finished XLA compilation" not in proc.stderr  # nothing was compiled
    assert not workdir.exists()


@pytest.mark.slow
def test_dry_run_plans_every_stage_of_a_multi_stage_config(tmp_path, data_dir):
    stages = load_config("demo.py:smoke").stage_order
    data = [f"--config.stages.{s}.data.data_dir={data_dir}" for s in stages]
    proc = _run("disco_jax.main", "--config=demo:smoke", "--dry_run", *data)  # no --workdir
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in stages:
        assert f"plan of stage {stage}:" in proc.stdout
    # The students distilled from the demo's own teacher: their teacher is not there yet.
    assert proc.stdout.count("checks: partial") == 2


def test_quiet_start_sets_defaults_only_where_unset(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.delenv("DISCO_JAX_VERBOSE", raising=False)
    cli.quiet_start()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    cli.quiet_start()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"  # the user's own setting stays
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    monkeypatch.setenv("DISCO_JAX_VERBOSE", "1")
    cli.quiet_start()
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
