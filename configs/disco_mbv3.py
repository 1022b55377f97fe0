"""DisCo: MoCo-v2 ResNet-50 teacher -> MobileNetV3-Large student (Yuting-Gao/DisCo-pytorch).

Reproduces: DisCo paper, MobileNetV3-Large (timm mobilenetv3_large_100) distilled from
MoCo-v2 R-50 (200 ep), ImageNet linear top-1 64.4 (paper, recollection, unverified;
methods.md §3.5). Recipe (Reproduction.md command): SGD lr
0.03 x B/256, momentum 0.9, wd 1e-4, cosine per epoch, no warm-up, batch 256, 200 epochs;
MoCo-v2 augmentation at 224 px, two views; K=65536, m=0.999, tau 0.2; student head
1280->2048->128 without BN; MSE on unit embeddings of both views, teacher BN in train mode.
The student is timm's `mobilenetv3_large_100`, as in DisCo (it replaces its classifier).

Distillation scale (`distill_reduction="sum"`, `distill_weight=1/8`) and BN groups
(`bn_group_size=32`, shuffle-BN): see `config_lib.disco_recipe`, which builds this recipe.

    python -m disco_jax.main --config configs/disco_mbv3.py --workdir runs/disco_mbv3 \\
        --config.teacher.init=runs/moco_v2_r50/encoder

Variants: `:teacher=resnet101` (other MoCo-v2 teachers; paper rows unverified);
`:smoke` (tiny widths, digits data, 4 steps, an untrained teacher; what the tests run).
"""

from disco_jax import config_lib


def get_config(arg: str | None = None):
    return config_lib.disco_recipe("mobilenetv3_large_100", arg)
