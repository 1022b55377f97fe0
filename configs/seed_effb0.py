"""SEED: MoCo-v2 ResNet-50 teacher -> EfficientNet-B0 student on ImageNet (jacobswan1/SEED).

Reproduces: SEED paper Table 1, EfficientNet-B0 distilled from MoCo-v2 R-50 (200 ep), ImageNet
linear top-1 61.3 vs 42.2 for the student's own MoCo-v2 (paper numbers, recollection, not
re-verified; methods.md §2.5). Recipe as configs/seed_mbv3.py (official code defaults): K=65536,
student tau 0.2, teacher tau 1e-4, SGD lr 0.03 x B/256, 5-epoch warm-up, cosine per epoch,
wd 1e-4, batch 256, 200 epochs, student head 1280->1280->128 without BN, teacher BN in eval.
The student is SEED's EfficientNet-B0 (`seed_efficientnet_b0`, its copy of lukemelas'
EfficientNet-PyTorch: TF 'SAME' padding fixed for 224 px, BN eps 1e-3 / momentum 0.01,
drop-connect 0.2 at train time), whose student MLP replaces `fc` after the 0.2 `_dropout`: in
train mode the head sees the dropped-out 1280-d feature (`student.head_input="dropped"`).

    python -m disco_jax.main --config configs/seed_effb0.py --workdir runs/seed_effb0 \\
        --config.teacher.init=runs/moco_v2_r50/encoder

Variants: `:smoke` (tiny widths, digits data, 4 steps, an untrained teacher; what the tests run;
the student pads TF 'SAME' for the actual 16-px input, as the 224-px static pads do not fit it).
"""

from disco_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False)
    # Drop-connect: the model's default, lukemelas' 0.2.
    student = config_lib.encoder_config("seed_efficientnet_b0", head_hidden=0)
    student.head_input = "dropped"  # the MLP replaces fc, after the 0.2 dropout
    c = config_lib.seed_recipe(student)
    if args.smoke:
        c = config_lib.smoke(c)
        c.student.model_kwargs = {**c.student.model_kwargs, "image_size": None}
    return c
