"""The augmented linear probe of the papers' tables (frozen backbone in eval mode).

Presets (`:preset=NAME`):
- `moco` (default): facebookresearch/moco `main_lincls.py` as its README runs it: SGD lr 30,
  momentum 0.9, wd 0, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80, RandomResizedCrop
  224 + flip, test Resize 256 / CenterCrop 224, fc N(0, 0.01). The protocol of MoCo-v2's 67.5
  (R-50, 200 epochs) and of SEED's Table 1 linear column (e.g. MobileNetV3-L 55.2 from a
  MoCo-v2 R-50, methods.md §2.5).
- `seed`: SEED's copy of it: lr 30 x batch/256 after a 5-epoch warm-up.
- `disco`: Yuting-Gao/DisCo-pytorch `DisCo/main_lincls.py` with its commands' lr 3, halved at
  epochs 5, 10, ..., 45, 60 and 80: DisCo's Table 1 linear column (methods.md §3.5).

    python -m disco_jax.evaluate --encoder runs/seed_mbv3/encoder --workdir runs/lin \\
        --config configs/eval/linear.py:preset=moco --config.data.name=imagenet2012

Variants: `:smoke` (2 epochs; what the tests run).
"""

import ml_collections as mlc

from disco_jax import config_lib
from disco_jax.eval import block, protocols


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, preset="moco")
    lin = block("linear", preset=args.preset)
    if args.smoke:
        lin.update(epochs=2, probe_batch_size=32, log_every_steps=10, checkpoint_every_steps=20)
    c = protocols.eval_config(mlc.ConfigDict({"linear": lin}))
    c.plots = not args.smoke
    return c
