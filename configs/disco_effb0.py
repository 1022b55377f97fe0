"""DisCo: MoCo-v2 ResNet-50 (or -101) teacher -> EfficientNet-B0 student (Yuting-Gao/DisCo-pytorch).

Reproduces: DisCo paper, EfficientNet-B0 ImageNet linear top-1 66.5 with the MoCo-v2 R-50
teacher (200 ep) and 68.9 with R-101 (`:teacher=resnet101`), vs 46.8 for the student's own
MoCo-v2 (abstract +19.7 / +22.1; methods.md §3.5). Recipe (Reproduction.md command): SGD lr
0.03 x B/256, momentum 0.9, wd 1e-4, cosine per epoch, no warm-up, batch 256, 200 epochs;
MoCo-v2 augmentation at 224 px, two views; K=65536, m=0.999, tau 0.2; student head
1280->2048->128 without BN; MSE on unit embeddings of both views, teacher BN in train mode.
The student is torchvision's `efficientnet_b0` for now (DisCo uses timm's; switch to
`timm_efficientnet_b0` once the model zoo has it).

Distillation scale. Officially each of 8 GPUs computes L_g = mean_{n in g} CE_n
+ sum_{n in g} D_n (MSELoss reduction='sum' over its B_local=32 rows; D_n = ||t_q - q||^2 +
||t_k - qk||^2) and DDP averages gradients, so the objective is (1/G) sum_g L_g
= mean_n CE_n + (1/G) sum_n D_n = mean_n CE_n + B_local * mean_n D_n over the global batch.
Under jit the loss sees the whole global batch at once: with distill_reduction="sum" the term
is distill_weight * sum_n D_n, so distill_weight = 1/G = B_local / B_global = 1/8 reproduces it
(equivalently "mean" with distill_weight = B_local = 32). The invariant is
distill_weight * batch_size = B_local: at another global batch B with the official 32 images
per GPU, use distill_weight = 32 / B.

BN as on the official 8 GPUs, on any device count: `bn_group_size=32` normalises the student
(both forwards) and the train-mode teacher over groups of 32 images, `key_bn="shuffle"` is
MoCo's shuffle-BN over those groups (`bn_group_size=0`: global-batch BN; `teacher_bn="eval"`:
the teacher's running statistics).

    python -m disco_jax.main --config configs/disco_effb0.py --workdir runs/disco_effb0 \\
        --config.teacher.init=runs/moco_v2_r50/encoder

Variants: `:teacher=resnet101` (a converted MoCo-v2 R-101 checkpoint as teacher.init);
`:smoke` (tiny widths, digits data, 4 steps, an untrained teacher; what the tests run).
"""

from disco_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, teacher="resnet50")
    c = config_lib.base_config("disco")
    config_lib.distill_monitors(c)  # student-teacher agreement, every 10 epochs
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    c.student = config_lib.encoder_config("efficientnet_b0", head_hidden=2048)
    c.teacher = config_lib.encoder_config(args.teacher, head_hidden=2048)
    c.teacher.init = f"runs/moco_v2_{args.teacher.replace('resnet', 'r')}/encoder"
    c.loss.temp = 0.2
    c.loss.momentum = 0.999
    c.loss.distill_reduction = "sum"
    c.loss.distill_weight = 1.0 / 8  # = B_local / B_global of the official 8 x 32 run
    c.loss.teacher_bn = "train"
    c.loss.key_bn = "shuffle"
    c.loss.bn_group_size = 32  # the official 8 GPUs x 32 images
    c.queue_size = 65536
    c.batch_size = 256
    c.total_epochs = 200
    c.optimizer.warmup_epochs = 0.0
    if args.smoke:
        c = config_lib.smoke(c)
        c.loss.bn_group_size = 4  # 4 BN groups of 4 images at batch 16
    return c
