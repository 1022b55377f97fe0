"""Every method's train step at step level (tests/step_util.py: the step `train.run` jits, on
synthetic batches, with no tf.data, orbax or evaluation): two steps of each method's smoke
recipe on 8 devices equal two steps on 1 device up to this CPU's float32 noise, measured in the
same test, and each method's loss is the sum of its logged terms.

The noise sample (as tests/test_methods_disco.py `assert_same_training` explains): the same two
steps with every batch's rows reordered within their BN groups, on 1 and on 8 devices. That is
the same math with the float32 sums over each group in another order. Augmentation is off (its
per-example keys follow the row position) and the students have no dropout, so nothing random
follows the row position. MCL's and L-MCL's memory-bank forms draw their negatives per row
position, so a reordering is not the same math there: those forms are compared across device
counts end to end (tests/test_methods_mcl.py, slow).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax.methods import common
from tests import step_util
from tests.helpers import group_permutation, load_config, override

R18 = {"student.model": "resnet18", "student.model_kwargs": {"width": 0.25, "stem": "cifar"}}

# (recipe, overrides, what its loss is made of: the logged terms that sum to `loss`, with
# their weights). One case per method, plus the forms that change the step (SEED's small crops,
# MCL's in-batch and MoCo forms).
CASES = {
    "seed": ("seed_r18.py:smoke", {}, None),
    "seed_multicrop": ("seed_multicrop_effb0.py:smoke", R18, {"seed_main": 1.0,
                                                              "seed_small": 1.0}),
    "disco": ("disco_r18.py:smoke", {}, {"contrastive": 1.0, "distill_q": 1 / 8,
                                          "distill_k": 1 / 8}),
    "moco_v2": ("moco_v2_r50.py:smoke", R18, None),
    "kd": ("kd_r18.py:smoke,kind=logits", {}, {"kd": 1.0, "ce": 1.0}),
    "mcl_in_batch": ("mcl_cifar_resnet32x2.py:smoke", {}, None),
    "mcl_moco": ("mcl_moco_r18x2.py:smoke", {}, None),
    "lmcl": ("lmcl_cifar_resnet32x2.py:smoke", {}, None),
    "byol": ("byol_r50.py:smoke", {}, None),
    "simclr": ("simclr_r50.py:smoke", {}, None),
    "ssld": ("ssld_mbv3.py:smoke", {}, None),
}


def step_config(name: str):
    spec, overrides, _ = CASES[name]
    cfg = load_config(spec)
    if "stages" in cfg:  # ssld: its distillation stage
        cfg = cfg.stages[cfg.stage_order[0]]
    override(cfg, **overrides)
    if cfg.get("student", {}).get("init"):
        cfg.student.init = ""  # ssld's finetune-from path: a fresh student here
    for key in ("jitter_p", "gray_p", "blur_p", "solarize_p"):
        cfg.augment[key] = 0.0
    cfg.augment.view2 = {k: 0.0 for k in cfg.augment.view2}
    return cfg


def run_steps(cfg, devices: int, perm: np.ndarray | None, monkeypatch) -> tuple[list, dict]:
    """Two steps on `devices` devices; with `perm`, every batch's rows reordered by it and
    shuffle-BN's permutation composed with its inverse (as tests/helpers.permute_batches)."""
    stepper = step_util.build(cfg.copy_and_resolve_references(), devices)
    batches = [stepper.batch(seed) for seed in (1, 2)]
    with monkeypatch.context() as m:
        if perm is not None:
            batches = [{k: v[perm] for k, v in b.items()} for b in batches]
            shuffle, inverse = common.shuffle_permutation, jnp.asarray(np.argsort(perm))
            m.setattr(common, "shuffle_permutation", lambda rng, n: inverse[shuffle(rng, n)])
        return stepper.run(batches)


def _flat(tree) -> np.ndarray:
    import jax

    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.ravel(x) for x in leaves]).astype(np.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_8_devices_equal_1_device_and_the_loss_is_its_terms(name, monkeypatch):
    cfg = step_config(name)
    perm = group_permutation(cfg)
    assert not np.array_equal(perm, np.arange(len(perm)))
    a, b = (run_steps(cfg, n, None, monkeypatch) for n in (8, 1))
    p1, p8 = (run_steps(cfg, n, perm, monkeypatch) for n in (1, 8))
    (rows_a, state_a), (rows_b, state_b) = a, b
    (rows_p, state_p), (rows_q, state_q) = p1, p8

    # Each step trained: finite, the step counter moved, the parameters changed.
    assert [int(s["step"]) for s in (state_a, state_b)] == [2, 2]
    for rows in (rows_a, rows_b):
        assert all(np.isfinite(r["loss"]) and r["finite"] == 1.0 for r in rows)
    terms = CASES[name][2]
    if terms is not None:  # the loss is the weighted sum of the logged terms
        for r in rows_a:
            np.testing.assert_allclose(r["loss"], sum(w * r[k] for k, w in terms.items()),
                                       rtol=1e-5)

    eps = float(np.finfo(np.float32).eps)
    # Logged scalars: within 10x the larger noise sample + 1000 float32 roundings of the value
    # (the worst case of a sum of ~1e3 terms, should both samples agree bitwise).
    for i in range(2):
        for key in rows_a[i]:
            va, vb, vp, vq = (float(r[i][key]) for r in (rows_a, rows_b, rows_p, rows_q))
            tol = 10 * max(abs(vp - vb), abs(vq - va)) + 1e3 * eps * abs(vb)
            assert abs(va - vb) <= tol, (f"{name} step {i + 1} {key}: 8 devices {va}, 1 device"
                                         f" {vb}, noise samples {vp - vb:.2e}, {vq - va:.2e}")
    # Parameters and BN statistics: within 10x the larger noise distance (+ one rounding each).
    # Queues and banks hold rows in batch order: compared by the float32 noise of their norms.
    for key in ("params", "batch_stats"):
        fa, fb, fp, fq = (_flat(s[key]) for s in (state_a, state_b, state_p, state_q))
        ref = np.linalg.norm(fb)
        noise = max(np.linalg.norm(fp - fb), np.linalg.norm(fq - fa)) + eps * ref
        diff = np.linalg.norm(fa - fb)
        assert diff <= 10 * noise, (f"{name} {key}: 8 vs 1 device {diff / ref:.2e} relative L2,"
                                    f" reordered-group noise {noise / ref:.2e}")
    for key in state_a:
        if key.startswith("queue") and "ptr" in state_a[key]:
            assert int(state_a[key]["ptr"]) == int(state_b[key]["ptr"]) > 0
