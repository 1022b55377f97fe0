"""Reference rows of a results table that train nothing: the raw pixels, and a network with
its random initial weights, evaluated by the same evaluators (`config.evals`, end-of-run
entries) as the trained rows, so a table shows what training added.

- "pixels": the normalised image, flattened, is the feature (kNN and the linear probe on the
  pixels themselves);
- "random_init": `config.student` initialised with `config.seed` and never trained (BN running
  statistics at their initial 0 / 1), its pooled backbone features.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

from disco_jax import data, jit_util, methods, models, sharding
from disco_jax import eval as evaluation
from disco_jax.errors import ConfigError, unknown_name

log = logging.getLogger("disco_jax")
KINDS = ("pixels", "random_init")


def _predict(kind: str, config: Any, dtype: Any) -> tuple[Any, dict]:
    stats = (tuple(config.data.mean), tuple(config.data.std))
    if kind == "pixels":
        def fn(v: dict, x: jax.Array) -> dict:
            x = data.normalize(x, jnp.float32, *stats)
            return {"features": x.reshape(x.shape[0], -1)}
        return fn, {}
    module = models.build_encoder(config.student, dtype)
    size = config.data.image_size
    variables = jit_util.run_once(
        lambda r: module.init(r, jnp.zeros((1, size, size, 3), dtype), train=False),
        jax.random.PRNGKey(config.seed))

    def fn(v: dict, x: jax.Array) -> dict:
        out = module.apply(v, data.normalize(x, dtype, *stats), train=False)
        return {k: out[k].astype(jnp.float32) for k in ("features", "embedding") if k in out}
    return fn, dict(variables)


def evaluate(kind: str, config: Any, workdir: str) -> dict:
    """Run `config`'s end-of-run evaluators on the `kind` reference; writes
    workdir/results.json and eval.json and returns the results (`knn_top1`, `linear_top1`)."""
    if kind not in KINDS:
        raise unknown_name("baseline", kind, KINDS)
    from disco_jax import train  # the trainer's eval facts, so the rows are evaluated alike

    method = methods.get(config.method)
    mesh = sharding.make_mesh(config.mesh.num_devices)
    env = train.eval_env(config, method, mesh, workdir)
    evals = {name: cfg for name, cfg in config.evals.items()
             if cfg.at_end and cfg.type in ("knn", "linear_fast")}
    if not evals:
        raise ConfigError(f"baseline {kind!r} needs a knn or linear_fast entry in config.evals")
    evaluation.validate(evals, env)
    fn, variables = _predict(kind, config, train.compute_dtype(config.dtype))
    model = evaluation.Model(fn=fn, variables=variables, mesh=mesh, step=0, tag=kind)
    suite = evaluation.Suite(evals, env)
    log.info("=== %s: %s", kind, ", ".join(evals))
    records = suite.run_all(model, list(evals))
    flat = evaluation.flat(records)
    results = {"step": 0, "method": kind, "evals": flat, **train.headline(flat)}
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        evaluation.records.write(workdir, records, {"model": kind, "data": config.data.name})
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results
