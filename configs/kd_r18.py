"""Distillation baselines for a ResNet-18 student (method `kd`; not an official recipe).

No paper row in methods.md: these are the plain baselines that SEED / DisCo are compared
against. Default: label-free embedding distillation (`loss.kind="cosine"`, or `:kind=l2`)
of the MoCo-v2 R-50 teacher's 128-d embedding by the student's projected embedding (head
512->512->128), on one shared MoCo-v2-augmented view, teacher BN in eval mode, with SEED's
recipe (SGD lr 0.03 x B/256, 5-epoch warm-up, cosine, wd 1e-4, batch 256, 200 epochs).
`:kind=logits`: Hinton KD (T=4, T^2-scaled KL, the PaddleClas KLDivLoss default T of
methods.md §5.1) from a supervised ResNet-50 classifier (1000 classes; e.g. torchvision's,
converted with `python -m disco_jax.convert`) plus `ce_weight` x CE on the labels.

    python -m disco_jax.main --config configs/kd_r18.py --workdir runs/kd_r18 \\
        --config.teacher.init=runs/moco_v2_r50/encoder

Variants: `:kind=logits|l2|cosine`; `:smoke` (tiny widths, digits data, 4 steps, an untrained
teacher; with kind=logits the classifiers have the 10 digit classes).
"""

from disco_jax import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, kind="cosine")
    c = config_lib.distill_config("kd", config_lib.encoder_config("resnet18", head_hidden=0),
                                  config_lib.moco_v2_teacher())
    c.loss.kind = args.kind
    c.loss.temp = 4.0
    c.loss.ce_weight = 0.0
    if args.kind == "logits":
        c.student.num_classes = c.teacher.num_classes = 1000
        c.teacher.init = "runs/resnet50_supervised/encoder"
        c.loss.ce_weight = 1.0
    c.batch_size = 256
    c.total_epochs = 200
    c.optimizer.warmup_epochs = 5.0
    if args.smoke:
        c = config_lib.smoke(c)
        if args.kind == "logits":
            c.student.num_classes = c.teacher.num_classes = 10
    return c
