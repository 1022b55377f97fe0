"""SEED: MoCo-v2 ResNet-50 teacher -> ResNet-18 student on ImageNet (jacobswan1/SEED).

Reproduces: SEED paper Table 1, ResNet-18 distilled from MoCo-v2 R-50 (200 ep), ImageNet
linear top-1 57.6 vs 52.5 for the student's own MoCo-v2 (paper numbers, recollection, not
re-verified; methods.md §2.5). Recipe as configs/seed_mbv3.py (official code defaults): K=65536,
student tau 0.2, teacher tau 1e-4, SGD lr 0.03 x B/256, 5-epoch warm-up, cosine per epoch,
wd 1e-4, batch 256, 200 epochs, student head 512->512->128 without BN, teacher BN in eval.
The student is torchvision's ResNet-18, as in SEED (a released SEED student).

    python -m disco_jax.main --config configs/seed_r18.py --workdir runs/seed_r18 \\
        --config.teacher.init=runs/moco_v2_r50/encoder

Variants: `:smoke` (tiny widths, digits data, 4 steps, an untrained teacher; what the tests run).
"""

from disco_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False)
    c = config_lib.seed_recipe(config_lib.encoder_config("resnet18", head_hidden=0))
    if args.smoke:
        c = config_lib.smoke(c)
    return c
