"""The evaluation blocks recipes and `python -m disco_jax.evaluate` start from.

`get_config(arg)` is the default config of `python -m disco_jax.evaluate` (weighted kNN with
the k sweep and the cached-feature probe); the files in `configs/eval/` build the paper
protocols from the same blocks. Every block is versioned by its evaluator's `VERSION`.
"""

from __future__ import annotations

import ml_collections as mlc

from disco_jax.eval import block


def final_evals() -> mlc.ConfigDict:
    """What every training run evaluates at its end: kNN (k sweep) and the quick probe."""
    return mlc.ConfigDict({"knn": block("knn"), "linear_fast": block("linear_fast")})


def online_knn(every_epochs: float = 10.0, train_limit: int = 10_000,
               test_limit: int = 5_000) -> mlc.ConfigDict:
    """The periodic kNN monitor of a training run: a fixed train subset as the bank."""
    return block("knn", every_epochs=every_epochs, at_end=False, ks=(20,), k=20,
                 train_limit=train_limit, test_limit=test_limit)


def agreement(every_epochs: float = 10.0) -> mlc.ConfigDict:
    """Student-teacher agreement (distillation methods), periodic and at the end."""
    return block("agreement", pred="pair", every_epochs=every_epochs)


def eval_config(evals: mlc.ConfigDict | None = None) -> mlc.ConfigDict:
    """A config for `python -m disco_jax.evaluate`: data, evaluators, devices."""
    c = mlc.ConfigDict()
    c.data = mlc.ConfigDict({
        "name": "",  # '': the dataset the encoder's manifest records
        "data_dir": mlc.config_dict.placeholder(str),
        "train_split": "train",
        "eval_split": "test",  # imagenet2012: validation (set automatically)
        "image_size": -1,  # -1: the manifest's training size, else 224
        "bad_images": "error",
    })
    c.evals = evals if evals is not None else final_evals()
    c.seed = 0
    c.batch_size = 256  # feature extraction, global
    c.dtype = "auto"
    c.mesh = mlc.ConfigDict({"num_devices": -1})
    c.plots = True  # t-SNE of test embeddings (and, with --teacher, the similarity figure)
    c.plot_points = 2000
    return c


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """Default: `knn` (k = 10, 20, 100, 200, top-1 and top-5) and `linear_fast`."""
    del arg
    return eval_config()
