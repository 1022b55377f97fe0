"""Every method's train step at step level (tests/step_util.py: the step `train.run` jits, on
synthetic batches, with no tf.data, orbax or evaluation). Two steps of each method's smoke
recipe train, repeat bitwise, the loss is the sum of its logged terms, and what a method's step
must do beyond that holds (`EXTRA_CHECKS`: queue pointers, the momentum encoder, the signs and
bounds of loss terms); on 1 device, but DisCo's on 8 (`QUICK_DEVICES`: sharded queue, shuffle-BN
and the momentum encoder, so the quick tier runs the sharding paths too). The quick tier runs
this for one case of each distillation method (`QUICK_CASES`); the other forms and the teachers'
methods (SEED's small crops, MCL's MoCo and memory-bank forms, L-MCL's memory-bank form, MoCo v2,
BYOL, SimCLR, KD, supervised) in the full run only.
Slow: the same two steps on 8 devices equal two steps on 1 device up to this CPU's float32
noise, measured in the same test: step 1 and the state after it in full, step 2's losses and
queues (`STEP2_GRADIENT_DERIVED`).

The noise sample: the same two steps with every batch's rows reordered within their BN groups
(`helpers.group_permutation`; shuffle-BN's own permutation composed with the inverse, so the
key encoder sees the same groups), on 1 and on 8 devices. That is the same math with the
float32 sums over each group in another order. Both samples are needed: the 8-device program
is the more sensitive one (seen for disco_r18: params 2.6e-6 relative between the 8-device
runs, 2.5e-8 between the 1-device runs, 1.6e-6 for 8 vs 1), and a bug in the 8-device program
is in its permuted run too, so it cannot widen the bound. A sharding bug moves far more: BN
groups of one device's 2 rows instead of 4 moved the parameters by 1.7e-3 and the BN statistics
by 1.9e-2 (tried); unaveraged gradients or a queue written per device, more still. What the
step-2 gradient makes is not compared: one SGD step through BN groups of tiny maps turns 1e-6
parameter noise into ~1e-2 of its norm (seen for SEED multi-crop and L-MCL), while the losses
stay within ~1e-4; a sharding bug shows at step 1 already, or, for a queue read, in step 2's
loss.

Augmentation is off (its per-example keys follow the row position) and the students have no
dropout, so nothing random follows the row position. MCL's and L-MCL's memory-bank forms draw
their negatives per row position, so a reordering is not the same math there: those forms
(`BANK_CASES`) are compared 8 vs 1 device within a bound of float32 roundings instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax import methods
from disco_jax.methods import common
from tests import step_util
from tests.helpers import (
    TINY_NET,
    TINY_NET_4_STAGES,
    group_permutation,
    load_config,
    override,
    slow_where,
    tiny_nets,
)

B = 16  # every smoke recipe's global batch
# (recipe, overrides, what its loss is made of: the logged terms that sum to `loss`, with
# their weights). One case per method, plus the forms that change the step (SEED's small crops,
# MCL's in-batch and MoCo forms). `supervised` (how an SSLD teacher is made) has no recipe of its
# own: SSLD's distillation stage with the method swapped (`step_config`).
CASES = {
    "seed": ("seed_r18.py:smoke", {}, None),
    "seed_multicrop": ("seed_multicrop_effb0.py:smoke", {}, {"seed_main": 1.0,
                                                             "seed_small": 1.0}),
    "disco": ("disco_r18.py:smoke", {}, {"contrastive": 1.0, "distill_q": 1 / 8,
                                          "distill_k": 1 / 8}),
    "moco_v2": ("moco_v2_r50.py:smoke", {}, None),
    "kd": ("kd_r18.py:smoke,kind=logits", {}, {"kd": 1.0, "ce": 1.0}),
    "mcl_in_batch": ("mcl_cifar_resnet32x2.py:smoke", {}, None),
    "mcl_moco": ("mcl_moco_r18x2.py:smoke", {}, None),
    "lmcl": ("lmcl_cifar_resnet32x2.py:smoke", {}, None),
    "mcl_bank": ("mcl_r18x2.py:smoke", {}, None),
    "lmcl_bank": ("lmcl_r34x2.py:smoke", {}, None),
    "byol": ("byol_r50.py:smoke", {}, None),
    "simclr": ("simclr_r50.py:smoke", {}, None),
    "ssld": ("ssld_mbv3.py:smoke", {}, None),
    "supervised": ("ssld_mbv3.py:smoke", {}, None),
}


def _flat(tree) -> np.ndarray:
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.ravel(x) for x in leaves]).astype(np.float64)


def _check_disco(rows, state):
    for r in rows:  # each distillation term is a sum over the batch of 2 - 2 cos, in (0, 4B]
        assert 0 < r["distill_q"] <= 4 * B and 0 < r["distill_k"] <= 4 * B
    assert int(state["queue"]["ptr"]) == 2 * B  # two steps of the student's keys
    # The momentum (key) encoder moved towards the query encoder, and is not equal to it.
    ema, cur = _flat(state["ema"]["params"]), _flat(state["params"])
    assert 0 < np.abs(ema - cur).max()


def _check_seed_multicrop(rows, state):
    assert int(state["queue_small"]["ptr"]) == int(state["queue"]["ptr"]) == 2 * B


def _check_kd(rows, state):
    assert all(r["kd"] > 0 and r["ce"] > 0 for r in rows)


def _lmcl_stages(n: int):
    """L-MCL's cohort on an n-stage network: each of its 2 networks has an auxiliary branch on
    every stage but the last, each with its own embedding head (`aux_heads_i`)."""
    def check(rows, state):
        for k in range(2):
            heads = sorted(h for h in state["params"][f"net_{k}"] if h.startswith("aux_heads"))
            assert heads == [f"aux_heads_{i}" for i in range(n - 1)]
    return check


# What a method's step must do beyond the common checks.
EXTRA_CHECKS = {"disco": _check_disco, "seed_multicrop": _check_seed_multicrop, "kd": _check_kd,
                "lmcl": _lmcl_stages(3), "lmcl_bank": _lmcl_stages(4)}


# The stand-in network of a case: `helpers.TINY_NET` (3 stages), but a 4-stage one for L-MCL's
# ImageNet form, as its recipe's ResNet-34: 4 heads and 3 auxiliary branches per network,
# against the CIFAR form's 3 and 2 (`EXTRA_CHECKS`).
STAND_INS = {"lmcl_bank": TINY_NET_4_STAGES}


def step_config(name: str):
    spec, overrides, _ = CASES[name]
    cfg = load_config(spec)
    if "stages" in cfg:  # ssld: its distillation stage
        cfg = cfg.stages[cfg.stage_order[0]]
    override(cfg, **overrides)
    if name == "supervised":
        cfg.method, cfg.loss = "supervised", methods.loss_defaults("supervised")
        cfg.teacher.init = ""
    # The method's math is under test here, not the network: every student and the ResNet
    # teachers are a tiny ResNet (`STAND_INS`).
    tiny_nets(cfg, tiny=STAND_INS.get(name, TINY_NET))
    if cfg.get("student", {}).get("init"):
        cfg.student.init = ""  # ssld's finetune-from path: a fresh student here
    for key in ("jitter_p", "gray_p", "blur_p", "solarize_p"):
        cfg.augment[key] = 0.0
    cfg.augment.view2 = {k: 0.0 for k in cfg.augment.view2}
    return cfg


class Runs:
    """The four runs of a case: 8 and 1 devices, each also with the batch rows reordered by
    `perm`. A permuted run reuses its device count's compiled step unless the step uses
    shuffle-BN (`loss.key_bn="shuffle"`, the only caller of `common.shuffle_permutation`),
    whose permutation a permuted run must compose with perm^-1 (a new trace)."""

    def __init__(self, cfg, perm: np.ndarray, monkeypatch):
        self.cfg, self.perm, self.monkeypatch = cfg.copy_and_resolve_references(), perm, monkeypatch
        self.shuffles = cfg.loss.get("key_bn") == "shuffle"
        self.steppers: dict = {}

    def _stepper(self, devices: int, permuted: bool):
        key = (devices, permuted and self.shuffles)
        if key not in self.steppers:
            first = next(iter(self.steppers.values())).first if self.steppers else None
            self.steppers[key] = step_util.build(self.cfg.copy_and_resolve_references(), devices,
                                                 first)
        return self.steppers[key]

    def run(self, devices: int, permuted: bool = False) -> tuple[list, list]:
        stepper = self._stepper(devices, permuted)
        with self.monkeypatch.context() as m:
            if permuted:
                shuffle, inverse = common.shuffle_permutation, jnp.asarray(np.argsort(self.perm))
                m.setattr(common, "shuffle_permutation", lambda rng, n: inverse[shuffle(rng, n)])
            return stepper.run(self._batches(stepper, permuted))

    def _batches(self, stepper, permuted: bool) -> list[dict]:
        batches = [stepper.batch(seed) for seed in (1, 2)]
        if permuted:
            batches = [{k: v[self.perm] for k, v in b.items()} for b in batches]
        return batches


def _queue_rows(state: dict, name: str, perm: np.ndarray | None) -> np.ndarray:
    """A queue's rows in the unpermuted batch order: each block of B rows enqueued by one step
    of a permuted run is put back in order (the rows not yet written are the initial ones)."""
    feats = np.asarray(state[name]["feats"], np.float64)
    if perm is None:
        return feats
    n, unperm, ptr = len(perm), np.argsort(perm), int(state[name]["ptr"])
    return np.concatenate([feats[i:i + n][unperm] if i + n <= ptr else feats[i:i + n]
                           for i in range(0, len(feats), n)])


# The quick test's device count: 1 (an 8-device program compiles ~1.4x longer on 2 cores, measured
# for L-MCL and DisCo), but 8 for DisCo. Every case runs on 8 devices in the slow 8-vs-1 tests.
QUICK_DEVICES = {"disco": 8}


# The quick tier's cases: one per distillation method. Each other case is a form of one of these
# (the same module, another option) or a teacher's method; their eight tests took 128 s of the
# quick tier's time summed over both workers (2 cores, cold cache, a run of 8 min 4 s).
QUICK_CASES = ("seed", "disco", "mcl_in_batch", "lmcl", "ssld")


@pytest.mark.parametrize("name", slow_where(CASES, lambda n: n not in QUICK_CASES))
def test_two_steps_train_repeat_bitwise_and_the_loss_is_its_terms(name, monkeypatch):
    """Two steps on `QUICK_DEVICES` devices: finite, the step counter moved, the loss is the
    sum of its logged terms, the method's own checks hold, and a second run from the same state
    on the same batches gives bitwise the same metrics and state."""
    cfg = step_config(name)
    assert cfg.batch_size == B
    runs = Runs(cfg, group_permutation(cfg), monkeypatch)
    devices = QUICK_DEVICES.get(name, 1)
    rows, states = runs.run(devices)
    rows_again, states_again = runs.run(devices)
    assert rows_again == rows
    jax.tree_util.tree_map(np.testing.assert_array_equal, states_again, states)
    state = states[-1]
    assert int(state["step"]) == 2
    assert all(np.isfinite(r["loss"]) and r["finite"] == 1.0 for r in rows)
    terms = CASES[name][2]
    if terms is not None:  # the loss is the weighted sum of the logged terms
        for r in rows:
            np.testing.assert_allclose(r["loss"], sum(w * r[k] for k, w in terms.items()),
                                       rtol=1e-5)
    if name in EXTRA_CHECKS:
        EXTRA_CHECKS[name](rows, state)
    for key in state:
        if key.startswith("queue") and "ptr" in state[key]:
            assert int(state[key]["ptr"]) > 0


# Logged at step 2 but not compared there: what the step-2 gradient makes. It is not continuous
# in the step-1 parameters (a ReLU or max whose input crosses a kink switches a whole upstream
# gradient on or off), so float32 noise after step 1 can move it by far more than the noise:
# L-MCL's ResNet-32 pair, seen here, step-2 grad_norm 8 vs 1 device 1.7e-2 apart with the
# losses 2e-6 apart and the reordered runs 1.1e-3 and 2.2e-4 apart. Step 1 starts every run from
# the same state, so its gradient is compared in full (metrics, parameters, optimizer state).
STEP2_GRADIENT_DERIVED = ("grad_norm", "update_norm", "param_norm")


BANK_CASES = ("mcl_bank", "lmcl_bank")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CASES if n not in BANK_CASES])
def test_8_devices_equal_1_device(name, monkeypatch):
    """Every logged scalar of step 1 and the whole state after it (parameters, BN statistics,
    optimizer state, momentum encoder, queues), then step 2's losses and queues (a queue read
    sharded wrongly shows in the step-2 loss): 8 devices against 1, within 10x the noise
    samples' distance."""
    cfg = step_config(name)
    perm = group_permutation(cfg)
    assert not np.array_equal(perm, np.arange(len(perm)))
    runs = Runs(cfg, perm, monkeypatch)
    a, b = runs.run(8), runs.run(1)
    p1, p8 = runs.run(1, permuted=True), runs.run(8, permuted=True)
    (rows_a, states_a), (rows_b, states_b) = a, b
    (rows_p, states_p), (rows_q, states_q) = p1, p8
    assert [int(s[-1]["step"]) for s in (states_a, states_b)] == [2, 2]

    eps = float(np.finfo(np.float32).eps)
    # Logged scalars: within 10x the larger noise sample + 1000 float32 roundings of the value
    # (the worst case of a sum of ~1e3 terms, should both samples agree bitwise).
    for i in range(2):
        for key in rows_a[i]:
            if i == 1 and key in STEP2_GRADIENT_DERIVED:
                continue
            va, vb, vp, vq = (float(r[i][key]) for r in (rows_a, rows_b, rows_p, rows_q))
            tol = 10 * max(abs(vp - vb), abs(vq - va)) + 1e3 * eps * abs(vb)
            assert abs(va - vb) <= tol, (f"{name} step {i + 1} {key}: 8 devices {va}, 1 device"
                                         f" {vb}, noise samples {vp - vb:.2e}, {vq - va:.2e}")
    # The state after step 1 (momentum: the gradients), and the queues after both steps (rows
    # in the unpermuted batch order): within 10x the larger noise distance (+ one rounding).
    first = [s[0] for s in (states_a, states_b, states_p, states_q)]
    last = [s[-1] for s in (states_a, states_b, states_p, states_q)]
    arrays = {f"{key} after step 1": [_flat(s[key]) for s in first]
              for key in ("params", "batch_stats", "opt_state", "ema") if key in first[0]}
    for step, states in ((1, first), (2, last)):
        for key in states[0]:
            if key.startswith("queue") and "ptr" in states[0][key]:
                assert int(states[0][key]["ptr"]) == int(states[1][key]["ptr"]) > 0
                arrays[f"{key} after step {step}"] = [
                    _queue_rows(s, key, p) for s, p in
                    zip(states, (None, None, perm, perm), strict=True)]
    for key, (fa, fb, fp, fq) in arrays.items():
        ref = np.linalg.norm(fb)
        noise = max(np.linalg.norm(fp - fb), np.linalg.norm(fq - fa)) + eps * ref
        diff = np.linalg.norm(fa - fb)
        assert diff <= 10 * noise, (f"{name} {key}: 8 vs 1 device {diff / ref:.2e} relative L2,"
                                    f" reordered-group noise {noise / ref:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("name", BANK_CASES)
def test_memory_bank_forms_8_devices_equal_1_device(name, monkeypatch):
    """The memory-bank forms (global BN, global banks, negatives drawn per row position from
    the step's key): every logged scalar of step 1, step 2's but what its gradient makes, and
    the bank rows written by step 1,
    8 devices against 1, within 1000 float32 roundings (the sums here have ~1e3 terms). A bank
    read or written per device, or BN over one device's rows, is far outside that."""
    cfg = step_config(name)
    assert cfg.loss.form == "memory_bank"
    runs = Runs(cfg, group_permutation(cfg), monkeypatch)
    (rows_a, states_a), (rows_b, states_b) = runs.run(8), runs.run(1)
    tol = 1e3 * float(np.finfo(np.float32).eps)
    for i in range(2):
        for key in rows_a[i]:
            if i == 1 and key in STEP2_GRADIENT_DERIVED:
                continue
            np.testing.assert_allclose(rows_a[i][key], rows_b[i][key], rtol=tol, atol=tol,
                                       err_msg=f"{name} step {i + 1} {key}")
    banks = [k for k in states_a[0] if k.startswith("queue_bank")]
    assert banks
    for key in banks:  # unit rows (momentum-mixed embeddings): an absolute bound
        np.testing.assert_allclose(states_a[0][key]["feats"], states_b[0][key]["feats"],
                                   rtol=0, atol=tol, err_msg=key)
