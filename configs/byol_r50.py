"""BYOL: ResNet-50 self-supervised on ImageNet, 300 epochs (deepmind-research/byol).

Reproduces: BYOL paper (Grill et al. 2020) 300-epoch ResNet-50 baseline of its ablations
(Section 5 / Appendix), 72.5 linear top-1 (1000 epochs: 74.3, Table 1; `epochs=1000`).
Recipe: batch 4096, LARS (momentum 0.9, eeta 1e-3, biases and BN excluded from weight decay and
adaptation), lr x B/256, 10-epoch linear warm-up from 0 then cosine over the remaining epochs
(`utils/schedules.py: learning_schedule`), projector and predictor MLP 4096 -> BN -> ReLU ->
256, target EMA tau_base cosine-increased to 1, with the official per-length presets
(`configs/byol.py`: lr 0.45 / 0.45 / 0.3 / 0.2, wd 1e-6 / 1e-6 / 1e-6 / 1.5e-6, tau_base
0.97 / 0.99 / 0.99 / 0.996 for 40 / 100 / 300 / 1000 epochs), loss 2 - 2cos
symmetrised over the two views. Asymmetric views (`utils/augmentations.py`): colour jitter
(0.4, 0.4, 0.2, 0.1) p 0.8 and grayscale p 0.2 on both; blur p 1.0 / 0.1 and solarize
p 0 / 0.2 on view 1 / view 2 (`augment.view2`).

Variants: `:smoke` (tiny ResNet-18 on digits, 4 steps), `epochs=N`, `batch=B`.
"""

from disco_jax import config_lib

# deepmind-research/byol configs/byol.py: _LR_PRESETS, _WD_PRESETS, _EMA_PRESETS by epochs.
PRESETS = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99),
           1000: (0.2, 1.5e-6, 0.996)}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, epochs=300, batch=4096)
    if args.epochs not in PRESETS:
        raise ValueError(f"byol_r50: epochs={args.epochs} has no official preset; use one of"
                         f" {sorted(PRESETS)} (or set optimizer.base_lr, optimizer.weight_decay"
                         " and loss.tau_base yourself)")
    lr, wd, tau = PRESETS[args.epochs]
    c = config_lib.base_config("byol")
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    c.data.crop_scale = (0.08, 1.0)
    c.augment.saturation = 0.2  # BYOL's jitter (0.4, 0.4, 0.2, 0.1), p 0.8
    c.augment.blur_p = 1.0  # view 1
    c.augment.solarize_p = 0.0
    c.augment.view2 = {"blur_p": 0.1, "solarize_p": 0.2}
    c.student = config_lib.encoder_config("resnet50", head="mlp_bn", head_hidden=4096)
    c.student.embed_dim = 256
    c.loss.tau_base = tau
    c.loss.pred_hidden = 4096
    c.batch_size = args.batch
    c.total_epochs = args.epochs
    c.optimizer.name = "lars"
    c.optimizer.base_lr = lr
    c.optimizer.weight_decay = wd
    c.optimizer.weight_decay_mask = "kernels"
    c.optimizer.warmup_epochs = 10.0
    c.optimizer.warmup_from = "zero"
    c.optimizer.cosine_after_warmup = True
    c.optimizer.granularity = "step"
    if args.smoke:
        c.student.model = "resnet18"  # a cheap compile; the method's code paths are the same
        c.optimizer.warmup_epochs = 0.0
        c = config_lib.smoke(c)
        c.loss.pred_hidden = 64
        c.student.embed_dim = 32
    return c
