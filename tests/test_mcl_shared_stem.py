"""MCL's shared-stem cohort (M >= 3, official ``ResNet_b``): param layout, equality with plain
networks built on the shared stem, refusals, and one training step."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from disco_jax import methods, models, train
from disco_jax.errors import ConfigError
from disco_jax.models.cohort import build_cohort, plain_encoder, plain_variables
from tests.helpers import load_config, random_variables, read_metrics

X = np.random.default_rng(1).normal(size=(4, 16, 16, 3)).astype(np.float32)


def _shapes(module):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), X, train=False))


def _keys(tree):
    return {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("model,kwargs,stem_stages", [
    ("resnet32", {"width": 0.25}, 1),
    ("resnet18", {"width": 0.125, "stem": "cifar"}, 2),
])
def test_one_stem_copy_and_m_branches_that_recombine_into_plain_encoders(model, kwargs,
                                                                         stem_stages):
    net = load_config("mcl_cifar_resnet32x2.py:smoke,m=3").student
    net.model, net.model_kwargs = model, kwargs
    cohort = build_cohort(net, 3, shared_stem=True)
    shapes = _shapes(cohort)
    params = shapes["params"]
    assert set(params) == {"stem", "net_0", "net_1", "net_2"}
    stem_layers = {"conv1", "bn1"} | {k for k in params["stem"]
                                      if k.startswith(("layer1_", "layer2_"))}
    assert set(params["stem"]) == stem_layers
    assert {k.split("_")[0] for k in params["stem"] if k.startswith("layer")} == {
        f"layer{s + 1}" for s in range(stem_stages)}
    plain = _shapes(models.build_encoder(net))
    for i in range(3):
        branch = params[f"net_{i}"]["backbone"]
        assert not set(branch) & set(params["stem"])  # the stem lives only once
        assert {"layer1_0", "conv1"}.isdisjoint(branch)
        # stem + branch i is exactly a plain encoder's layout (names and shapes).
        assert _keys(plain_variables(shapes, i)) == _keys(plain)
    assert _keys(plain_variables(_shapes(build_cohort(net, 3)), 1)) == \
        _keys(plain)  # the independent cohort's accessor is the plain net_i


def test_shared_stem_outputs_equal_plain_networks_on_the_shared_stem():
    net = load_config("mcl_cifar_resnet32x2.py:smoke,m=3").student
    cohort = build_cohort(net, 3, shared_stem=True)
    variables = random_variables(_shapes(cohort))
    for train_mode in (False, True):
        out, mut = cohort.apply(variables, X, train=train_mode, mutable=["batch_stats"])
        for i in range(3):
            ref, ref_mut = plain_encoder(cohort, i).apply(
                plain_variables(variables, i), X, train=train_mode, mutable=["batch_stats"])
            for key, name in (("embedding", "embedding"), ("logits", "logits"),
                              ("all_features", "features")):
                np.testing.assert_allclose(out[key][i], ref[name], rtol=1e-6, atol=1e-6)
            # The stem's BN statistics update once, as a plain network's would.
            stats = plain_variables({"params": variables["params"], **mut}, i)["batch_stats"]
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         stats, ref_mut["batch_stats"])
        assert not np.allclose(out["embedding"][0], out["embedding"][1])  # distinct branches


def test_refusals(data_dir):
    validate = methods.get("mcl").validate
    cfg = load_config("mcl_cifar_resnet32x2.py:smoke,m=3", data_dir)
    assert cfg.loss.shared_stem and cfg.loss.num_nets == 3
    validate(cfg)
    assert not load_config("mcl_cifar_resnet32x2.py:m=2").loss.shared_stem
    cfg.loss.num_nets = 2
    with pytest.raises(ConfigError, match="num_nets >= 3"):
        validate(cfg)
    cfg.loss.num_nets = 3
    cfg.student.model, cfg.student.model_kwargs = "wrn_16_2", {"width": 0.25}
    with pytest.raises(ConfigError, match="shared_stem"):
        validate(cfg)


@pytest.mark.slow
def test_one_training_step_with_shared_stem(tmp_path, data_dir):
    cfg = load_config("mcl_cifar_resnet32x2.py:smoke,m=3", data_dir)
    cfg.mesh.num_devices, cfg.eval.enabled = 1, False
    cfg.log_every_steps, cfg.stop_at_step = 1, 1
    train.run(cfg, str(tmp_path))
    (row,) = read_metrics(str(tmp_path))
    assert all(np.isfinite(row[k]) and row[k] > 0 for k in ("loss", "vcl", "icl", "soft_icl"))
