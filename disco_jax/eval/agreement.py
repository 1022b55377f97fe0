"""`agreement`: how closely the student follows its teacher (a distillation monitor).

On a fixed subset of the test split, with both networks in inference mode:
- `cos`: mean cosine similarity of the student's and the teacher's embeddings of each image
  (when their widths match, as in SEED / DisCo / cosine KD);
- `queue_nn`: % of images whose nearest queue entry is the same for student and teacher (the
  quantity SEED's loss acts on: the student's similarity distribution over the queue);
- `sim_corr`: correlation of student-pair and teacher-pair cosine similarities over the images
  (how well the student reproduces the teacher's similarity structure; SEED's Fig. 1 idea).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from disco_jax.errors import ConfigError
from disco_jax.eval import common

VERSION = 1
DEFAULTS = {"test_limit": 1024}


def validate(cfg: Any, env: Any, where: str) -> None:
    if cfg.pred != "pair":
        raise ConfigError(f"{where}: the agreement monitor needs pred='pair'")
    if not env.has_teacher:
        raise ConfigError(f"{where}: the agreement monitor needs a run with a teacher")
    _, test = common.splits(cfg, env)
    common.get_source(cfg, env, (test,))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def agreement_metrics(student: np.ndarray, teacher: np.ndarray,
                      queue: np.ndarray | None = None) -> dict[str, float]:
    s, t = _unit(student), _unit(teacher)
    out: dict[str, float] = {}
    if s.shape[1] == t.shape[1]:
        out["cos"] = float(np.mean(np.sum(s * t, axis=1)))
    if queue is not None and queue.shape[1] == s.shape[1] == t.shape[1]:
        q = _unit(queue)
        out["queue_nn"] = float(100.0 * np.mean((s @ q.T).argmax(1) == (t @ q.T).argmax(1)))
    iu = np.triu_indices(len(s), 1)
    if len(iu[0]) > 1:
        out["sim_corr"] = float(np.corrcoef((s @ s.T)[iu], (t @ t.T)[iu])[0, 1])
    return out


class Evaluator(common.Evaluator):
    NEEDS_TRAIN = False

    def run(self, model: common.Model) -> dict[str, float]:
        out = common.extract(model, self.source, self.test_split, size=self.size,
                             batch_size=self.env.batch_size, keys=("student", "teacher"),
                             limit=self.cfg.test_limit, pair=True)
        # The trainer puts the method's queue (if any) next to the variables.
        queue = model.variables.get("queue") if isinstance(model.variables, dict) else None
        if queue is not None:
            from disco_jax import sharding

            queue = sharding.to_host(queue)
        return agreement_metrics(out["student"], out["teacher"], queue)
