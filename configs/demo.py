"""End-to-end demo on the embedded digits dataset (scikit-learn's real 8x8 digits as TFDS).

Five stages, each in WORKDIR/<stage>, then a table in WORKDIR/results.{json,md}:
1. `teacher`: MoCo-v2 pretraining of a ResNet-18 teacher (CIFAR stem, width 0.25; 40 epochs);
2. `baseline`: the much smaller MobileNetV3-Large student (width 0.25: 0.30M backbone
   parameters against 0.70M, 0.7 against 13.4 MFLOPs per 16 px image) with MoCo-v2 alone
   (50 epochs);
3. `seed`: the same student distilled with SEED from the frozen teacher of stage 1;
4. `disco`: the same student with DisCo (its own MoCo-v2 plus MSE to the teacher's embedding
   on both views; head d->2048->128, shuffle-BN over groups of 32 and the official sum-reduction
   scale B_local=32, i.e. distill_weight 32/128);
5. `kd`: the plain label-free baseline, cosine embedding distillation from the same teacher.
All frozen backbones are evaluated with weighted kNN and a linear probe on the held-out
test split (360 images, never seen in training).

    python -m disco_jax.main --config configs/demo.py --workdir runs/demo

Runs in a few minutes on 2 CPU cores (see README for the measured time and table).
Variants: `:smoke` (tiny, seconds; what the tests run); `epochs=N` (students),
`teacher_epochs=N`, `teacher_width=W`, `student_width=W`.
"""

import ml_collections as mlc

from disco_jax import config_lib


def _common(c: mlc.ConfigDict, epochs: int) -> mlc.ConfigDict:
    c.data.name = "digits"
    c.data.image_size = 16
    c.data.crop_scale = (0.4, 1.0)
    c.data.flip_p = 0.0  # a mirrored digit is another symbol: no flip invariance here
    c.data.shuffle_buffer = 2048
    c.batch_size = 128
    c.queue_size = 1024
    c.total_epochs = epochs
    c.optimizer.base_lr = 0.06
    c.optimizer.warmup_epochs = 0.0
    c.log_every_steps = 20
    c.checkpoint_every_steps = 100
    c.evals.linear_fast.epochs = 100
    c.evals.knn.k = 20
    return c


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(
        arg, smoke=False, epochs=50, teacher_epochs=40, teacher_width=0.25, student_width=0.25
    )
    teacher_net = config_lib.encoder_config("resnet18", head_hidden=512, width=args.teacher_width,
                                             stem="cifar")
    # torchvision's MobileNetV3 BN momentum (0.01, Flax 0.99) needs thousands of steps before
    # its running statistics are usable in eval mode; a few-hundred-step demo uses 0.1 (0.9).
    student_net = config_lib.encoder_config("mobilenet_v3_large", head_hidden=0,
                                             width=args.student_width, bn_momentum=0.9)

    teacher = _common(config_lib.base_config(), args.teacher_epochs)
    teacher.method = "moco_v2"
    teacher.student = teacher_net
    teacher.loss.temp = 0.2
    teacher.loss.momentum = 0.99

    baseline = _common(config_lib.base_config(), args.epochs)
    baseline.method = "moco_v2"
    baseline.student = student_net
    baseline.loss.temp = 0.2
    baseline.loss.momentum = 0.99

    seed = _common(config_lib.base_config(), args.epochs)
    seed.method = "seed"
    seed.student = student_net
    seed.teacher = teacher_net
    seed.teacher.init = "{workdir}/teacher/encoder"
    seed.loss.student_temp = 0.2
    seed.loss.teacher_temp = 1e-4

    disco = _common(config_lib.base_config(), args.epochs)
    disco.method = "disco"
    disco.student = config_lib.encoder_config("mobilenet_v3_large", head_hidden=2048,
                                              width=args.student_width, bn_momentum=0.9)
    disco.teacher = teacher_net
    disco.teacher.init = "{workdir}/teacher/encoder"
    disco.loss.temp = 0.2
    disco.loss.momentum = 0.99
    disco.loss.distill_reduction = "sum"
    disco.loss.distill_weight = 32 / disco.batch_size  # official B_local = 32 per GPU
    disco.loss.teacher_bn = "train"
    disco.loss.key_bn = "shuffle"
    disco.loss.bn_groups = disco.batch_size // 32

    kd = _common(config_lib.base_config(), args.epochs)
    kd.method = "kd"
    kd.student = student_net
    kd.teacher = teacher_net
    kd.teacher.init = "{workdir}/teacher/encoder"
    kd.loss.kind = "cosine"
    kd.loss.temp = 4.0
    kd.loss.ce_weight = 0.0

    for distilled in (seed, disco, kd):
        config_lib.distill_monitors(distilled)
    stages = {"teacher": teacher, "baseline": baseline, "seed": seed, "disco": disco, "kd": kd}
    if args.smoke:
        for name, s in stages.items():
            s = config_lib.smoke(s)
            s.teacher.init = "" if name in ("teacher", "baseline") else "{workdir}/teacher/encoder"
            if name == "disco":
                s.loss.bn_groups = 4
                s.loss.distill_weight = 4 / s.batch_size
            stages[name] = s
    c = mlc.ConfigDict()
    c.dataset_name = "digits (scikit-learn load_digits, 1437 train / 360 test)"
    c.stage_order = tuple(stages)
    c.stages = stages
    return c
