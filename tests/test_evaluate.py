"""`python -m disco_jax.evaluate`: a smoke run's encoder, a converted torchvision checkpoint,
a training workdir, and bad input (one line, OUT untouched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from disco_jax import evaluate, train
from disco_jax import main as _train_cli  # noqa: F401 -- both CLIs import in one process
from disco_jax.errors import ConfigError
from tests.helpers import ROOT, TINY_NET, load_config, override, tiny_nets

pytestmark = pytest.mark.slow  # end to end: whole runs, subprocesses


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    """A finished smoke run (MoCo-v2 on `TINY_NET`, 4 steps) and its encoder. The train step is
    tests/test_train.py's teacher's: one compile for both in the suite's cache."""
    cfg = tiny_nets(load_config("moco_v2_r50.py:smoke", data_dir))
    cfg.eval.enabled = False
    workdir = str(tmp_path_factory.mktemp("run") / "w")
    train.run(cfg, workdir)
    return workdir


def cli(*args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "disco_jax.evaluate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def records(out):
    doc = json.load(open(os.path.join(out, "eval.json")))
    return doc, {r["name"]: r for r in doc["records"]}


def test_cli_on_a_smoke_run_encoder_with_teacher(run_dir, data_dir, tmp_path):
    out = str(tmp_path / "out")
    enc = os.path.join(run_dir, "encoder")
    # --config comes before its --config.x overrides (ml_collections' rule).
    proc = cli(f"--config={ROOT}/configs/eval/default.py:smoke", f"--encoder={enc}",
               f"--workdir={out}", "--config.data.name=digits",
               f"--config.data.data_dir={data_dir}", f"--teacher={enc}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc, recs = records(out)
    assert set(recs) == {"knn", "linear_fast"}
    knn = recs["knn"]
    assert knn["evaluator"] == "knn" and knn["version"] == 1 and knn["settings"]["ks"] == [1, 5, 20]
    assert {f"top{t}_k{k}" for t in (1, 5) for k in (1, 5, 20)} <= set(knn["metrics"])
    assert 0 <= knn["metrics"]["top1"] <= knn["metrics"]["top5"] <= 100
    assert set(recs["linear_fast"]["metrics"]) == {"top1", "top5"}
    # The data and image size came from the run's manifest (digits at 16 px).
    assert doc["data"]["image_size"] == 16 and doc["step"] == 4
    assert "| knn | knn | 1 | top1 |" in open(os.path.join(out, "eval.md")).read()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    for png in ("tsne.png", "similarity.png"):
        assert os.path.getsize(os.path.join(out, "plots", png)) > 1000
    assert "| knn | knn | 1 | top1 |" in proc.stdout


def test_workdir_of_a_training_run_evaluates_its_encoder(run_dir, data_dir):
    config = load_config("eval/classifier.py:smoke")
    with config.unlocked():
        config.data.data_dir = data_dir
        del config.evals["classifier"]  # this run's network has no classifier
        config.plots = False
    prepared = evaluate.prepare(config, None, run_dir, None)
    assert prepared["out"] == run_dir
    assert prepared["manifest"]["path"] == os.path.join(run_dir, "encoder")
    evaluate.evaluate(config, prepared)
    _, recs = records(run_dir)
    assert set(recs) == {"knn"}


def test_converted_torchvision_resnet18(data_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from disco_jax.convert.__main__ import main as convert_main
    from tests.test_convert import BasicBlock, ResNet, randomize

    tmodel = randomize(ResNet(BasicBlock, (2, 2, 2, 2), 10, width=0.25, stem="cifar"), seed=5)
    path = str(tmp_path / "r18.pth")
    torch.save(tmodel.state_dict(), path)
    enc = str(tmp_path / "enc")
    assert convert_main(["torchvision", "resnet18", path, enc, "--model-kwarg", "width=0.25",
                         "--model-kwarg", "stem=cifar"]) == 0
    config = load_config("eval/default.py:smoke")
    out = str(tmp_path / "out")
    with config.unlocked():
        config.data.name, config.data.data_dir = "digits", data_dir
        config.data.image_size = 32  # the manifest records no data: 224 px would be slow here
    evaluate.evaluate(config, evaluate.prepare(config, enc, out, None))
    doc, recs = records(out)
    assert set(recs) == {"knn", "linear_fast"} and doc["model"] == "resnet18"
    assert 0 <= recs["knn"]["metrics"]["top1_k20"] <= 100
    assert os.path.exists(os.path.join(out, "plots", "tsne.png"))


def _bad(config_spec, data_dir, encoder, out, teacher=None, **fields):
    config = load_config(config_spec)
    with config.unlocked():
        config.data.data_dir = data_dir
        override(config, **fields)
    listing = lambda: sorted(os.walk(out)) if out else None  # noqa: E731
    before = listing()
    with pytest.raises(ConfigError) as e:
        evaluate.prepare(config, encoder, out, teacher)
    assert "\n" not in str(e.value)
    assert listing() == before  # nothing written
    return str(e.value)


def test_bad_input_is_one_line_and_writes_nothing(run_dir, data_dir, tmp_path):
    enc = os.path.join(run_dir, "encoder")
    out = str(tmp_path / "out")
    d = "eval/default.py:smoke"
    assert "does not exist" in _bad(d, data_dir, str(tmp_path / "nope"), out)
    os.makedirs(tmp_path / "empty")
    assert "not found" in _bad(d, data_dir, str(tmp_path / "empty"), out)
    garbage = tmp_path / "garbage"
    os.makedirs(garbage)
    (garbage / "manifest.json").write_text("{not json")
    assert "unreadable" in _bad(d, data_dir, str(garbage), out)
    unknown = tmp_path / "unknown_model"
    os.makedirs(unknown)
    manifest = json.load(open(os.path.join(enc, "manifest.json")))
    (unknown / "manifest.json").write_text(json.dumps({**manifest, "model": "resnet19"}))
    assert "unknown model 'resnet19'" in _bad(d, data_dir, str(unknown), out)
    truncated = tmp_path / "truncated"
    os.makedirs(truncated / "variables")
    (truncated / "manifest.json").write_text(json.dumps(manifest))
    assert "cannot read encoder weights" in _bad(d, data_dir, str(truncated), out)
    assert "give --encoder DIR --workdir OUT" in _bad(d, data_dir, None, None)
    assert "needs --workdir OUT" in _bad(d, data_dir, enc, None)
    os.makedirs(tmp_path / "other" / "checkpoints")
    assert "give only one of them" in _bad(d, data_dir, enc, str(tmp_path / "other"))
    assert "unknown evaluator 'nope'" in _bad(d, data_dir, enc, out, **{"evals.knn.type": "nope"})
    assert "temp must be positive" in _bad(d, data_dir, enc, out, **{"evals.knn.temp": -1.0})
    assert "positive integer, got 0" in _bad(d, data_dir, enc, out, **{"evals.knn.k": 0})
    assert "epochs must be a positive integer" in _bad(d, data_dir, enc, out,
                                                       **{"evals.linear_fast.epochs": 0})
    assert "needs split 'validation'" in _bad(d, data_dir, enc, out,
                                              **{"evals.knn.test_split": "validation"})
    assert "subset '5pct' does not exist" in _bad("eval/semi.py:smoke", data_dir, enc, out,
                                                   **{"evals.semi.subset": "5pct"})
    assert "records no dataset" in _bad(d, data_dir, str(_no_data_copy(enc, tmp_path)), out)


def _no_data_copy(enc, tmp_path):
    import shutil

    dst = tmp_path / "nodata"
    shutil.copytree(enc, dst)
    manifest = json.load(open(dst / "manifest.json"))
    del manifest["data"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_cli_bad_value_is_one_line_exit_2(run_dir, tmp_path):
    out = str(tmp_path / "out")
    proc = cli(f"--encoder={os.path.join(run_dir, 'encoder')}", f"--workdir={out}",
               "--config.evals.knn.temp=-1.0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: evals.knn.temp must be")
    assert "Traceback" not in proc.stderr and not os.path.exists(out)
    proc = cli("--encoder=/nonexistent", f"--workdir={out}", "--config.evals.knn.nope=1")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.fixture(scope="module")
def classifier_encoder(tmp_path_factory):
    """A saved random-init `TINY_NET` with a 10-way classifier, trained on nothing."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from disco_jax import checkpoint, models

    net = {**TINY_NET, "head": "identity", "head_hidden": 0, "embed_dim": 128, "num_classes": 10}
    module = models.build_encoder(net)
    variables = jax.jit(functools.partial(module.init, train=False))(
        jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))
    path = str(tmp_path_factory.mktemp("cls") / "enc")
    checkpoint.save_encoder(path, jax.tree_util.tree_map(np.asarray, dict(variables)),
                            {**net, "data": {"name": "digits", "image_size": 16}})
    return path


@pytest.mark.parametrize("spec, names", [
    ("eval/classifier.py:smoke", {"classifier", "knn"}),
    ("eval/linear.py:smoke", {"linear"}),
    ("eval/linear.py:smoke,preset=disco", {"linear"}),
    ("eval/semi.py:smoke", {"semi", "semi_ft"}),
    ("eval/transfer.py:smoke,data=FOLDER", {"transfer"}),
])
def test_eval_configs_reduced(classifier_encoder, data_dir, tmp_path, spec, names):
    from tests.test_evaluators import _write_folder

    if "FOLDER" in spec:
        _write_folder(tmp_path / "imgs")
        spec = spec.replace("FOLDER", f"folder:{tmp_path / 'imgs'}")
    config = load_config(spec)
    with config.unlocked():
        config.data.data_dir = data_dir
    out = str(tmp_path / "out")
    evaluate.evaluate(config, evaluate.prepare(config, classifier_encoder, out, None))
    doc, recs = records(out)
    assert set(recs) == names
    for rec in recs.values():
        assert 0 <= rec["metrics"]["top1"] <= rec["metrics"]["top5"] <= 100
    if "preset=disco" in spec:
        assert recs["linear"]["settings"]["gamma"] == 0.5
        assert "epochs" in recs["linear"]["deviations"]  # a reduced protocol says so


def test_data_defaults_take_the_encoders_normalisation_from_its_manifest():
    from disco_jax.eval import common, protocols

    cifar = ([0.507, 0.487, 0.441], [0.267, 0.256, 0.276])
    manifest = {"path": "enc", "data": {"name": "digits", "image_size": 16,
                                        "mean": cifar[0], "std": cifar[1]}}
    config = protocols.eval_config()
    evaluate._data_defaults(config, manifest)
    assert config.data.name == "digits" and config.data.image_size == 16
    assert common.norm_stats(config.data) == (tuple(cifar[0]), tuple(cifar[1]))
    # An older manifest without statistics: ImageNet's, as the encoder was trained with.
    config = protocols.eval_config()
    evaluate._data_defaults(config, {"path": "enc", "data": {"name": "digits"}})
    assert common.norm_stats(config.data) is None
