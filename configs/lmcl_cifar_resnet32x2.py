"""L-MCL ResNet-32 (x2) on CIFAR-100, in-batch form (winycg/L-MCL
`main_layer_mcl_cifar_meta.py --arch lmcl_resnet32_cifar`; TPAMI-23 "Online Knowledge
Distillation via Mutual Contrastive Learning for Visual Recognition").

Reproduces: the L-MCL README's CIFAR-100 homogeneous-pair table, ResNet-32: baseline 70.91 ->
L-MCL 75.82 top-1 (the official test reports the max over both networks and their 3 stage
heads, at the best epoch; `classifier/top1` here is that max at the last epoch). For
comparison, MCL(x2) 72.96 (configs/mcl_cifar_resnet32x2.py). methods.md §4.4-4.6.
Recipe: 2 ResNet-32, each with auxiliary branches on layer1 (copies of layer2 + layer3) and
layer2 (a copy of layer3), 3 stage classifiers and Embed heads (64->128->128), the logit
aggregator and the meta-learned pair weights (LossWeightNetwork, MetaSGD look-ahead of 2 inner
steps every 50 batches); tau 0.1, KL T=3, alpha/gamma/beta/lambda 0.1/1/0.1/1, class sampler
2 per class, SGD Nesterov 0.9, lr 0.1, wd 5e-4, batch 128, 300 epochs, cosine per epoch,
RandomCrop(32, pad 4) + flip, CIFAR-100 mean/std, no colour augmentation, BN over the whole
batch (one GPU).

    python -m disco_jax.main --config configs/lmcl_cifar_resnet32x2.py --workdir runs/lmcl_r32x2

Variants: `:smoke` (width 0.25, digits, 4 steps, no meta step; what the tests run), `m=3`
(cohort size).
"""

from disco_jax import config_lib
from disco_jax.data.augment import CIFAR100_MEAN, CIFAR100_STD
from disco_jax.eval import block


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, m=2)
    c = config_lib.base_config("lmcl")
    c.evals.classifier = block("classifier")  # every (network, stage) head, the best, ensemble
    c.data.name = "cifar100"
    c.data.image_size = 32
    c.data.train_crop, c.data.crop_padding = "pad_crop", 4
    c.data.mean, c.data.std = CIFAR100_MEAN, CIFAR100_STD
    c.augment.jitter_p = c.augment.gray_p = c.augment.blur_p = 0.0
    c.student = config_lib.encoder_config("resnet32", head="mcl_embed")
    c.student.num_classes = 100
    c.loss.num_nets = args.m
    c.batch_size = 128
    c.total_epochs = 300
    c.optimizer.update(base_lr=0.1, scale_with_batch=False, nesterov=True, weight_decay=5e-4,
                       decay="cosine", warmup_epochs=0.0)
    if args.smoke:
        c = config_lib.smoke(c)
        c.student.model_kwargs = {"width": 0.25}  # CIFAR nets take no `stem`
        c.student.num_classes = 10
        # The meta step's second-order look-ahead compiles to ~5x the train step; the tests
        # run it on a tiny network instead (test_meta_step_in_the_train_step).
        c.loss.meta_freq = 0
    return c
