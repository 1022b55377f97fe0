"""SimCLR: ResNet-50 (1x) self-supervised on ImageNet (google-research/simclr).

Reproduces: SimCLR paper (Chen et al. 2020) Table 6, ResNet-50 (1x) linear evaluation 69.3
top-1 (1000 epochs, batch 4096); `epochs=100|200` are the shorter rows of Fig. 9 / Table B.1
(batch 4096; numbers there not re-verified). Recipe: batch 4096, LARS (momentum 0.9, eeta 1e-3,
BN params and biases excluded from weight decay and adaptation), lr 0.3 x B/256 (= 4.8;
`lr_scaling=sqrt`: 0.075 x sqrt(B), the paper's better choice for short runs), wd 1e-6,
10-epoch linear warm-up from 0 then cosine over the remaining steps (`WarmUpAndCosineDecay`),
NT-Xent with temperature 0.1 over the global batch, projection head
2048 -> 2048 -> BN -> ReLU -> 128 -> BN ("mlp_bn_out": the official `ProjectionHead` puts BN
on every layer, the last without bias, centre or ReLU), SimCLR colour augmentation (jitter
strength 1.0 -> 0.8, grayscale 0.2, blur 0.5, crop scale 0.08-1).

Variants: `:smoke` (tiny ResNet-18 on digits, 4 steps), `epochs=N`, `temp=T`, `batch=B`,
`lr_scaling=linear|sqrt`.
"""

import math

from disco_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, epochs=1000, temp=0.1, batch=4096,
                                lr_scaling="linear")
    c = config_lib.base_config("simclr")
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    c.data.crop_scale = (0.08, 1.0)
    c.augment.brightness, c.augment.contrast, c.augment.saturation = 0.8, 0.8, 0.8
    c.augment.hue = 0.2
    c.student = config_lib.encoder_config("resnet50", head="mlp_bn_out", head_hidden=2048)
    c.loss.temp = args.temp
    c.batch_size = args.batch
    c.total_epochs = args.epochs
    c.optimizer.name = "lars"
    c.optimizer.weight_decay = 1e-6
    c.optimizer.weight_decay_mask = "kernels"
    c.optimizer.warmup_epochs = 10.0
    c.optimizer.warmup_from = "zero"
    c.optimizer.cosine_after_warmup = True
    c.optimizer.granularity = "step"
    if args.lr_scaling == "sqrt":
        c.optimizer.base_lr = 0.075 * math.sqrt(args.batch)
        c.optimizer.scale_with_batch = False
    else:
        c.optimizer.base_lr = 0.3
    if args.smoke:
        c.student.model = "resnet18"  # a cheap compile; the method's code paths are the same
        c.optimizer.warmup_epochs = 0.0
        c = config_lib.smoke(c)
    return c
