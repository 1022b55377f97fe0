"""Shared config pieces: the base config every recipe starts from, `:arg` parsing, and the
shared bodies of the recipe families (`disco_recipe`, `seed_recipe`) that configs/ fill in.

A config file is `configs/NAME.py` with `get_config(arg: str | None = None)`. The argument after
the colon picks a variant (`configs/seed_mbv3.py:smoke`); `--config.x=y` overrides any field.
"""

from __future__ import annotations

from typing import Any

import ml_collections as mlc

from disco_jax import methods
from disco_jax.data import augment
from disco_jax.eval import protocols


def parse_arg(arg: str | None, **defaults: Any) -> mlc.ConfigDict:
    """`"smoke,res=32"` -> ConfigDict(smoke=True, res=32) with typed defaults (big_vision style)."""
    out = mlc.ConfigDict(dict(defaults))
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:  # a misspelt variant must not silently run the full recipe
            valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; this config takes:"
                             f" {valid}")
        if not value:
            out[key] = True
            continue
        default = defaults[key]
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            try:
                out[key] = type(default)(value)
            except ValueError:
                kind = {int: "an integer", float: "a number"}.get(type(default), "valid")
                raise ValueError(f"config argument {key}={value!r} is not {kind}") from None
    return out


def encoder_config(model: str, *, head: str = "mlp", head_hidden: int = 0, **model_kwargs):
    """A network: backbone name + kwargs, projection head. head_hidden=0: the input width."""
    return mlc.ConfigDict(
        {
            "model": model,
            "model_kwargs": dict(model_kwargs),
            "head": head,
            "head_hidden": head_hidden,
            "embed_dim": 128,
            "num_classes": 0,  # > 0: the backbone's classifier too (logits; SSLD, KD)
            # "dropped": in train mode the head sees the backbone's classifier dropout applied
            # to the features (SEED's students); "features": the features as they are.
            "head_input": "features",
        }
    )


def base_config(method: str = "seed") -> mlc.ConfigDict:
    """Every field a run reads, with the library defaults; `c.loss` holds `method`'s knobs with
    their official defaults (`LOSS_DEFAULTS` of its module), for the recipe to override."""
    c = mlc.ConfigDict()
    c.method = method
    c.seed = 0
    # "full" (a recipe as published), "smoke" (config_lib.smoke) or "benchmark": the last two
    # may use an untrained teacher (teacher.init="random"); force_random_teacher allows it in
    # any variant.
    c.variant = "full"
    c.force_random_teacher = False

    c.data = mlc.ConfigDict(
        {
            "name": "digits",
            "data_dir": mlc.config_dict.placeholder(str),
            "train_split": "train",
            "eval_split": "test",
            "image_size": 224,
            "crop_scale": (0.2, 1.0),
            "flip_p": 0.5,  # horizontal flip probability (host side)
            # Train views: "random_resized" (RandomResizedCrop, crop_scale) or "pad_crop"
            # (CIFAR's RandomCrop(S, padding=crop_padding), zero fill).
            "train_crop": "random_resized",
            "crop_padding": 4,
            # True: each random-resized crop of a JPEG decodes only its window
            # (decode_and_crop_jpeg); False (default): decode the whole image, as PIL does in
            # the official code. See data.train_dataset for the pixels in which they differ.
            "fused_decode": False,
            # Random-resized crops resized with antialiasing (True, as PIL / torchvision) or
            # plain bilinear (False: about 2x faster on a CPU host, aliased when shrinking).
            "antialias": True,
            # Normalisation statistics (RGB, on the [0, 1] scale), for training and evaluation.
            "mean": augment.IMAGENET_MEAN,
            "std": augment.IMAGENET_STD,
            "shuffle_buffer": 50_000,
            # tf.data autotuning of map parallelism and prefetch depth (TF's default). Off: a
            # fixed parallelism of min(16, cores) and no autotuning thread, whose end a freed
            # iterator waits for (seen: up to tens of seconds on 2 cores), which a run of
            # seconds pays for and does not gain from (the smoke variants). Same examples.
            "autotune": True,
            "bad_images": "error",  # image folders: corrupt/non-image files "error" or "skip"
            # Data shards the global batch is cut into; -1: one per process (each reads its
            # own). Fix it (e.g. to the largest host count) to keep the stream independent of
            # the number of hosts.
            "num_shards": -1,
        }
    )
    # MoCo-v2 "aug-plus"; RandomResizedCrop and flip run on the host, the rest on the device.
    c.augment = mlc.ConfigDict(
        {
            "jitter_p": 0.8,
            "brightness": 0.4,
            "contrast": 0.4,
            "saturation": 0.4,
            "hue": 0.1,
            "gray_p": 0.2,
            "blur_p": 0.5,
            "blur_sigma": (0.1, 2.0),
            "solarize_p": 0.0,  # BYOL's solarisation (off in MoCo-v2)
            "solarize_threshold": 0.5,
            # Overrides of the above for the second view of methods that ask for it (BYOL's
            # asymmetric views); empty: both views alike.
            "view2": {},
        }
    )
    c.student = encoder_config("mobilenet_v3_large")
    c.teacher = encoder_config("resnet50", head_hidden=2048)
    # An encoder directory (finished workdir or converted checkpoint), or "random": an
    # untrained teacher of this architecture (smoke and benchmark variants only).
    c.teacher.init = ""
    c.loss = methods.loss_defaults(method)
    c.queue_size = 65536
    c.batch_size = 256  # global
    c.total_epochs = 200
    c.total_steps = -1  # > 0 overrides total_epochs
    c.stop_at_step = -1  # > 0: leave the run early at this step (the schedule is unchanged)

    c.optimizer = mlc.ConfigDict(
        {
            "name": "sgd",
            "base_lr": 0.03,  # per 256 images
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 1e-4,
            "weight_decay_mask": "all",
            "warmup_epochs": 0.0,
            "decay": "cosine",  # or "step" (x0.1 at each of step_milestones) or "constant"
            "step_milestones": (120, 160),  # epochs; MoCo-v1's 200-epoch schedule
            "granularity": "epoch",
            "scale_with_batch": True,
            "warmup_from": "base",  # SEED / MoCo; "zero": PaddleClas, SimCLR, BYOL
            "cosine_after_warmup": False,  # True: cosine over the epochs after the warm-up
        }
    )
    c.mesh = mlc.ConfigDict({"num_devices": -1})
    c.dtype = "auto"  # bfloat16 on GPU/TPU, float32 on CPU; losses are float32 regardless

    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.nonfinite = "stop"  # non-finite loss/grads: "stop" (keep last good checkpoint) or "skip"
    c.force_resume = False  # resume a workdir whose checkpoint came from a different config
    # Evaluators (disco_jax/eval): kNN (k sweep) and the quick probe at the end, an online kNN
    # on a fixed train subset every 10 epochs. `eval.enabled=False` switches all of them off.
    c.eval = mlc.ConfigDict({"enabled": True, "batch_size": 256})  # batch: feature extraction
    c.evals = protocols.final_evals()
    c.evals.knn_online = protocols.online_knn()
    return c


def distill_monitors(c: mlc.ConfigDict, every_epochs: float = 10.0) -> mlc.ConfigDict:
    """Add the student-teacher agreement monitor (methods with a teacher)."""
    c.evals.agree = protocols.agreement(every_epochs)
    return c


def smoke(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """Shrink any recipe into a seconds-long run on the embedded digits data (used by tests).
    A method with a teacher gets an untrained one of the recipe's architecture
    (teacher.init="random"), so the variant runs with no other flag."""
    c.variant = "smoke"
    if methods.get(c.method).NEEDS_TEACHER:
        c.teacher.init = "random"
    c.data.name = "digits"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.image_size = 16
    c.data.crop_scale = (0.5, 1.0)
    c.data.autotune = False  # seconds of data: nothing to tune, and no wait when it ends
    c.batch_size = 16
    c.queue_size = 64
    c.total_epochs = -1
    c.total_steps = 4
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.evals.linear_fast.epochs = 5
    c.evals.knn_online.every_epochs = -1.0  # the tests that need it set every_steps
    if c.loss.get("bn_group_size", 0):
        c.loss.bn_group_size = 8  # two BN groups of the 16 images, as 2 GPUs would have
    for net in ("student", "teacher"):
        kw = dict(c[net].model_kwargs)
        kw["width"] = 0.25
        if c[net].model.startswith("resnet"):
            kw["stem"] = "cifar"
        c[net].model_kwargs = kw
        c[net].head_hidden = min(c[net].head_hidden, 64)
    return c


# Recipe families: the logic shared by the configs/ recipes of one method, which pass in only
# what distinguishes them (their student, their own numbers).


def moco_v2_teacher(model: str = "resnet50") -> mlc.ConfigDict:
    """A MoCo-v2 teacher: `model` with MoCo-v2's 2048-wide MLP head, initialised from the
    encoder of its `configs/moco_v2_*` workdir (resnet50 -> runs/moco_v2_r50/encoder)."""
    teacher = encoder_config(model, head_hidden=2048)
    teacher.init = f"runs/moco_v2_{model.replace('resnet', 'r')}/encoder"
    return teacher


def distill_config(method: str, student: mlc.ConfigDict,
                   teacher: mlc.ConfigDict) -> mlc.ConfigDict:
    """`base_config(method)` distilling `teacher` into `student` on ImageNet, with the
    student-teacher agreement monitor."""
    c = base_config(method)
    distill_monitors(c)  # student-teacher agreement, every 10 epochs
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    c.student = student
    c.teacher = teacher
    return c


def disco_recipe(student: str, arg: str | None) -> mlc.ConfigDict:
    """The DisCo recipe (Reproduction.md command) for the backbone `student`, with the variants
    `:teacher=MODEL` (a MoCo-v2 teacher other than resnet50) and `:smoke`.

    Distillation scale. Officially each of 8 GPUs computes L_g = mean_{n in g} CE_n
    + sum_{n in g} D_n (MSELoss reduction='sum' over its B_local=32 rows; D_n = ||t_q - q||^2 +
    ||t_k - qk||^2) and DDP averages gradients, so the objective is (1/G) sum_g L_g
    = mean_n CE_n + (1/G) sum_n D_n = mean_n CE_n + B_local * mean_n D_n over the global batch.
    Under jit the loss sees the whole global batch at once: with distill_reduction="sum" the term
    is distill_weight * sum_n D_n, so distill_weight = 1/G = B_local / B_global = 1/8 reproduces
    it (equivalently "mean" with distill_weight = B_local = 32). The invariant is
    distill_weight * batch_size = B_local: at another global batch B with the official 32 images
    per GPU, use distill_weight = 32 / B.

    BN as on the official 8 GPUs, on any device count: `bn_group_size=32` normalises the student
    (both forwards) and the train-mode teacher over groups of 32 images, `key_bn="shuffle"` is
    MoCo's shuffle-BN over those groups (`bn_group_size=0`: global-batch BN; `teacher_bn="eval"`:
    the teacher's running statistics).
    """
    args = parse_arg(arg, smoke=False, teacher="resnet50")
    c = distill_config("disco", encoder_config(student, head_hidden=2048),
                       moco_v2_teacher(args.teacher))
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
        c = smoke(c)
        c.loss.bn_group_size = 4  # 4 BN groups of 4 images at batch 16
    return c


def seed_recipe(student: mlc.ConfigDict, teacher: mlc.ConfigDict | None = None, *,
                epochs: int = 200) -> mlc.ConfigDict:
    """The SEED recipe (official code defaults) distilling `teacher` (default: the MoCo-v2
    ResNet-50) into `student` for `epochs`; the recipe applies its own variants (`smoke`)."""
    c = distill_config("seed", student, moco_v2_teacher() if teacher is None else teacher)
    c.loss.student_temp = 0.2
    c.loss.teacher_temp = 1e-4
    c.queue_size = 65536
    c.batch_size = 256
    c.total_epochs = epochs
    c.optimizer.warmup_epochs = 5.0
    return c
