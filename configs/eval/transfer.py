"""Transfer: linear evaluation on another dataset (the SimCLR / BYOL protocol).

L2-regularised logistic regression on the frozen backbone's features of the other dataset,
the regularisation chosen among 45 log-spaced values in [1e-6, 1e5] on its validation split
(or 20 % of its train split held out), refit on train + validation, top-1 / top-5 on test.
BYOL's Table 3 / SimCLR's Table 8 linear-evaluation columns (CIFAR-10/100, ...); DisCo reports
CIFAR transfer with its own probe (`cifar_main_lincls.py`) instead.

    python -m disco_jax.evaluate --encoder runs/seed_r18/encoder --workdir runs/transfer \\
        --config configs/eval/transfer.py:data=cifar10 --config.data.name=imagenet2012

Variants: `:data=NAME` (the transfer dataset, a TFDS name or folder:/path); `:smoke` (5 values
of C; what the tests run).
"""

import ml_collections as mlc

from disco_jax import config_lib
from disco_jax.eval import block, protocols


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, data="cifar10")
    tr = block("transfer")
    tr.data.name = args.data
    if args.smoke:
        tr.update(num_c=5, c_min=1e-3, c_max=1e1, max_iter=200)
    c = protocols.eval_config(mlc.ConfigDict({"transfer": tr}))
    c.plots = not args.smoke
    return c
