"""SEED small-patch variant: SwAV ResNet-50-w2 teacher -> EfficientNet-B0 with six 96-px crops.

Reproduces: the SEED README's best EfficientNet-B0 setting ("*" rows: SwAV teacher + small
patches, 800 epochs; the released student "Eff-B0 <- R50-w2 SwAV (800 ep)"), ImageNet linear
top-1 67.6 vs 42.2 for the student's own MoCo-v2 (README / abstract; methods.md §2.5).
Recipe (`main_small-patch.py`): the SEED loss on the 224-px view plus the SEED loss on six
RandomResizedCrop(96, scale=(0.05, 0.14)) crops with their own queue (crop 0 enqueued), terms
added; `swav_aug` (RandomResizedCrop scale (0.14, 1)); K=65536, student tau 0.2, teacher tau
1e-4; SGD lr 0.03 x B/256, 5-epoch warm-up, cosine per epoch, wd 1e-4, batch 256, 800 epochs.
Teacher: SwAV's R50-w2 with its projection head Linear -> BN1d -> ReLU -> Linear (hidden 8192)
in eval mode; convert the official SwAV checkpoint with `python -m disco_jax.convert`. The
student is SEED's EfficientNet-B0 (`seed_efficientnet_b0`, lukemelas' port: its TF 'SAME' pads
fixed for 224 px are applied to the 96-px crops too, as there; drop-connect 0.2), with the MLP
after the 0.2 `_dropout` (`student.head_input="dropped"`), in both forwards.

    python -m disco_jax.main --config configs/seed_multicrop_effb0.py --workdir runs/seed_mc \\
        --config.teacher.init=runs/swav_r50w2/encoder

Variants: `:smoke` (tiny widths, 16-px views, six 8-px crops, digits data, 4 steps, an untrained
teacher; the student pads TF 'SAME' for the actual input, as the 224-px static pads do not fit 16
or 8 px).
"""

from disco_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False)
    student = config_lib.encoder_config("seed_efficientnet_b0", head_hidden=0)
    student.head_input = "dropped"  # the MLP replaces fc, after the 0.2 dropout
    teacher = config_lib.encoder_config("swav_resnet50w2", head="mlp_bn", head_hidden=8192)
    teacher.init = "runs/swav_r50w2/encoder"
    c = config_lib.seed_recipe(student, teacher, epochs=800)
    c.data.crop_scale = (0.14, 1.0)  # swav_aug
    c.loss.small_crops = 6
    c.loss.small_size = 96
    c.loss.small_scale = (0.05, 0.14)
    if args.smoke:
        c = config_lib.smoke(c)
        c.student.model_kwargs = {**c.student.model_kwargs, "image_size": None}
        c.loss.small_size = 8
    return c
