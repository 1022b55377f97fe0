"""L-MCL ResNet-34 (x2) on ImageNet, memory-bank form (winycg/L-MCL
`main_layer_mcl_imagenet_meta.py --arch lmcl_resnet34_imagenet`; TPAMI-23 "Online Knowledge
Distillation via Mutual Contrastive Learning for Visual Recognition").

Reproduces: the L-MCL README's ImageNet homogeneous-pair table, ResNet-34: baseline 73.68 ->
L-MCL 75.12 top-1 (ResNet-50: 76.28 -> 78.35 with `model=resnet50`; the official test reports
the max over both networks and their 4 stage heads). methods.md §4.4-4.6.
Recipe: 2 ResNet-34, each with auxiliary branches on layer1, layer2 and layer3 (one block per
copied stage, then pooled, with its own fc), 4 stage classifiers and Embed heads
(512->128->128), the logit aggregator and the meta-learned pair weights (MetaSGD look-ahead of
2 inner steps every 500 batches); per-network banks of the last stage's embeddings (n_data x
128, uniform init, momentum 0.5), 1 positive + 8192 negatives, tau 0.07, KL T=3,
alpha/gamma/beta/lambda 0.01/1/0.01/1, SGD Nesterov 0.9, lr 0.1, wd 1e-4, batch 256,
100 epochs, x0.1 at 30, 60 and 90, RandomResizedCrop 224 + flip (no colour augmentation),
BN per GPU of the README's 2-GPU launch (`bn_group_size` 128).

    python -m disco_jax.main --config configs/lmcl_r34x2.py --workdir runs/lmcl_r34x2

Variants: `:smoke` (ResNet-18, width 0.25, CIFAR stem, digits, 4 steps, 32 negatives, BN
groups of 8, no meta step; what the tests run), `model=resnet50`.
"""

from disco_jax import config_lib
from disco_jax.eval import block


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, model="resnet34")
    c = config_lib.base_config("lmcl")
    c.evals.classifier = block("classifier")  # every (network, stage) head, the best, ensemble
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    c.data.crop_scale = (0.08, 1.0)
    c.augment.jitter_p = c.augment.gray_p = c.augment.blur_p = 0.0
    c.student = config_lib.encoder_config(args.model, head="mcl_embed")
    c.student.num_classes = 1000
    c.loss.update(form="memory_bank", tau=0.07, alpha=0.01, beta=0.01, meta_freq=500,
                  bn_group_size=128)
    c.batch_size = 256
    c.total_epochs = 100
    c.optimizer.update(base_lr=0.1, nesterov=True, weight_decay=1e-4, decay="step",
                       step_milestones=(30, 60, 90), warmup_epochs=0.0)
    if args.smoke:
        c.student.model = "resnet18"  # 2 blocks a stage instead of 3-6: a shorter compile
        c = config_lib.smoke(c)
        c.student.num_classes = 10
        c.loss.neg_k = 32
        c.loss.meta_freq = 0  # as in lmcl_cifar_resnet32x2.py:smoke
    return c
