"""MCL(x2) ResNet-32 on CIFAR-100, in-batch form (winycg/MCL `main_cifar.py`).

Reproduces: MCL README, CIFAR-100 top-1, ResNet-32: baseline 70.91 -> MCL(x2) 72.96; with `:m=4`
MCL(x4) 74.04 (4 branches on one shared conv1 + layer1 stem, `loss.shared_stem`, as the official
``resnet32_b``; the stem is shared whenever m >= 3). methods.md §4.1, §4.5, §4.6.
Recipe: 2 independent ResNet-32 with classifier and Embed head (64->128->128), tau 0.1, KL T=3,
alpha/gamma/beta/lambda 0.1/1/0.1/1, class sampler 2 per class, SGD Nesterov 0.9, lr 0.1,
wd 5e-4, batch 128, 300 epochs, cosine per epoch. Data as `main_cifar.py`: RandomCrop(32,
padding=4) (zero fill) + horizontal flip, no colour augmentation, CIFAR-100 mean/std
(0.5071, 0.4867, 0.4408) / (0.2675, 0.2565, 0.2761) for training and test images (which are
not resized or cropped). Evaluation: network 0 (kNN / linear on its features).

    python -m disco_jax.main --config configs/mcl_cifar_resnet32x2.py --workdir runs/mcl_r32x2

Variants: `:smoke` (width 0.25, digits, 4 steps; what the tests run), `logit_distill=1`, `m=4`
(cohort size; `nets=` is the older spelling of the same).
"""

from disco_jax import config_lib
from disco_jax.data.augment import CIFAR100_MEAN, CIFAR100_STD
from disco_jax.eval import block
from disco_jax.methods.mcl import loss_config


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, logit_distill=False, nets=2, m=0)
    m = args.m or args.nets
    c = config_lib.base_config("mcl")
    c.evals.classifier = block("classifier")  # every network, the best, the ensemble
    c.data.name = "cifar100"
    c.data.image_size = 32
    c.data.train_crop = "pad_crop"
    c.data.crop_padding = 4
    c.data.mean = CIFAR100_MEAN
    c.data.std = CIFAR100_STD
    c.augment.jitter_p = c.augment.gray_p = c.augment.blur_p = 0.0
    c.student = config_lib.encoder_config("resnet32", head="mcl_embed")
    c.student.num_classes = 100
    c.loss = loss_config("in_batch", num_nets=m, logit_distill=args.logit_distill,
                         shared_stem=m >= 3)
    c.batch_size = 128
    c.total_epochs = 300
    c.optimizer.update(base_lr=0.1, scale_with_batch=False, nesterov=True, weight_decay=5e-4,
                       decay="cosine", warmup_epochs=0.0)
    if args.smoke:
        c = config_lib.smoke(c)
        c.student.model_kwargs = {"width": 0.25}  # CIFAR nets take no `stem`
        c.student.num_classes = 10
    return c
