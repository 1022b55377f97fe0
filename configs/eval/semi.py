"""Semi-supervised evaluation with 1 % or 10 % of the labels.

Presets (`:preset=NAME`):
- `disco` (default): DisCo's `main_lincls_semi.py`: a linear classifier on the frozen backbone,
  lr 3.0, 100 epochs, halved at epochs 60 and 80, on the SimCLR 1 % subset (`:subset=10pct` for
  10 %). DisCo's semi-supervised table.
- `simclr_1pct` / `simclr_10pct`: SimCLR's fine-tuning of the whole network (Nesterov 0.9,
  lr 0.05 x B/256, no wd, 60 / 30 epochs): SimCLR's and BYOL's semi-supervised tables.
On ImageNet the subsets are TFDS's `imagenet2012_subset/1pct` / `10pct` (prepare them like
`imagenet2012`); on other data, the same fraction of each class of the train split.

    python -m disco_jax.evaluate --encoder runs/disco_effb0/encoder --workdir runs/semi \\
        --config configs/eval/semi.py:preset=disco,subset=1pct --config.data.name=imagenet2012

Variants: `:smoke` (2 epochs, linear and fine-tuning; what the tests run).
"""

import ml_collections as mlc

from disco_jax import config_lib
from disco_jax.eval import block, protocols


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, preset="disco", subset="")
    semi = block("semi", preset=args.preset)
    if args.subset:
        semi.subset = args.subset
    evals = {"semi": semi}
    if args.smoke:
        small = dict(epochs=2, probe_batch_size=8, log_every_steps=10,
                     checkpoint_every_steps=20)
        semi.update(small)
        evals["semi_ft"] = block("semi", preset="simclr_10pct", **small)
    c = protocols.eval_config(mlc.ConfigDict(evals))
    c.plots = not args.smoke
    return c
