"""The trainer end to end on the embedded digits data: sharding, determinism, resume, configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from disco_jax import checkpoint, config_lib, data, methods, train
from tests.helpers import (
    group_permutation,
    load_config,
    override,
    permute_batches,
    read_metrics,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, data_dir):
    """A tiny MoCo-v2 teacher: configs/moco_v2_r50.py:smoke with a small ResNet-18."""
    cfg = load_config("moco_v2_r50.py:smoke", data_dir)
    workdir = str(tmp_path_factory.mktemp("teacher"))
    res = train.run(cfg, workdir)
    assert res["step"] == cfg.total_steps
    return os.path.join(workdir, "encoder")


def seed_config(data_dir, **overrides):
    cfg = load_config("seed_mbv3.py:smoke", data_dir)  # its own untrained teacher, no flag
    cfg.total_steps = 4
    cfg.checkpoint_every_steps = 2
    cfg.log_every_steps = 1
    cfg.eval.enabled = False
    return override(cfg, **overrides)


def final_state(workdir):
    mngr = checkpoint.manager(workdir, keep=5, every_steps=1)
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    mngr.close()
    return step, jax.tree_util.tree_map(np.asarray, dict(restored["state"]))


def test_moco_v2_smoke_config_trains_checkpoints_and_evaluates(teacher_dir):
    workdir = os.path.dirname(teacher_dir)
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert 0 <= results["knn_top1"] <= 100 and 0 <= results["linear_top1"] <= 100
    manifest = json.load(open(os.path.join(teacher_dir, "manifest.json")))
    assert manifest["model"] == "resnet50" and len(manifest["fingerprint"]) == 64
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["method"] == "moco_v2"
    rows = read_metrics(workdir)
    assert {"step", "loss", "lr", "grad_norm", "param_norm"} <= set(rows[0])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))  # orbax steps present
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)]).astype(
        np.float64)


def test_moco_v2_8_devices_equals_1_device(tmp_path, data_dir, monkeypatch):
    """Step 1 of moco_v2_r50:smoke on 8 and on 1 device, against float32 noise of this CPU.

    Not bitwise: the 8-device step sums BN statistics and gradients in another order, and this
    smoke ResNet-50 normalises tiny maps over 16 images, whose BN backward cancels, so the
    gradient is only good to ~1e-3 relative whatever the device count. The tolerance is measured
    in this run, never copied: a third run repeats the 1-device step with the batch rows
    reordered within their BN groups (the recipe's shuffle-BN over 2 groups of 8 here, its
    shuffle composed with the reordering: `helpers.permute_batches`), which leaves the step's
    math unchanged (the same BN groups, batch-mean loss and gradients; augmentation off, as its
    per-example keys follow the batch position) and only reorders the float32 sums. Its
    distance from the 1-device run is this CPU's reduction-order noise; the 8-device run must
    lie within 10x that: two reorderings of the same sums differ on the same scale (ratios of
    such distances of 1.0-3 seen here and in test_multihost), 10 leaves room. A sharding bug
    moves far more: unaveraged gradients scale them by 8, and BN groups that follow the devices
    (tried before the groups were fixed in size) moved the loss by 3.5e-2 and the gradient by
    80%, while the tolerances it met were 6e-4 and 2%.
    """
    runs = {}
    for name, n, permuted in (("8", 8, False), ("1", 1, False), ("1p", 1, True)):
        cfg = load_config("moco_v2_r50.py:smoke", data_dir)
        assert cfg.loss.key_bn == "shuffle" and cfg.batch_size // cfg.loss.bn_group_size == 2
        cfg.mesh.num_devices, cfg.eval.enabled = n, False
        cfg.log_every_steps, cfg.stop_at_step = 1, 1
        cfg.augment.jitter_p = cfg.augment.gray_p = cfg.augment.blur_p = 0.0
        perm = group_permutation(cfg) if permuted else None
        with monkeypatch.context() as m:
            if permuted:
                permute_batches(m, perm)
            train.run(cfg, str(tmp_path / name))
        row = read_metrics(str(tmp_path / name))[0]
        step, state = final_state(str(tmp_path / name))
        assert row["step"] == step == 1
        # Queue rows [0, B) hold the step's keys (unit rows), in the batch order of that run.
        keys = state["queue"]["feats"][: cfg.batch_size].astype(np.float64)
        runs[name] = {
            "loss": row["loss"], "grad_norm": row["grad_norm"],
            # After one SGD step the momentum buffer is the gradient (+ weight decay x the
            # initial parameters, identical in all runs): the whole backward pass.
            "grad": _flat(state["opt_state"]),
            "stats": _flat([state["batch_stats"], state["ema"]["batch_stats"]]),  # forward
            "keys": keys if perm is None else keys[np.argsort(perm)],
        }
    a, b, p = runs["8"], runs["1"], runs["1p"]
    eps = float(np.finfo(np.float32).eps)  # + one float32 rounding per entry, should noise be 0
    noise = {}
    for key in ("grad", "stats", "keys"):
        ref = np.linalg.norm(b[key])
        noise[key] = np.linalg.norm(p[key] - b[key]) + eps * ref
        diff = np.linalg.norm(a[key] - b[key])
        assert diff <= 10 * noise[key], (
            f"{key}: 8 vs 1 device {diff / ref:.2e} relative L2, permuted-batch noise"
            f" {noise[key] / ref:.2e}")
    # |grad_norm_8 - grad_norm_1| <= |grad_8 - grad_1| (triangle inequality): the same bound.
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 10 * noise["grad"]
    # The loss is a scalar: one noise sample of it says little. Its noise is bounded by that
    # of the embeddings it is computed from: each row's InfoNCE term has a logit gradient of L1
    # norm <= 2 and logits q.c / tau of unit rows, so |dL| <= (2 / tau) mean_i(|dq_i| + |dk_i|);
    # the query rows come from the same encoder on the other view, so take |dq_i| ~ |dk_i|,
    # with a factor 2 for that; the loss's own noise sample (x10, as above) if it is larger.
    tau = cfg.loss.temp
    row_noise = np.linalg.norm(p["keys"] - b["keys"], axis=1).mean() + eps
    loss_tol = max(10 * abs(p["loss"] - b["loss"]), 2 * (4 / tau) * row_noise)
    assert abs(a["loss"] - b["loss"]) <= loss_tol, (a["loss"], b["loss"], loss_tol)


def _recording(stream, calls: list):
    """`train.train_stream`, unchanged, noting its arguments in `calls`."""

    def train_stream(*args, **kwargs):
        calls.append((args, kwargs))
        return stream(*args, **kwargs)

    return train_stream


def test_seed_8_devices_equals_1_device_and_is_deterministic(tmp_path, data_dir, monkeypatch):
    """seed_mbv3:smoke, 3 steps: bitwise deterministic on 8 devices, and 8 devices == 1 device
    up to float32 noise of this CPU, measured in this run as in test_moco_v2_8_devices_equals_1_
    device: a fourth run repeats the 1-device one with every batch's rows reordered within the
    student's BN groups (2 groups of 8; augmentation off in all runs, as its per-example keys
    follow the batch position; augmented runs are compared across device counts in
    test_multihost), the same math with the float32 sums of the group BN and batch-mean
    gradients in another order; the 8-device run must lie within 10x its
    distance from the 1-device run (+ one float32 rounding per entry). Seen here (the smoke
    variant's untrained teacher): 1.1x (params), 1.5x (BN statistics), 1.0x (momentum), losses
    5e-7 vs noise 2e-6, queue 0.7x.
    A sharding bug moves far more (tried, when the recipe still used global BN): BN groups of
    one device's 2 images moved the step-1 loss by 4e-3 against a tolerance of 3e-5, and the
    parameters by orders of magnitude more than theirs; the queue's rows rolled by one device's
    2 rows lie 0.55 relative L2 from the float64 reference, the teacher run with per-device
    train-mode BN 0.53, against a tolerance of 2e-5.
    """
    assert jax.device_count() == 8
    stream, calls = train.train_stream, []
    runs = {}
    for name, n, record in [("a8", 8, False), ("b1", 1, True), ("c8", 8, False), ("p1", 1, False)]:
        cfg = seed_config(data_dir, total_steps=3, **{"mesh.num_devices": n})
        cfg.augment.jitter_p = cfg.augment.gray_p = cfg.augment.blur_p = 0.0
        # The recipe's head dropout draws its mask by row position, as augmentation does.
        cfg.student.head_input = "features"
        perm = group_permutation(cfg)  # rows reordered within the student's 2 BN groups of 8
        with monkeypatch.context() as m:
            if record:
                m.setattr(train, "train_stream", _recording(stream, calls))
            if name == "p1":
                permute_batches(m, perm)
            train.run(cfg, str(tmp_path / name))
        runs[name] = (read_metrics(str(tmp_path / name)), final_state(str(tmp_path / name))[1])
    monkeypatch.setattr(train, "train_stream", stream)
    # The queue was trained and checkpointed sharded P("data", None): 8 rows of 64 per device.
    meta = ocp.StandardCheckpointer().metadata(str(tmp_path / "a8" / "checkpoints" / "3" / "state"))
    feats = meta.item_metadata["queue"]["feats"]
    assert tuple(feats.sharding.partition_spec) == ("data", None)
    assert tuple(feats.storage.chunk_shape) == (8, 128)
    assert "teacher" not in meta.item_metadata  # the frozen teacher is not re-saved
    loss = {k: np.array([r["loss"] for r in v[0]]) for k, v in runs.items()}
    assert len(loss["a8"]) == 3
    # Determinism: the same seed gives the same loss curve and the same parameters, bitwise.
    np.testing.assert_array_equal(loss["a8"], loss["c8"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, runs["a8"][1], runs["c8"][1])

    # 8 devices == 1 device for the same global batch (global BN, global-FIFO queue). Not
    # bitwise: BN statistics and gradients are summed in another order, and this smoke student
    # normalises 1x1 maps over 16 images, whose BN backward cancels, so some gradients are only
    # good to ~1e-3 relative whatever the device count. The permuted run measures that noise.
    eps = float(np.finfo(np.float32).eps)  # + one float32 rounding per entry, should noise be 0
    a, b, p = (runs[k][1] for k in ("a8", "b1", "p1"))
    for key in ("params", "batch_stats", "opt_state"):
        fa, fb, fp = _flat(a[key]), _flat(b[key]), _flat(p[key])
        ref = np.linalg.norm(fb)
        noise = np.linalg.norm(fp - fb) + eps * ref
        diff = np.linalg.norm(fa - fb)
        assert diff <= 10 * noise, (f"{key}: 8 vs 1 device {diff / ref:.2e} relative L2,"
                                    f" permuted-batch noise {noise / ref:.2e}")
    # The losses are scalars (step 1 often agrees bitwise): the largest of their noise samples
    # over the 3 steps sets their scale, as in test_multihost.
    loss_noise = np.abs(loss["p1"] - loss["b1"]).max() + eps * np.abs(loss["b1"]).max()
    assert np.abs(loss["a8"] - loss["b1"]).max() <= 10 * loss_noise, loss
    # The queue holds the teacher's embeddings of the 3 batches (rows [0, 48)). The teacher runs
    # BN in inference mode: each row is computed alone, so permuting the batch leaves it
    # bitwise unchanged, while 2 images per device pick other kernels than 16 on one device.
    # Its noise is measured against a float64 forward of the same teacher on the same float32
    # inputs: the 8-device rows must be within 10x the 1-device rows' float32 error of it.
    assert int(a["queue"]["ptr"]) == int(b["queue"]["ptr"]) == 48
    ((args, kwargs),) = calls
    images = np.concatenate(
        [x["image"] for x in stream(*args, **kwargs).take(3).as_numpy_iterator()])
    x = np.asarray(data.mocov2_augment(jax.random.PRNGKey(0), images, **cfg.augment))
    # The run's teacher (teacher.init="random": rebuilt from the seed, bitwise the same).
    variables, manifest = train.random_teacher(cfg, methods.get("seed"), jnp.float32)
    with jax.enable_x64(True):
        teacher = methods.get("seed").build_teacher(manifest, jnp.float64)
        forward = jax.jit(lambda v, x: teacher.apply(v, x, train=False)["embedding"])
        t = forward(jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), variables),
                    x.astype(np.float64))
        assert t.dtype == jnp.float64
        t = np.asarray(t)
    q64 = t / np.linalg.norm(t, axis=1, keepdims=True)
    qa, qb = (r["queue"]["feats"][:48].astype(np.float64) for r in (a, b))
    ref = np.linalg.norm(q64)
    noise = np.linalg.norm(qb - q64) + eps * ref
    diff = np.linalg.norm(qa - q64)
    assert diff <= 10 * noise, (f"queue: 8 devices {diff / ref:.2e} relative L2 from float64, 1"
                                f" device {noise / ref:.2e}")


def test_resume_in_a_fresh_process_equals_straight_run(tmp_path, data_dir):
    straight = tmp_path / "straight"
    # The straight run is also the seed_mbv3:smoke end-to-end check (no teacher flag: its own
    # untrained teacher, which the CLI resume below rebuilds): the periodic online kNN
    # (an evaluator entry with its own interval), the final evaluators, eval.json, the plot.
    cfg = seed_config(data_dir)
    cfg.eval.enabled = True
    cfg.evals.knn_online.every_steps = 2
    results = train.run(cfg, str(straight))
    assert 0 <= results["knn_top1"] <= 100 and 0 <= results["linear_top1"] <= 100
    assert results["knn_top1"] == results["evals"]["knn/top1_k20"]
    assert {"knn/top5_k200", "linear_fast/top5", "agree/cos", "agree/queue_nn"} <= set(
        results["evals"])
    assert -1 <= results["evals"]["agree/cos"] <= 1
    rows = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    # Step 2 only: step 4 is the last, where the at_end evaluators run instead.
    assert [r["step"] for r in rows if "knn_online/top1" in r] == [2]
    assert [r["step"] for r in rows if "knn/top1" in r] == [4]
    names = [r["name"] for r in json.load(open(straight / "eval.json"))["records"]]
    assert sorted(names) == ["agree", "knn", "linear_fast"]
    assert os.path.getsize(straight / "plots" / "curves.png") > 1000
    assert json.load(open(straight / "results.json"))["step"] == 4
    resumed = tmp_path / "resumed"
    train.run(seed_config(data_dir, stop_at_step=2), str(resumed))
    assert final_state(str(resumed))[0] == 2
    cmd = [sys.executable, "-m", "disco_jax.main", f"--config={ROOT}/configs/seed_mbv3.py:smoke",
           f"--workdir={resumed}", f"--config.data.data_dir={data_dir}",
           "--config.total_steps=4", "--config.checkpoint_every_steps=2",
           "--config.log_every_steps=1",
           "--config.eval.enabled=False"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    step_a, a = final_state(str(straight))
    step_b, b = final_state(str(resumed))
    assert step_a == step_b == 4
    for key in ("params", "batch_stats", "queue", "opt_state", "rng"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, a[key], b[key])
    la = {r["step"]: r["loss"] for r in read_metrics(str(straight))}
    lb = {r["step"]: r["loss"] for r in read_metrics(str(resumed))}
    assert la == lb


def test_demo_smoke_runs_all_stages(tmp_path, data_dir):
    from disco_jax import main as main_mod

    cfg = load_config("demo.py:smoke", data_dir)
    cfg.seeds = (0, 1)  # two seeds (the demo runs 3): the rows are means over seed runs
    cfg.seeded = ("seed",)  # one seeded stage keeps the test cheap
    summary = main_mod.run_stages(cfg, str(tmp_path))
    stages = ["teacher", "baseline", "seed", "disco", "pixels", "random_init"]
    assert list(summary["stages"]) == stages
    table = json.load(open(tmp_path / "results.json"))
    rows = {r["stage"]: r for r in table["rows"]}
    assert list(rows) == stages
    for row in rows.values():
        assert 0 <= row["knn_top1"] <= 100 and 0 <= row["linear_top1"] <= 100
    # The seeded row: both runs in their own workdir, mean and sample std of their results.
    runs = [json.load(open(tmp_path / "seed" / f"seed{k}" / "results.json")) for k in (0, 1)]
    assert rows["seed"]["seeds"] == [0, 1]
    for m in ("knn_top1", "linear_top1"):
        values = np.array([r[m] for r in runs])
        np.testing.assert_allclose(rows["seed"][m], values.mean(), rtol=1e-12)
        np.testing.assert_allclose(rows["seed"][f"{m}_std"], values.std(ddof=1), rtol=1e-9,
                                   atol=1e-12)
    assert rows["teacher"]["seeds"] == [0] and rows["teacher"]["knn_top1_std"] == 0.0
    # Reference rows: evaluated, not trained; random_init is the teacher's network.
    assert rows["pixels"]["train_steps"] == rows["random_init"]["train_steps"] == 0
    assert rows["random_init"]["backbone"] == "resnet10" and rows["pixels"]["backbone"] == "-"
    assert os.path.exists(tmp_path / "pixels" / "eval.json")
    md = open(tmp_path / "results.md").read()
    assert "| seed | seed | resnet10 | 0.25 | resnet10 |" in md  # smoke: width 0.25
    assert "±" in md.split("| seed | seed |")[1].splitlines()[0]
    # The suite's compilation cache (JAX_COMPILATION_CACHE_DIR, conftest) is kept, not replaced.
    assert not (tmp_path / "compile_cache").exists()


def test_config_arg_parsing_is_typed():
    cfg = config_lib.parse_arg("smoke,epochs=3", smoke=False, epochs=30)
    assert cfg.smoke is True and cfg.epochs == 3


def test_queue_spec_rule():
    from disco_jax import sharding

    mesh = sharding.make_mesh(8)
    tree = {"queue": {"feats": np.zeros((16, 4)), "ptr": np.zeros(())}, "params": {"w": 1.0}}
    sh = sharding.tree_shardings(tree, mesh)
    assert sh["queue"]["feats"].spec == P("data", None)
    assert sh["queue"]["ptr"].spec == P() and sh["params"]["w"].spec == P()
