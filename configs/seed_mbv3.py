"""SEED: MoCo-v2 ResNet-50 teacher -> MobileNetV3-Large student on ImageNet (jacobswan1/SEED).

Reproduces: SEED paper Table 1, MobileNetV3-Large distilled from MoCo-v2 R-50 (200 ep teacher,
67.4 linear), ImageNet linear top-1 55.2 vs 36.3 for the student's own MoCo-v2 (paper numbers,
not re-verified; see shared/reference/methods.md §2.5). Recipe (official code defaults):
K=65536, student tau 0.2, teacher tau 1e-4, SGD lr 0.03 x B/256 with a 5-epoch warm-up from
0.03, cosine per epoch, wd 1e-4 on every parameter, batch 256, 200 epochs, MoCo-v2
augmentation at 224 px, student head 1280->1280->128 without BN, teacher BN in inference mode.
The student is SEED's own MobileNetV3-Large (`seed_mobilenetv3_large`, its
`mobilenetv3.py`: SE before the activation, Linear SE layers, BN eps 1e-5), whose student MLP
replaces `fc` after the classifier's Dropout(0.2): in train mode the head sees the dropped-out
1280-d feature (`student.head_input="dropped"`).

Teacher: a finished `configs/moco_v2_r50.py` workdir (its `encoder` folder) or a converted
official MoCo-v2 checkpoint, given as `--config.teacher.init=DIR`:

    python -m disco_jax.main --config configs/seed_mbv3.py --workdir runs/seed_mbv3 \\
        --config.teacher.init=runs/moco_v2_r50/encoder

ImageNet must be prepared for TFDS first (manual download; the run says how if it is not).
Variants: `:smoke` (tiny widths, digits data, 4 steps, an untrained teacher; what the tests run).
"""

from disco_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False)
    student = config_lib.encoder_config("seed_mobilenetv3_large", head_hidden=0)
    student.head_input = "dropped"  # the MLP replaces fc, after the classifier's dropout
    c = config_lib.seed_recipe(student)
    if args.smoke:
        c = config_lib.smoke(c)
    return c
