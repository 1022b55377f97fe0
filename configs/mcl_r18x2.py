"""MCL(x2) ResNet-18 on ImageNet, memory-bank form (winycg/MCL `main_imagenet.py`).

Reproduces: MCL README, ImageNet top-1, ResNet-18: baseline 69.76 -> MCL(x2) 70.32 (MCL(x4)
70.77, 70.82 with logit KD, need the shared-stem cohort). methods.md §4.2, §4.5, §4.6.
Recipe: 2 ResNet-18 with classifier and Embed head (512->128->128), per-network banks
(n_data x 128, uniform init, momentum 0.5), 1 positive + 8192 negatives, tau 0.07, KL T=3,
alpha/gamma/beta/lambda 0.1/1/0.1/1, SGD Nesterov 0.9, lr 0.1, wd 1e-4, batch 256, 90 epochs,
x0.1 at 30 and 60, RandomResizedCrop 224 + flip (no colour augmentation).

    python -m disco_jax.main --config configs/mcl_r18x2.py --workdir runs/mcl_r18x2

Variants: `:smoke` (width 0.25, CIFAR stem, digits, 4 steps, 32 negatives; what the tests run).
"""

from disco_jax import config_lib
from disco_jax.eval import block
from disco_jax.methods.mcl import loss_config


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, nets=2)
    c = config_lib.base_config("mcl")
    c.evals.classifier = block("classifier")  # every network, the best, the ensemble
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    c.data.crop_scale = (0.08, 1.0)
    c.augment.jitter_p = c.augment.gray_p = c.augment.blur_p = 0.0
    c.student = config_lib.encoder_config("resnet18", head="mcl_embed")
    c.student.num_classes = 1000
    c.loss = loss_config("memory_bank", num_nets=args.nets)
    c.batch_size = 256
    c.total_epochs = 90
    c.optimizer.update(base_lr=0.1, nesterov=True, weight_decay=1e-4, decay="step",
                       step_milestones=(30, 60), warmup_epochs=0.0)
    if args.smoke:
        c = config_lib.smoke(c)
        c.student.num_classes = 10
        c.loss.neg_k = 32
    return c
