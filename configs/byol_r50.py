"""BYOL: ResNet-50 self-supervised on ImageNet, 300 epochs (deepmind-research/byol).

Reproduces: BYOL paper (Grill et al. 2020) 300-epoch ResNet-50 baseline of its ablations
(Section 5 / Appendix), 72.5 linear top-1 (1000 epochs: 74.3, Table 1; `epochs=1000`).
Recipe: batch 4096, LARS (momentum 0.9, eeta 1e-3, biases and BN excluded from weight decay and
adaptation), lr 0.2 x B/256, wd 1.5e-6, 10-epoch warm-up then cosine, projector and predictor
MLP 4096 -> BN -> ReLU -> 256, target EMA tau 0.996 cosine-increased to 1, loss 2 - 2cos
symmetrised over the two views.

Not reproduced: BYOL's asymmetric view augmentation (blur p 1.0 / 0.1, solarize p 0 / 0.2);
both views use the shared augmentation (blur p 0.5, no solarize). The shared lr warm-up starts
at base_lr x 1 rather than 0 (disco_jax.optim), like every config here.

Variants: `:smoke` (tiny ResNet-18 on digits, 4 steps), `epochs=N`, `batch=B`.
"""

from disco_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, epochs=300, batch=4096)
    c = config_lib.base_config()
    c.method = "byol"
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    c.data.crop_scale = (0.08, 1.0)
    c.augment.saturation = 0.2  # BYOL's jitter (0.4, 0.4, 0.2, 0.1), p 0.8
    c.student = config_lib.encoder_config("resnet50", head="mlp_bn", head_hidden=4096)
    c.student.embed_dim = 256
    c.loss.tau_base = 0.996
    c.loss.pred_hidden = 4096
    c.batch_size = args.batch
    c.total_epochs = args.epochs
    c.optimizer.name = "lars"
    c.optimizer.base_lr = 0.2
    c.optimizer.weight_decay = 1.5e-6
    c.optimizer.weight_decay_mask = "kernels"
    c.optimizer.warmup_epochs = 10.0
    c.optimizer.granularity = "step"
    if args.smoke:
        c.student.model = "resnet18"  # a cheap compile; the method's code paths are the same
        c.optimizer.warmup_epochs = 0.0
        c = config_lib.smoke(c)
        c.loss.pred_hidden = 64
        c.student.embed_dim = 32
    return c
