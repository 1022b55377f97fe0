"""The train-step benchmark (`python -m disco_jax.bench`): records, files, TensorFlow blocked,
bad arguments, and the peer plumbing (with a fake peer; tests/test_bench_peers.py runs the real
PyTorch ones). Smoke-suite cases only, 1-2 timed steps: fields and consistency, never speed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import pytest

from disco_jax.bench import __main__ as bench
from disco_jax.bench import cases, report
from tests.helpers import ROOT

# --------------------------------------------------------------------------- a fake peer


@dataclasses.dataclass
class FakeSpec:  # the contract of disco_jax.bench.peers.PeerSpec
    case: str
    config: object
    student_vars: dict
    teacher_vars: dict | None
    extra: dict
    inputs: dict
    labels: object
    lr: float
    batch: int
    image_size: int


def seed_loss_of(spec: FakeSpec) -> float:
    """SEED's step-1 loss recomputed from the spec alone (its weights, extra state and
    normalised inputs): what a correct peer computes, so the spec is the JAX step's."""
    import jax
    import jax.numpy as jnp

    from disco_jax import losses, methods, models
    from disco_jax.methods.common import train_forward

    cfg = spec.config
    student = methods.get(cfg.method).build_student(cfg, jnp.float32)
    teacher = models.build_encoder(cfg.teacher, jnp.float32)
    x = jnp.asarray(spec.inputs["image"])

    @jax.jit
    def loss(sv, tv, queue, x):
        s, _ = train_forward(student, sv, x, 1)
        t = teacher.apply(tv, x, train=False)
        return losses.seed_loss(s["embedding"], t["embedding"], queue, cfg.loss.student_temp,
                                cfg.loss.teacher_temp)

    return float(loss(spec.student_vars, spec.teacher_vars, spec.extra["queue"]["feats"], x))


def fake_peers(calls: list) -> types.ModuleType:
    """p0 returns the recomputed loss (agrees), p1 1 % more (must be flagged)."""
    module = types.ModuleType("disco_jax.bench.peers")
    losses: list[float] = []

    def run_peer(spec, style, *, steps, warmup, backend):
        calls.append((spec, style, steps, warmup, backend))
        if not losses:
            losses.append(seed_loss_of(spec))  # one compile for both styles
        loss = losses[0] * (1.0 if style == "p0" else 1.01)
        return {"case": spec.case, "loss_step1": loss, "step_ms_median": 10.0,
                "step_ms_p90": 11.0,
                "compile_s": 0.5, "peak_mem_bytes": 123, "dtype": "float32",
                "img_per_sec": spec.batch / 0.01}

    module.PeerSpec, module.run_peer = FakeSpec, run_peer
    return module


@pytest.mark.slow
def test_smoke_case_in_process_with_fake_peers(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setitem(sys.modules, "disco_jax.bench.peers", fake_peers(calls))
    out = tmp_path / "out"
    records = bench.main(["--suite", "smoke", "--out", str(out), "--cases", "seed_r50_r18",
                          "--steps", "2", "--warmup", "0", "--in-process", "--peers"])
    parts = [(r["part"], r["impl"]) for r in records]
    assert parts == [("step", "jax"), ("teacher_fwd", "jax"), ("student_step", "jax"),
                     ("loss", "jax"), ("step", "torch_p0"), ("step", "torch_p1")]
    for r in records:
        assert not report.missing_fields(r), (r["part"], r["impl"], report.missing_fields(r))
        assert r["case"] == "seed_r50_r18" and r["batch"] == 16 and r["image_size"] == 32
        assert r["steps"] == 2 and r["num_devices"] == 1
        assert r["img_per_sec"] > 0 and r["step_ms_p90"] >= r["step_ms_median"] > 0
    jax_recs = {r["part"]: r for r in records if r["impl"] == "jax"}
    step = jax_recs["step"]
    assert step["dtype"] == "float32" and step["mfu"] is None  # CPU: no peak, no MFU
    assert step["flops_per_img_table"] is None  # the analytic table is for 224 px
    assert step["flops_per_img"] > jax_recs["student_step"]["flops_per_img"] > 0
    assert step["peak_mem_bytes"] > 0 and step["compile_s"] > 0
    assert math.isfinite(step["loss_step1"]) and jax_recs["teacher_fwd"]["loss_step1"] is None
    # The peers got the state before the donation, the steps asked for, and the lr of step 0.
    assert [c[1:] for c in calls] == [("p0", 2, 0, "inductor"), ("p1", 2, 0, "inductor")]
    spec = calls[0][0]
    # SEED warms up from base_lr (0.03), whatever the batch.
    assert spec.case == "seed" and spec.batch == 16 and spec.lr == pytest.approx(0.03)
    assert set(spec.extra) == {"queue"} and spec.inputs["image"].dtype.name == "float32"
    p0, p1 = records[4], records[5]
    assert p0["loss_agrees"] and p0["loss_rel_diff"] < 1e-5  # the spec is the JAX step's
    assert not p1["loss_agrees"] and p1["loss_rel_diff"] == pytest.approx(0.01, rel=1e-3)
    assert p0["loss_jax"] == step["loss_step1"] and p0["dtype"] == "float32"
    saved = json.loads((out / "bench.json").read_text())
    assert saved["records"] == records and saved["machine"]["suite"] == "smoke"
    md = (out / "bench.md").read_text()
    assert "| seed_r50_r18 | step | torch_p1 |" in md and "**NO**" in md
    assert "jax/p0" in md and "seed_r50_r18 torch_p1" in md  # ratios, disagreement listed
    assert "| seed_r50_r18 | loss | jax |" in capsys.readouterr().out  # the table, printed


# TensorFlow (and TFDS) unimportable in the benchmark and in every worker it starts.
SITECUSTOMIZE = """
import sys
sys.modules["tensorflow"] = None
sys.modules["tensorflow_datasets"] = None
"""


@pytest.mark.slow
def test_smoke_suite_with_real_peers_runs_with_tensorflow_blocked(tmp_path):
    """The command of the issue's smoke suite, reduced to one case's step: JAX and both real
    PyTorch peer styles, in a worker process where TensorFlow cannot be imported."""
    pytest.importorskip("torch")  # a test dependency (requirements-dev.txt)
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), ROOT])}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "disco_jax.bench", "--suite", "smoke", "--out", str(out),
         # The step of the in-process test: its compile is in the persistent cache.
         "--cases", "seed_r50_r18", "--parts", "step", "--steps", "1", "--warmup", "0",
         # p1's torch.compile traces the step; inductor's C++ code generation would take
         # minutes on a 2-core CPU, so the test compiles with aot_eager.
         "--peers", "--peer-backend", "aot_eager"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "bench.json").read_text())
    rec, p0, p1 = saved["records"]
    assert (rec["case"], rec["part"], rec["impl"]) == ("seed_r50_r18", "step", "jax")
    assert [p0["impl"], p1["impl"]] == ["torch_p0", "torch_p1"]
    for r in (rec, p0, p1):
        assert not report.missing_fields(r), (r["impl"], report.missing_fields(r))
        assert r["case"] == "seed_r50_r18"
    assert math.isfinite(rec["loss_step1"])
    for peer in (p0, p1):  # the same loss at step 1 on the same weights and inputs
        assert peer["loss_jax"] == rec["loss_step1"] and peer["loss_agrees"], peer
        assert abs(peer["loss_step1"] / rec["loss_step1"] - 1) <= 1e-3
    assert p1["compiled"] and p1["channels_last"], p1.get("compile_error")
    assert saved["machine"]["tensorflow_imported"] is False
    assert saved["machine"]["failures"] == []
    assert (out / "bench.md").exists() and (out / "cases" / "seed_r50_r18.json").exists()
    assert "ETA" in proc.stderr or "done" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--suite", "nope"], "unknown suite 'nope'"),
    (["--suite", "smoke", "--cases", "seed_r50_r18,nope"], "unknown case 'nope'"),
    (["--suite", "smoke", "--parts", "everything"], "unknown part 'everything'"),
    (["--suite", "smoke", "--steps", "0"], "--steps must be >= 1"),
    (["--suite", "smoke", "--steps", "x"], "invalid int value"),
])
def test_bad_arguments_are_one_error_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main([*argv, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written


def test_paper_configs_have_the_benchmark_overrides_and_perf_md_flops():
    disco = cases.bench_config("disco_r50_effb0", "paper")
    assert (disco.batch_size, disco.data.image_size, disco.dtype) == (256, 224, "bfloat16")
    assert disco.loss.bn_group_size == 0 and disco.loss.key_bn == "global"
    assert disco.teacher.init == "random" and disco.variant == "benchmark"
    seed = cases.bench_config("seed_r50_effb0", "paper")
    assert seed.student.model_kwargs["dropout"] == 0.0
    assert seed.student.model_kwargs["stochastic_depth_prob"] == 0.0
    # perf.md §1.2: SEED R50 -> EffB0 10.6, DisCo R50 -> EffB0 21.8 GFLOP per source image.
    assert cases.table_gflop("seed_r50_effb0", "step", seed) == pytest.approx(10.6, abs=0.06)
    assert cases.table_gflop("disco_r50_effb0", "step", disco) == pytest.approx(21.8, abs=0.06)
    mbv3 = cases.bench_config("seed_r50_mbv3", "paper")
    assert cases.table_gflop("seed_r50_mbv3", "step", mbv3) == pytest.approx(9.52, abs=0.06)
    smoke = cases.bench_config("seed_r50_effb0", "smoke")
    assert (smoke.batch_size, smoke.data.image_size, smoke.dtype) == (16, 32, "float32")
    assert cases.table_gflop("seed_r50_effb0", "step", smoke) is None


def test_loss_agreement_and_ratios():
    assert report.loss_agreement(2.0, 2.0015) == (pytest.approx(7.5e-4), True)
    assert report.loss_agreement(2.0, 2.01)[1] is False
    assert report.loss_agreement(2.0, float("nan")) == (None, False)
    assert report.loss_agreement(None, 1.0) == (None, False)
    recs = [{"case": "c", "part": "step", "impl": "jax", "img_per_sec": 300.0},
            {"case": "c", "part": "step", "impl": "torch_p0", "img_per_sec": 100.0},
            {"case": "c", "part": "step", "impl": "torch_p1", "img_per_sec": 200.0},
            {"case": "c", "part": "loss", "impl": "jax", "img_per_sec": 1e6}]
    assert report.ratios(recs) == {"c": {"jax/p0": 3.0, "jax/p1": 1.5}}
