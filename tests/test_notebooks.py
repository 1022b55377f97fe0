"""The Colab notebooks in notebooks/: each runs top to bottom on reduced settings, and each is
fit to commit (an "Open in Colab" badge of this repository, outputs cleared, an install cell
that does nothing where disco_jax is importable).

Execution: nbclient with `DISCO_JAX_NOTEBOOK_SMOKE=1` in the environment, which the kernel
(and the commands it starts) inherit with the rest of this process's environment: conftest's
8 fake CPU devices, the checkout on PYTHONPATH and the session's digits dataset as the TFDS
data dir. The kernel is this interpreter (the dev virtualenv's), through a `python3`
kernelspec put first on JUPYTER_PATH: a system-wide kernelspec of that name must not win.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # end to end: whole runs, subprocesses

# The GitHub organisation/repository every Colab badge and install line names.
REPO = "disco-jax/disco_jax"
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"
COLAB_LINK = re.compile(r"colab\.research\.google\.com/github/([^/\s)]+/[^/\s)]+)/blob/main/"
                        r"notebooks/([^\s)]+)")
NOTEBOOKS = ("quickstart", "evaluate_checkpoint", "python_api")
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
CELL_TIMEOUT_S = 1800  # the demo is one cell; a loaded 2-core machine is slow


def read(name: str):
    return nbformat.read(os.path.join(NOTEBOOK_DIR, f"{name}.ipynb"), as_version=4)


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}.ipynb"


# ---------------------------------------------------------------- the committed files


def test_every_notebook_is_tested():
    found = sorted(f[:-6] for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
    assert found == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_badge_cleared_outputs_and_install_cell(name):
    nb = read(name)
    nbformat.validate(nb)
    title = nb.cells[0]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    assert BADGE.format(url=colab_url(name)) in title.source
    assert "not public yet" in title.source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    install = next(c for c in nb.cells if c.cell_type == "code").source
    # Installs only where the import fails, and never a second TensorFlow (see the notebooks).
    assert "try:\n    import disco_jax" in install and "except ImportError:" in install
    assert "--no-deps" in install and f"git+https://github.com/{REPO}" in install
    assert any('os.environ.get("DISCO_JAX_NOTEBOOK_SMOKE")' in c.source for c in nb.cells)


def test_every_colab_link_names_this_repository_and_an_existing_notebook():
    texts = [open(os.path.join(ROOT, "README.md")).read()]
    texts += [json.dumps(read(name)) for name in NOTEBOOKS]
    links = [m for text in texts for m in COLAB_LINK.findall(text)]
    assert len(links) >= len(NOTEBOOKS)
    for repo, path in links:
        assert repo == REPO
        assert os.path.isfile(os.path.join(NOTEBOOK_DIR, path)), path


# ---------------------------------------------------------------- execution


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory) -> str:
    """A directory holding a `python3` kernelspec that runs this interpreter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps(
        {"argv": argv, "display_name": "Python 3 (disco_jax tests)", "language": "python"}))
    return str(root)


def execute(name: str, tmp_path, monkeypatch, jupyter_path: str, data_dir: str):
    """Runs notebooks/NAME.ipynb in tmp_path; fails with the notebook's output on any error."""
    monkeypatch.setenv("DISCO_JAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)  # the session's digits: nothing is rebuilt
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable
    nb = read(name)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        # A failed `!command` shows up in a later cell: its output is what explains it.
        pytest.fail(f"{name} failed:\n{e}\n--- notebook output (tail) ---\n{text(nb)[-6000:]}")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    return nb


def text(nb) -> str:
    """Every text output of the executed notebook (streams, text/plain, text/markdown)."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
            elif "data" in o:
                out += [v for k, v in o.data.items() if k in ("text/plain", "text/markdown")]
    return "\n".join(out)


def png_outputs(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_quickstart_runs(tmp_path, monkeypatch, jupyter_path, data_dir):
    """The quickstart runs `demo:smoke` through the CLI: every stage, the table, the plots. This
    is the suite's one run of the demo (each stage's method is tested on its own elsewhere)."""
    nb = execute("quickstart", tmp_path, monkeypatch, jupyter_path, data_dir)
    out = text(nb)
    # The results table, as displayed from results.md: every stage and reference row.
    assert "| stage | method | backbone | width | teacher | knn_top1 | linear_top1 |" in out
    for row in ("| teacher | moco_v2 |", "| baseline | moco_v2 |", "| seed | seed |",
                "| disco | disco |", "| pixels | pixels |", "| random_init | random_init |"):
        assert row in out, row
    assert "| seed | seed | resnet10 | 0.25 | resnet10 |" in out  # the smoke variant ran
    workdir = tmp_path / "runs" / "demo"
    rows = {r["stage"]: r for r in json.load(open(workdir / "results.json"))["rows"]}
    assert list(rows) == ["teacher", "baseline", "seed", "disco", "pixels", "random_init"]
    assert all(0 <= r["knn_top1"] <= 100 and 0 <= r["linear_top1"] <= 100
               for r in rows.values())
    # The student rows ran in DIR/<stage>/seed0 (one seed in smoke; several seeds' means and
    # stds: tests/test_train.py::test_run_stages_runs_each_seed_in_its_own_dir_and_averages).
    for stage in ("baseline", "seed", "disco"):
        assert rows[stage]["seeds"] == [0]
        assert os.path.exists(workdir / stage / "seed0" / "results.json"), stage
    assert rows["teacher"]["seeds"] == [0] and rows["teacher"]["knn_top1_std"] == 0.0
    # Reference rows: evaluated, not trained; random_init is the teacher's network.
    assert rows["pixels"]["train_steps"] == rows["random_init"]["train_steps"] == 0
    assert rows["random_init"]["backbone"] == "resnet10" and rows["pixels"]["backbone"] == "-"
    assert os.path.exists(workdir / "pixels" / "eval.json")
    # The suite's compilation cache (JAX_COMPILATION_CACHE_DIR, conftest; inherited by the
    # kernel and the command) is used, not replaced by one in the workdir.
    assert not (workdir / "compile_cache").exists()
    assert png_outputs(nb) == 3  # the curves of the teacher, SEED and DisCo runs


def test_evaluate_checkpoint_runs(tmp_path, monkeypatch, jupyter_path, data_dir):
    nb = execute("evaluate_checkpoint", tmp_path, monkeypatch, jupyter_path, data_dir)
    out = tmp_path / "runs" / "eval_resnet18"
    doc = json.load(open(out / "eval.json"))
    assert doc["model"] == "resnet18" and doc["data"]["image_size"] == 16
    assert {r["name"] for r in doc["records"]} == {"knn", "linear_fast"}
    printed = dict(re.findall(r"^(knn|linear_fast)\s+top-1\s+([\d.]+) %", text(nb), re.M))
    assert set(printed) == {"knn", "linear_fast"}
    assert all(0 <= float(v) <= 100 for v in printed.values())
    assert os.path.getsize(out / "plots" / "tsne.png") > 1000
    assert png_outputs(nb) == 1


def test_python_api_runs(tmp_path, monkeypatch, jupyter_path, data_dir):
    nb = execute("python_api", tmp_path, monkeypatch, jupyter_path, data_dir)
    out = text(nb)
    assert "resnet18: 11,689,512 parameters" in out  # torchvision's count
    # The queue: 64 unit rows of 128; the first batch replaced rows 0..15 and moved the pointer.
    assert "queue: (64, 128) pointer 0 -> 16" in out
    replaced = re.search(r"rows replaced by this batch's teacher embeddings: \[([\d\s]+)\]", out)
    assert replaced and [int(i) for i in replaced.group(1).split()] == list(range(16))
    assert "rows still unit length: True" in out
    losses = [float(v) for v in re.findall(r"^loss\s+(\S+)$", out, re.M)]
    assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0
    assert re.search(r"^step 2: loss \S+, queue pointer 32$", out, re.M)
