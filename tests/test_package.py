"""The package installs and runs outside the checkout: wheel and editable install.

Each install goes into a fresh virtualenv that borrows the test environment's site-packages
(jax, TensorFlow, ...) through a `.pth` file, so nothing heavy is downloaded or copied, while
disco_jax itself comes only from the wheel (or the editable install). Everything is built from
a copy of the sources, so the checkout gets no build/ or egg-info and the test venv is never
installed into.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # end to end: whole runs, subprocesses

# Console script -> what its --help must show (its own flags, not only absl's).
SCRIPTS = {"disco-jax-train": "dry_run: Check", "disco-jax-evaluate": "--encoder",
           "disco-jax-convert": "usage: python -m disco_jax.convert"}
# The example is seed_mbv3:smoke; it needs its smoke teacher (teacher.init="random",
# issue #12 item 5). moco_v2_r50:smoke needs no teacher at all, so this test checks packaging
# only. Any `configs/NAME.py:smoke` that runs alone will do.
RECIPE = "moco_v2_r50:smoke"
# Packaging is under test, not the run: no evaluators, a ResNet-10 on 1 device (a fraction of
# the ResNet-50's compile on 8).
RUN_FLAGS = ("--config.eval.enabled=False", "--config.student.model=resnet10",
             "--config.mesh.num_devices=1")


def _run(cmd: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the checkout
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """What the package is built from, copied out of the checkout."""
    src = tmp_path_factory.mktemp("src")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("disco_jax", "configs"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    return src


def _venv(path: Path) -> Path:
    """A fresh venv (no pip of its own) that sees this environment's packages after its own."""
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent))
    python = path / "bin" / "python"
    purelib = _ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                       cwd=path.parent)).stdout.strip()
    # addsitedir: this environment's own .pth files apply too, as they do in it.
    lines = [f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()]
    Path(purelib, "_borrowed_test_env.pth").write_text("\n".join(lines) + "\n")
    return python


def _pip(python: Path, *args) -> None:
    """This environment's pip, acting on `python`'s venv: offline, no dependencies."""
    _ok(_run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
              "--no-index", "--no-cache-dir", "--disable-pip-version-check", *args],
             cwd=python.parent))


def _check_installed(python: Path, home: Path, data_dir: str, expect_under: Path,
                     train: bool = True) -> None:
    """From a directory outside the checkout: disco_jax is the installed one, a recipe runs by
    its name (`train=False`: its dry run, which finds and validates it but compiles nothing),
    an unknown name lists the recipes (exit 2), and the console scripts answer."""
    cwd = home / "elsewhere"
    cwd.mkdir()
    where = _ok(_run([python, "-c", "import disco_jax; print(disco_jax.__file__)"], cwd=cwd))
    assert Path(where.stdout.strip()).resolve().is_relative_to(expect_under.resolve())
    assert not Path(where.stdout.strip()).resolve().is_relative_to(Path(ROOT).resolve())

    bad = _run([python, "-m", "disco_jax.main", "--config", "seed_mbv4:smoke", "--workdir",
                home / "w_bad"], cwd=cwd)
    assert bad.returncode == 2, bad.stderr[-2000:]
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --config=seed_mbv4:smoke") and "seed_mbv3" in line, line
    assert "Traceback" not in bad.stderr

    workdir = home / "w"
    cmd = [python, "-m", "disco_jax.main", "--config", RECIPE, "--workdir", workdir,
           f"--config.data.data_dir={data_dir}", *RUN_FLAGS]
    if not train:
        out = _ok(_run([*cmd, "--dry_run"], cwd=cwd)).stdout
        assert "dry run: the config is valid" in out and '"method": "moco_v2"' in out
        assert not workdir.exists()
    else:
        _ok(_run(cmd, cwd=cwd))
        _check_run(workdir)
    for script, shows in SCRIPTS.items():
        exe = python.parent / script
        assert exe.is_file(), f"{script} was not installed"
        proc = _ok(_run([exe, "--help"], cwd=cwd))
        assert shows in proc.stdout, proc.stdout[-2000:]


def _check_run(workdir: Path) -> None:
    config = json.loads((workdir / "config.json").read_text())
    assert config["method"] == "moco_v2" and config["data"]["name"] == "digits"
    assert json.loads((workdir / "results.json").read_text())["step"] == config["total_steps"]


def test_dependency_ranges_include_the_tested_pins():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    project = tomllib.loads(Path(ROOT, "pyproject.toml").read_text())["project"]
    pins = {}
    for line in Path(ROOT, "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    deps = [Requirement(d) for d in project["dependencies"]]
    # requirements.txt is the runtime lock: each of its packages is a dependency (a fresh
    # `pip install .` once lacked tensorboard and importlib_resources, which only it pinned).
    assert {canonicalize_name(r.name) for r in deps} == set(pins)
    for req in deps:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but requirements.txt does not pin it"
        assert req.specifier.contains(pins[name]), (str(req), pins[name])
    # Test and conversion tools stay out of the runtime dependencies.
    assert not {"torch", "pytest", "ruff"} & {canonicalize_name(r.name) for r in deps}
    assert SpecifierSet(project["requires-python"]).contains("3.11")
    assert not SpecifierSet(project["requires-python"]).contains("3.10")


def test_wheel_installs_and_runs_a_packaged_recipe_by_name(source, tmp_path, data_dir):
    dist = tmp_path / "dist"
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
              "--no-cache-dir", "--disable-pip-version-check", "-w", dist, source],
             cwd=tmp_path))
    (wheel,) = dist.glob("disco_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every module of the source tree is in the wheel (the package list is explicit), and the
    # recipes with their evaluation protocols are packaged as disco_jax.configs.
    tree = {str(p.relative_to(source)) for p in (source / "disco_jax").rglob("*.py")}
    assert tree <= names, sorted(tree - names)
    recipes = {f"disco_jax/configs/{p.relative_to(source / 'configs')}"
               for p in (source / "configs").rglob("*.py")}
    assert {"disco_jax/configs/seed_mbv3.py", "disco_jax/configs/eval/linear.py"} <= recipes
    assert recipes <= names, sorted(recipes - names)
    assert not {n for n in names if n.startswith(("tests/", "launch/", "configs/"))}

    venv = tmp_path / "venv"
    python = _venv(venv)
    _pip(python, wheel)
    _check_installed(python, tmp_path, data_dir, expect_under=venv)


def test_editable_install_finds_a_recipe_by_name(source, tmp_path, data_dir):
    venv = tmp_path / "venv"
    python = _venv(venv)
    _pip(python, "--no-build-isolation", "-e", source)
    # The dry run: the editable install finds the same files the wheel packages; that a
    # recipe trains from an install is the wheel test's.
    _check_installed(python, tmp_path, data_dir, expect_under=source, train=False)
