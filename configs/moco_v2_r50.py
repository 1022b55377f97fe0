"""MoCo-v2 ResNet-50 on ImageNet: the teacher-pretraining recipe (facebookresearch/moco).

Reproduces: MoCo-v2, 200 epochs, ImageNet linear top-1 67.5 ± 0.1 (official README; the released
checkpoint scores 67.7; 800 epochs give 71.1). Recipe: SGD lr 0.03 x B/256, momentum 0.9,
wd 1e-4, cosine per epoch, no warm-up, batch 256, K=65536, m=0.999, tau=0.2, MLP head
2048->2048->128 without BN, MoCo-v2 augmentation at 224 px; BN as on the official 8 GPUs x 32
images on any device count: the query encoder over groups of 32 (`loss.bn_group_size`), the key
encoder with shuffle-BN over those groups (`loss.key_bn="shuffle"`; "global" for global BN).

    python -m disco_jax.main --config configs/moco_v2_r50.py --workdir runs/moco_v2_r50

The exported `runs/moco_v2_r50/encoder` is a SEED/DisCo teacher (`teacher.init`).
Variants: `:smoke` (tiny widths, digits data, 4 steps; what the tests run).
"""

from disco_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False)
    c = config_lib.base_config("moco_v2")
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    c.student = config_lib.encoder_config("resnet50", head_hidden=2048)
    c.loss.temp = 0.2
    c.loss.momentum = 0.999
    c.loss.key_bn = "shuffle"  # facebookresearch/moco `_batch_shuffle_ddp`
    c.loss.bn_group_size = 32  # per-GPU BN of the official 8 x 32 images
    c.queue_size = 65536
    c.batch_size = 256
    c.total_epochs = 200
    c.optimizer.warmup_epochs = 0.0
    if args.smoke:
        c = config_lib.smoke(c)
    return c
