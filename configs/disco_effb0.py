"""DisCo: MoCo-v2 ResNet-50 (or -101) teacher -> EfficientNet-B0 student (Yuting-Gao/DisCo-pytorch).

Reproduces: DisCo paper, EfficientNet-B0 ImageNet linear top-1 66.5 with the MoCo-v2 R-50
teacher (200 ep) and 68.9 with R-101 (`:teacher=resnet101`), vs 46.8 for the student's own
MoCo-v2 (abstract +19.7 / +22.1; methods.md §3.5). Recipe (Reproduction.md command): SGD lr
0.03 x B/256, momentum 0.9, wd 1e-4, cosine per epoch, no warm-up, batch 256, 200 epochs;
MoCo-v2 augmentation at 224 px, two views; K=65536, m=0.999, tau 0.2; student head
1280->2048->128 without BN; MSE on unit embeddings of both views, teacher BN in train mode.
The student is torchvision's `efficientnet_b0` for now (DisCo uses timm's; switch to
`timm_efficientnet_b0` once the model zoo has it).

Distillation scale (`distill_reduction="sum"`, `distill_weight=1/8`) and BN groups
(`bn_group_size=32`, shuffle-BN): see `config_lib.disco_recipe`, which builds this recipe.

    python -m disco_jax.main --config configs/disco_effb0.py --workdir runs/disco_effb0 \\
        --config.teacher.init=runs/moco_v2_r50/encoder

Variants: `:teacher=resnet101` (a converted MoCo-v2 R-101 checkpoint as teacher.init);
`:smoke` (tiny widths, digits data, 4 steps, an untrained teacher; what the tests run).
"""

from disco_jax import config_lib


def get_config(arg: str | None = None):
    return config_lib.disco_recipe("efficientnet_b0", arg)
