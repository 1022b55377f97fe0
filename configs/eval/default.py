"""The default evaluation of `python -m disco_jax.evaluate`: weighted kNN and the quick probe.

- `knn` (v1): weighted kNN, cosine similarity, T = 0.07, k = 10, 20, 100, 200 (top-1 and top-5
  each; `top1` / `top5` at k = 20). The InstDisc protocol (Wu et al. 2018) that SEED's table
  reports as "K" (SEED's repo ships no kNN script; k and T as commonly used, unverified).
- `linear_fast` (v1): a linear probe on cached centre-crop features (no augmentation, lr 0.1
  cosine, 100 epochs). A quick monitor, not a paper protocol: see configs/eval/linear.py.

    python -m disco_jax.evaluate --encoder runs/seed_mbv3/encoder --workdir runs/eval_seed \\
        --config configs/eval/default.py

Variants: `:smoke` (few probe epochs, small k; what the tests run).
"""

from disco_jax import config_lib
from disco_jax.eval import protocols


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False)
    c = protocols.eval_config()
    if args.smoke:
        c.evals.knn.ks = (1, 5, 20)
        c.evals.linear_fast.epochs = 5
        c.plot_points = 200
    return c
