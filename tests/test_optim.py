"""Schedule and optimizer against transcriptions of the official PyTorch code."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax import optim
from disco_jax.errors import ConfigError


def official_seed_lr(epoch, *, lr, lr_mult, warmup_epochs, epochs):
    """jacobswan1/SEED tools/utils.py adjust_learning_rate, cos=True."""
    out = lr * lr_mult
    if epoch < warmup_epochs:
        return lr + (lr * lr_mult - lr) / warmup_epochs * epoch
    return out * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def test_epoch_schedule_matches_official_seed():
    steps_per_epoch, epochs, batch = 10, 20, 1024
    sched = optim.lr_schedule(base_lr=0.03, global_batch=batch, steps_per_epoch=steps_per_epoch,
                              total_steps=epochs * steps_per_epoch, warmup_epochs=5)
    for step in range(epochs * steps_per_epoch):
        want = official_seed_lr(step // steps_per_epoch, lr=0.03, lr_mult=batch / 256,
                                warmup_epochs=5, epochs=epochs)
        np.testing.assert_allclose(float(sched(jnp.asarray(step))), want, rtol=1e-5, atol=1e-8)


def test_step_granularity_is_smooth():
    sched = optim.lr_schedule(base_lr=0.1, global_batch=256, steps_per_epoch=10, total_steps=100,
                              granularity="step")
    assert float(sched(jnp.asarray(1))) < float(sched(jnp.asarray(0)))
    assert float(sched(jnp.asarray(1))) != float(sched(jnp.asarray(2)))


def test_sgd_matches_torch_semantics():
    """torch.optim.SGD(momentum=0.9, weight_decay=wd): d = g + wd*p; b = m*b + d; p -= lr*b."""
    lr, wd, m = 0.5, 0.1, 0.9
    tx = optim.make_optimizer({"name": "sgd", "weight_decay": wd, "momentum": m}, lambda s: lr)
    p = {"w": jnp.asarray([1.0, -2.0]), "b": jnp.asarray([0.5])}
    state = tx.init(p)
    p_ref = {k: np.asarray(v, np.float64) for k, v in p.items()}
    buf = {k: np.zeros_like(v) for k, v in p_ref.items()}
    for i in range(3):
        g = {"w": jnp.asarray([0.3 * (i + 1), -0.1]), "b": jnp.asarray([0.2])}
        upd, state = tx.update(g, state, p)
        p = {k: p[k] + upd[k] for k in p}
        for k in p_ref:
            d = np.asarray(g[k]) + wd * p_ref[k]
            buf[k] = m * buf[k] + d
            p_ref[k] = p_ref[k] - lr * buf[k]
    for k in p:
        np.testing.assert_allclose(np.asarray(p[k]), p_ref[k], rtol=1e-6)


def test_bad_optimizer_names():
    with pytest.raises(ConfigError, match="valid optimizers"):
        optim.make_optimizer({"name": "sgdd"}, lambda s: 0.1)
    with pytest.raises(ConfigError, match="valid lr decays"):
        optim.lr_schedule(base_lr=0.1, global_batch=256, steps_per_epoch=1, total_steps=1,
                          decay="linear")


def test_lars_skips_bn_and_bias_in_trust_ratio_and_weight_decay_with_kernels_mask():
    """SimCLR/BYOL LARS: kernels get wd + trust-ratio scaling; BN scales and biases get plain
    momentum SGD (no wd, no adaptation)."""
    params = {"conv": {"kernel": jnp.full((3, 3), 2.0)},
              "bn": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)}}
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), params)
    lr, wd = 0.1, 0.01
    for mask in ("kernels", "all"):
        cfg = {"name": "lars", "weight_decay": wd, "weight_decay_mask": mask, "momentum": 0.9}
        tx = optim.make_optimizer(cfg, lambda step: lr)
        upd, _ = tx.update(grads, tx.init(params), params)
        # Non-kernels: -lr * (g [+ wd * w when the wd mask is "all"]), no trust ratio.
        g_bn = 0.5 + (wd * 2.0 if mask == "all" else 0.0)
        np.testing.assert_allclose(np.asarray(upd["bn"]["scale"]), -lr * g_bn, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(upd["bn"]["bias"]), -lr * g_bn, rtol=1e-6)
        # Kernel: g + wd * w, scaled by 1e-3 * ||w|| / ||g + wd w|| (eeta 1e-3).
        g = np.full((3, 3), 0.5 + wd * 2.0)
        trust = 1e-3 * np.linalg.norm(np.full((3, 3), 2.0)) / np.linalg.norm(g)
        np.testing.assert_allclose(np.asarray(upd["conv"]["kernel"]), -lr * trust * g, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Warm-up from 0 and cosine after the warm-up, against the official formulas (float64)


def official_paddle_cosine_warmup(step, *, lr, step_each_epoch, epochs, warmup_epoch=5):
    """PaddleClas 2.0 `CosineWarmup`: LinearWarmup(start_lr=0, end_lr=lr) over
    warmup_epoch * step_each_epoch steps, then CosineAnnealingDecay(lr,
    T_max=step_each_epoch * (epochs - warmup_epoch)) stepped from 0 (eta_min 0)."""
    warmup_steps = warmup_epoch * step_each_epoch
    if step < warmup_steps:
        return 0.0 + (lr - 0.0) * step / warmup_steps
    t_max = step_each_epoch * (epochs - warmup_epoch)
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / t_max))


def official_simclr(step, *, base_lr, batch, num_examples, warmup_epochs, train_epochs):
    """google-research/simclr `WarmUpAndCosineDecay` (learning_rate_scaling="linear")."""
    warmup_steps = int(round(warmup_epochs * num_examples // batch))
    scaled_lr = base_lr * batch / 256.0
    lr = step / float(warmup_steps) * scaled_lr if warmup_steps else scaled_lr
    total_steps = num_examples * train_epochs // batch + 1  # get_train_steps
    decay_steps = total_steps - warmup_steps
    cosine = scaled_lr * 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, decay_steps)
                                             / decay_steps))
    return lr if step < warmup_steps else cosine


def official_byol(step, *, base_lr, batch, total_steps, warmup_steps):
    """deepmind-research/byol `schedules.learning_schedule`."""
    scaled_lr = base_lr * batch / 256.0
    lr = step / warmup_steps * scaled_lr if warmup_steps > 0 else scaled_lr
    t = min(step - warmup_steps, total_steps - warmup_steps)
    cosine = scaled_lr * 0.5 * (1 + math.cos(math.pi * t / (total_steps - warmup_steps)))
    return lr if step < warmup_steps else cosine


def _schedule_for(config_name: str, *, steps_per_epoch: int, total_steps: int = 0):
    """(stage config, schedule) of every stage of a recipe, its optimizer block through
    `lr_schedule` as the trainer builds it; total_steps 0: the stage's own epochs."""
    from tests.helpers import load_config

    cfg = load_config(config_name)
    stages = [cfg.stages[s] for s in cfg.stage_order] if "stages" in cfg else [cfg]
    out = []
    for c in stages:
        optim.validate(c.optimizer)
        out.append((c, optim.lr_schedule(
            global_batch=c.batch_size, steps_per_epoch=steps_per_epoch,
            total_steps=total_steps or c.total_epochs * steps_per_epoch,
            **optim.schedule_options(c.optimizer))))
    return out


def _all_steps(sched, n: int) -> np.ndarray:
    return np.asarray(jax.jit(sched)(jnp.arange(n)), np.float64)


def _assert_lr_close(got, want, lr_max):
    # float32 against float64: ~1e-7 relative per op; near the end of the cosine
    # (1 + cos ~ 0) the error is absolute, a few float32 ulps of lr_max.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * lr_max)


def test_ssld_recipe_schedule_is_paddleclas_cosine_warmup():
    # Both stages (distill 360 epochs, fine-tune 30): the SSLD docs' "cosine_decay_warmup".
    spe = 7
    stages = _schedule_for("ssld_mbv3.py", steps_per_epoch=spe)
    assert [c.total_epochs for c, _ in stages] == [360, 30]
    for cfg, sched in stages:
        lr = cfg.optimizer.base_lr * cfg.batch_size / 256  # the docs' total lr
        n = cfg.total_epochs * spe
        want = [official_paddle_cosine_warmup(s, lr=lr, step_each_epoch=spe,
                                              epochs=cfg.total_epochs) for s in range(n)]
        got = _all_steps(sched, n)
        _assert_lr_close(got, want, lr)
        assert got[0] == 0.0 and got[5 * spe] == pytest.approx(lr, rel=1e-6)


def test_simclr_recipe_schedule_is_warmup_and_cosine_decay():
    batch, spe, epochs = 4096, 10, 100
    num_examples = batch * spe
    total = num_examples * epochs // batch + 1  # SimCLR's own run length
    [(cfg, sched)] = _schedule_for("simclr_r50.py", steps_per_epoch=spe, total_steps=total)
    assert cfg.batch_size == batch
    want = [official_simclr(s, base_lr=0.3, batch=batch, num_examples=num_examples,
                            warmup_epochs=10, train_epochs=epochs) for s in range(total)]
    _assert_lr_close(_all_steps(sched, total), want, 0.3 * batch / 256)


def test_byol_recipe_schedule_is_learning_schedule():
    batch, spe, epochs = 4096, 10, 300
    total = epochs * spe
    [(cfg, sched)] = _schedule_for("byol_r50.py", steps_per_epoch=spe, total_steps=total)
    want = [official_byol(s, base_lr=cfg.optimizer.base_lr, batch=batch, total_steps=total,
                          warmup_steps=10 * spe) for s in range(total)]
    _assert_lr_close(_all_steps(sched, total), want, cfg.optimizer.base_lr * batch / 256)


def test_warmup_from_zero_and_cosine_after_warmup_each_alone():
    # Per-epoch granularity too: SEED's formula with the warm-up from 0, cosine over all epochs.
    spe, epochs, batch = 4, 20, 512
    sched = optim.lr_schedule(base_lr=0.05, global_batch=batch, steps_per_epoch=spe,
                              total_steps=epochs * spe, warmup_epochs=5, warmup_from="zero")
    lr_max = 0.05 * batch / 256
    for step in range(epochs * spe):
        e = step // spe
        want = (lr_max * e / 5 if e < 5
                else lr_max * 0.5 * (1 + math.cos(math.pi * e / epochs)))
        np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5, atol=1e-8)
    sched = optim.lr_schedule(base_lr=0.05, global_batch=batch, steps_per_epoch=spe,
                              total_steps=epochs * spe, warmup_epochs=5, cosine_after_warmup=True)
    for step in range(epochs * spe):
        e = step // spe
        want = (0.05 + (lr_max - 0.05) * e / 5 if e < 5
                else lr_max * 0.5 * (1 + math.cos(math.pi * (e - 5) / (epochs - 5))))
        np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5, atol=1e-8)


def test_schedule_options_are_validated():
    base = {"name": "sgd", "base_lr": 0.1, "warmup_epochs": 5.0, "decay": "cosine"}
    optim.validate(base)
    for extra, match in (({"warmup_from": "one"}, "warmup_from"),
                         ({"cosine_after_warmup": 1}, "cosine_after_warmup"),
                         ({"cosine_after_warmup": True, "decay": "step"}, "decay='cosine'"),
                         ({"granularity": "batch"}, "granularity")):
        with pytest.raises(ConfigError, match=match):
            optim.validate({**base, **extra})
    with pytest.raises(ConfigError, match="no epochs for the cosine"):
        optim.lr_schedule(base_lr=0.1, global_batch=256, steps_per_epoch=10, total_steps=50,
                          warmup_epochs=5, cosine_after_warmup=True)
