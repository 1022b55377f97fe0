"""MCL(x2) on MoCo, ResNet-18 on ImageNet, self-supervised (winycg/MCL `main_moco_mcl.py`).

Reproduces: MCL README, ImageNet linear top-1 of R-18 MoCo 47.45 +- 0.11 -> MCL(x2)
48.04 +- 0.13. methods.md §4.3. Recipe (README command = MoCo-v1 settings, `--mlp` is a no-op in
the official builder, so the head is the torchvision fc, Linear(512, 128)): per-network EMA key
encoder (m 0.999) and queue (K 65536), T 0.07, KL T=3, unweighted VCL + SoftVCL + ICL +
SoftICL, SGD lr 0.03 (batch 256), momentum 0.9, wd 1e-4, 200 epochs, x0.1 at 120 and 160,
MoCo-v1 augmentation (RandomResizedCrop scale 0.2-1, grayscale 0.2, jitter 0.4 always, flip).
Shuffle-BN for the key encoders over BN groups of 32 images (the 8 GPUs x 32 of MoCo). Linear
probe of network 0.

    python -m disco_jax.main --config configs/mcl_moco_r18x2.py --workdir runs/mcl_moco_r18x2

Variants: `:smoke` (width 0.25, CIFAR stem, digits, 4 steps; what the tests run).
"""

from disco_jax import config_lib
from disco_jax.methods.mcl import loss_config


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, nets=2)
    c = config_lib.base_config("mcl")
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    # MoCo-v1 augmentation: ColorJitter(0.4, 0.4, 0.4, 0.4) always, grayscale 0.2, no blur.
    c.augment.update(jitter_p=1.0, hue=0.4, gray_p=0.2, blur_p=0.0)
    c.student = config_lib.encoder_config("resnet18", head="linear")
    c.loss = loss_config("moco", num_nets=args.nets)
    c.queue_size = 65536
    c.batch_size = 256
    c.total_epochs = 200
    c.optimizer.update(base_lr=0.03, decay="step", step_milestones=(120, 160), warmup_epochs=0.0)
    if args.smoke:
        c = config_lib.smoke(c)
    return c
