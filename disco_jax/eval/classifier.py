"""`classifier`: top-1 / top-5 of the network's own classifier on the test split.

For supervised, SSLD and KD-with-logits runs (PaddleClas / torchvision report this: Resize 256,
centre crop 224) and for an MCL cohort, whose code tests every network and reports the best
(winycg/MCL `main_cifar.py`, `main_imagenet.py`): `net{i}_top1` / `net{i}_top5` for each
network, `top1` / `top5` of the best one (by top-1, the official "max over the networks"), and
`ensemble_top1` (mean of the networks' softmax, which MCL also logs). The official CIFAR code
keeps the epoch with the best test accuracy; that model selection on the test set is not done.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from disco_jax.errors import ConfigError
from disco_jax.eval import common

VERSION = 1
DEFAULTS = {"test_limit": 0}


def validate(cfg: Any, env: Any, where: str) -> None:
    if not env.has_classifier:
        raise ConfigError(f"{where}: the network has no classifier (num_classes is 0); use"
                          " knn / linear evaluators, or remove the entry")
    _, test = common.splits(cfg, env)
    common.get_source(cfg, env, (test,))


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def cohort_metrics(logits_nets: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-network top-1/5, the best network's, and the softmax ensemble's top-1."""
    out: dict[str, float] = {}
    per = [common.topk_accuracy(lg, labels) for lg in logits_nets]
    for i, m in enumerate(per):
        out[f"net{i}_top1"], out[f"net{i}_top5"] = m["top1"], m["top5"]
    best = int(np.argmax([m["top1"] for m in per]))
    out["top1"], out["top5"], out["best_net"] = per[best]["top1"], per[best]["top5"], best
    ens = np.mean([_softmax(lg.astype(np.float64)) for lg in logits_nets], axis=0)
    out["ensemble_top1"] = common.topk_accuracy(ens, labels, (1,))["top1"]
    return out


class Evaluator(common.Evaluator):
    NEEDS_TRAIN = False

    def run(self, model: common.Model) -> dict[str, float]:
        probe = model.predict(_probe_batch(model, self.size))
        key = "logits_nets" if "logits_nets" in probe else "logits"
        if key not in probe:
            raise ConfigError("evaluator 'classifier': the model gives no logits")
        out = common.extract(model, self.source, self.test_split, size=self.size,
                             batch_size=self.env.batch_size, keys=(key,),
                             limit=self.cfg.test_limit)
        if key == "logits_nets":
            return cohort_metrics(out[key], out["label"])
        return common.topk_accuracy(out[key], out["label"])


def _probe_batch(model: common.Model, size: int) -> Any:
    import jax
    import jax.numpy as jnp

    n = model.mesh.devices.size
    sh = jax.sharding.NamedSharding(model.mesh, jax.sharding.PartitionSpec("data"))
    return jax.device_put(jnp.zeros((n, size, size, 3), jnp.uint8), sh)
