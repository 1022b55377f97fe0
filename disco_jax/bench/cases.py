"""The benchmark's cases (a string registry) and how each is built: config, state, batch, parts.

A case is a recipe of `configs/` with the benchmark's overrides (`bench_config`):

- an untrained teacher (`teacher.init="random"`, `variant="benchmark"`): speed does not depend
  on the weights;
- the device augmentation replaced by normalisation only (`normalise_only`), dropout and
  drop-connect off, BN over the whole batch (`loss.bn_group_size=0`) and `loss.key_bn="global"`
  where the method has them. A one-chip run: per-GPU BN over one GPU is the whole batch and
  shuffle-BN over one GPU changes nothing, officially too. With these the JAX networks and the
  PyTorch peers see identical float inputs and compute the same function, so their step-1
  losses can be compared;
- a suite's batch, image size and dtype (`SUITES`).

Each case is timed in parts (`PARTS`):

- `step`: the production step, `train.make_train_step`, jitted exactly as `train.run` jits it
  (the same in/out shardings, the state donated). The headline number.
- `teacher_fwd`: the frozen teacher on every view the step gives it, in the BN mode the step
  uses (`loss.teacher_bn` where the method has it: DisCo's recipe keeps "train", batch
  statistics; else inference mode), normalisation included.
- `student_step`: the same production step with the teacher network replaced by a stand-in of
  negligible cost (`stand_in_teacher`: a pooled 3 -> embed_dim projection of the same input), so it
  times everything but the teacher's network: the student's forward, backward and update, the
  loss, the queue and (DisCo) the momentum encoder.
- `loss`: the method's loss on given embeddings and the queue, with its gradient with respect
  to the student embeddings (what the step pays for it; perf.md's regression canary).

Parts other than `step` exist for the teacher/student pairs (SEED, DisCo) only.

Nothing here imports jax at module import (the parent process of `python -m disco_jax.bench`
must not touch the accelerator); `build` imports what it needs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from disco_jax.errors import ConfigError, unknown_name

PARTS = ("step", "teacher_fwd", "student_step", "loss")
TEACHER_PARTS = ("teacher_fwd", "student_step", "loss")  # teacher/student pairs only
IMAGE_KEYS = ("image", "view1", "view2")


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """A benchmark case: its recipe and perf.md's forward GMAC per image of its networks at
    224 px (§1.2's F_T / F_S, projection heads included) for the analytic FLOP count."""

    recipe: str  # configs/<recipe>.py
    label: str
    student_gmac: float
    teacher_gmac: float | None = None


CASES: dict[str, CaseSpec] = {
    "seed_r50_mbv3": CaseSpec("seed_mbv3", "SEED R50 -> MBv3-L", 0.215, 4.092),
    "seed_r50_effb0": CaseSpec("seed_effb0", "SEED R50 -> EffB0", 0.386, 4.092),
    "seed_r50_r18": CaseSpec("seed_r18", "SEED R50 -> R18", 1.814, 4.092),
    "disco_r50_effb0": CaseSpec("disco_effb0", "DisCo R50 -> EffB0", 0.386, 4.092),
    "moco_v2_r50": CaseSpec("moco_v2_r50", "MoCo-v2 R50", 4.092),
    "mcl_r18x2": CaseSpec("mcl_r18x2", "MCL R18 x 2", 1.814),
}


@dataclasses.dataclass(frozen=True)
class Suite:
    batch: int  # per device (the global batch is batch x devices: weak scaling)
    image_size: int
    dtype: str
    steps: int  # default timed steps
    warmup: int  # default untimed steps after the first
    recipe_arg: str  # the recipe variant the networks come from ("smoke": tiny widths)
    n_data: int  # rows of a memory bank (MCL): the dataset size
    table_flops: bool  # perf.md's FLOP table applies (224 px, full-size networks)


SUITES: dict[str, Suite] = {
    "smoke": Suite(16, 32, "float32", 5, 2, "smoke", 160, False),
    "paper": Suite(256, 224, "bfloat16", 50, 10, "", 1_281_167, True),
}
ALL_SUITES = (*SUITES, "host")  # `host`: disco_jax.bench.host (the input pipeline)


def check_cases(names: list[str]) -> list[str]:
    """The names, each a known case (ConfigError, one line, otherwise)."""
    for name in names:
        if name not in CASES:
            raise unknown_name("case", name, CASES)
    if not names:
        raise ConfigError("--cases is empty; valid cases: " + ", ".join(CASES))
    return names


def check_parts(names: list[str]) -> list[str]:
    for name in names:
        if name not in PARTS:
            raise unknown_name("part", name, PARTS)
    return names


# --------------------------------------------------------------------------- config


def load_recipe(recipe: str, arg: str) -> Any:
    """`configs/<recipe>.py[:arg]` as the command line loads it."""
    from disco_jax import cli

    dirs = cli.recipe_dirs()
    if not dirs:
        raise ConfigError("no recipes folder found (configs/ of a checkout, or the wheel's)")
    path = dirs[0] / f"{recipe}.py"
    return cli.load_config_file(f"{path}:{arg}" if arg else str(path))


def _no_dropout(net: Any) -> None:
    """Classifier dropout and drop-connect off where the model has them: the peers must compute
    the same function, and a random mask cannot be reproduced across frameworks."""
    from disco_jax import models

    options = models.model_options(net.model)
    kw = dict(net.model_kwargs)
    for key in ("dropout", "stochastic_depth_prob"):
        if key in options:
            kw[key] = 0.0
    net.model_kwargs = kw


def bench_config(name: str, suite: str, devices: int = 1) -> Any:
    """The resolved config of case `name` in `suite` (see the module docstring)."""
    from disco_jax import methods

    spec, s = CASES[name], SUITES[suite]
    c = load_recipe(spec.recipe, s.recipe_arg)
    c.variant = "benchmark"
    if methods.get(c.method).NEEDS_TEACHER:
        c.teacher.init = "random"
    c.dtype = s.dtype
    c.batch_size = s.batch * devices
    c.mesh.num_devices = devices
    c.data.image_size = s.image_size
    c.eval.enabled = False
    for net in ("student", "teacher"):
        _no_dropout(c[net])
    if "bn_group_size" in c.loss:
        c.loss.bn_group_size = 0
    if "key_bn" in c.loss:
        c.loss.key_bn = "global"
    if c.queue_size % c.batch_size:  # the ring buffer holds whole batches
        c.queue_size = max(1, c.queue_size // c.batch_size) * c.batch_size
    return methods.resolve_loss(c)


def table_gflop(name: str, part: str, config: Any) -> float | None:
    """perf.md's analytic GFLOP per source image (§1.2: 1 MAC = 2 FLOPs; training = 3x the
    forward) of `part`, from the per-network GMAC of `CASES` and the method's view counts:
    SEED F_T + 3 F_S + 3 q, DisCo 2 F_T + 7 F_S + 2 q, MoCo-v2 4 F_S + 2 q, MCL M x 3 F_S
    (its memory-bank logits, < 1 %, left out), q = the queue logits (K x embed_dim MACs).
    None where it does not apply (not 224 px, or a part the method lacks)."""
    spec = CASES[name]
    if config.data.image_size != 224:
        return None
    q = config.queue_size * config.student.embed_dim / 1e9
    f_t, f_s = spec.teacher_gmac or 0.0, spec.student_gmac
    per_method = {
        "seed": {"step": f_t + 3 * f_s + 3 * q, "teacher_fwd": f_t,
                 "student_step": 3 * f_s + 3 * q, "loss": 3 * q},
        "disco": {"step": 2 * f_t + 7 * f_s + 2 * q, "teacher_fwd": 2 * f_t,
                  "student_step": 7 * f_s + 2 * q, "loss": 2 * q},
        "moco_v2": {"step": 4 * f_s + 2 * q},
        "mcl": {"step": config.loss.get("num_nets", 2) * 3 * f_s},
    }
    gmac = per_method.get(config.method, {}).get(part)
    return None if gmac is None else round(2 * gmac, 4)


# --------------------------------------------------------------------------- inputs


def synthetic_arrays(config: Any, method: Any, n_data: int, seed: int = 0) -> dict:
    """The host batch the method's stream would give, as numpy: uint8 crops under the stream's
    keys (`image`, or `view1`/`view2`), int32 `label` and, for a memory bank, `index` (rows of
    a dataset of `n_data` images whose labels are `bank_labels`)."""
    rng = np.random.default_rng(seed)
    n, size = config.batch_size, config.data.image_size
    keys = IMAGE_KEYS[:1] if method.views(config) == 1 else IMAGE_KEYS[1:]
    batch = {k: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for k in keys}
    labels = bank_labels(config, n_data)
    index = rng.choice(n_data, n, replace=False).astype(np.int32)
    batch["label"] = labels[index]
    if method.data_options(config).get("with_index"):
        batch["index"] = index
    return batch


def bank_labels(config: Any, n_data: int) -> np.ndarray:
    """Class-balanced labels of a synthetic dataset of `n_data` rows."""
    classes = max(1, int(config.student.get("num_classes", 0) or 1000))
    return (np.arange(n_data) % classes).astype(np.int32)


def synthetic_host(config: Any, method: Any, ctx: dict, n_data: int) -> dict:
    """`method.host_init` without a dataset: MCL's memory bank reads every train label, so its
    class table (the same arrays as `methods.mcl._bank_lookup`) is built from `bank_labels`."""
    if config.loss.get("form") != "memory_bank":
        return method.host_init(config, ctx)
    labels = bank_labels(config, n_data)
    order = np.argsort(labels, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    count = np.bincount(labels)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return {"bank_lookup": {k: np.asarray(v, np.int32) for k, v in
                            {"sorted": order, "rank": rank, "start": start,
                             "count": count}.items()}}


def normalise_only(config: Any, dtype: Any) -> Any:
    """`ctx["augment"]` of the benchmark: normalisation only, with `mocov2_augment`'s call
    signature, so every network sees exactly the float input a peer is given."""
    from disco_jax import data

    mean, std = tuple(config.data.mean), tuple(config.data.std)

    def augment(rng: Any, images: Any, view: int = 1) -> Any:
        del rng, view
        return data.normalize(images, dtype, mean, std)

    return augment


# --------------------------------------------------------------------------- the built case


@dataclasses.dataclass
class Built:
    """Everything `train.run` builds before its loop, for one case."""

    name: str
    config: Any
    method: Any
    ctx: dict
    dtype: Any
    tx: Any
    schedule: Any
    state: dict  # the initial state, sharded (donated by the first part that runs the step)
    abstract: Any  # its shapes and dtypes (valid after the donation)
    state_sh: Any
    batch: dict  # device-resident
    batch_sh: dict
    teacher_vars: Any  # device-resident, or None
    host_teacher_vars: Any

    @property
    def repl(self) -> Any:
        from disco_jax import sharding

        return sharding.replicated(self.ctx["mesh"])


def build(name: str, suite: str, devices: int = 1, seed: int = 0) -> Built:
    """Case `name` built as `train.run` builds a run (mesh, schedule, optimizer, student,
    frozen teacher, state created with its shardings), without reading any data."""
    import jax

    from disco_jax import jit_util, methods, optim, sharding, train

    config = bench_config(name, suite, devices)
    method = methods.get(config.method)
    mesh = sharding.make_mesh(config.mesh.num_devices)
    sharding.check_batch(config.batch_size, mesh)
    dtype = train.compute_dtype(config.dtype)
    n_data = max(SUITES[suite].n_data, config.batch_size)
    steps_per_epoch = max(1, n_data // config.batch_size)
    total_steps = train.num_train_steps(config, steps_per_epoch)
    schedule = optim.lr_schedule(
        global_batch=config.batch_size, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, **optim.schedule_options(config.optimizer))
    tx = optim.make_optimizer(config.optimizer, schedule)
    repl = sharding.replicated(mesh)

    student = method.build_student(config, dtype)
    teacher = host_teacher = teacher_vars = None
    if method.NEEDS_TEACHER:
        host_teacher, manifest = train.random_teacher(config, method, dtype)
        teacher = method.build_teacher(manifest, dtype)
        teacher_vars = jax.device_put(host_teacher, repl)
    ctx = {"student": student, "teacher": teacher, "augment": normalise_only(config, dtype),
           "config": config, "mesh": mesh, "total_steps": total_steps,
           "steps_per_epoch": steps_per_epoch}
    host = jax.device_put(synthetic_host(config, method, ctx, n_data), repl)
    init_state = train.make_init_state(method, tx, ctx, dtype)
    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed), host)
    state_sh = sharding.tree_shardings(abstract, mesh)
    state = jit_util.run_once(init_state, jax.random.PRNGKey(config.seed), host,
                              out_shardings=state_sh)
    arrays = synthetic_arrays(config, method, n_data, seed)
    batch_sh = {k: sharding.batch_sharding(mesh) for k in arrays}
    batch = {k: jax.device_put(v, batch_sh[k]) for k, v in arrays.items()}
    return Built(name=name, config=config, method=method, ctx=ctx, dtype=dtype, tx=tx,
                 schedule=schedule, state=state, abstract=abstract, state_sh=state_sh, batch=batch,
                 batch_sh=batch_sh, teacher_vars=teacher_vars, host_teacher_vars=host_teacher)


# --------------------------------------------------------------------------- parts


@dataclasses.dataclass
class Part:
    """A jitted function and its first arguments. `threads_state`: it is a train step whose
    first argument is the (donated) state and whose first output is the next state."""

    name: str
    fn: Any  # jax.jit(...) result, not yet lowered
    args: tuple
    threads_state: bool
    loss_of: Any  # first output -> the loss (a scalar array), or None

    def __post_init__(self) -> None:
        if self.loss_of is None:
            self.loss_of = lambda out: None


def parts_of(built: Built, names: tuple[str, ...]) -> list[str]:
    """The parts of `names` this case has (the teacher parts need a teacher)."""
    has_teacher = built.method.NEEDS_TEACHER and built.config.method in LOSS_PARTS
    return [p for p in names if p == "step" or (has_teacher and p in TEACHER_PARTS)]


def _jit_step(built: Built, ctx: dict) -> Any:
    """`train.make_train_step` jitted with `train.run`'s shardings and donation."""
    import jax

    from disco_jax import train

    return jax.jit(
        train.make_train_step(built.method, built.tx, built.schedule, ctx),
        in_shardings=(built.state_sh, built.batch_sh, built.repl),
        out_shardings=(built.state_sh, built.repl),
        donate_argnums=(0,),
    )


def step_part(built: Built, state: dict) -> Part:
    return Part("step", _jit_step(built, built.ctx), (state, built.batch, built.teacher_vars),
                True, lambda out: out[1]["loss"])


def student_step_part(built: Built, state: dict) -> Part:
    import jax

    dim = int(built.config.teacher.embed_dim)
    ctx = {**built.ctx, "teacher": stand_in_teacher(dim)}
    stand_in = jax.device_put(stand_in_variables(dim), built.repl)
    return Part("student_step", _jit_step(built, ctx), (state, built.batch, stand_in), True,
                lambda out: out[1]["loss"])


def teacher_fwd_part(built: Built) -> Part:
    import jax

    from disco_jax.methods.common import teacher_forward

    config, ctx = built.config, built.ctx
    mode = config.loss.get("teacher_bn", "eval")
    views = [k for k in IMAGE_KEYS if k in built.batch]

    def forward(teacher_vars: Any, batch: dict, rng: jax.Array) -> dict:
        return {k: teacher_forward(ctx["teacher"], teacher_vars,
                                   ctx["augment"](rng, batch[k]), ctx,
                                   jax.random.fold_in(rng, i), mode)["embedding"]
                for i, k in enumerate(views)}

    fn = jax.jit(forward, in_shardings=(built.repl, built.batch_sh, built.repl))
    return Part("teacher_fwd", fn, (built.teacher_vars, built.batch, jax.random.PRNGKey(1)),
                False, None)


def loss_part(built: Built) -> Part:
    """The method's loss (`LOSS_PARTS`) and its gradient on random embeddings of the dtype the
    student gives, with a random unit queue of the state's shape and sharding."""
    import jax
    import jax.numpy as jnp

    config = built.config
    n, dim = config.batch_size, int(config.student.embed_dim)
    emb_dtype = jax.eval_shape(
        functools.partial(built.ctx["student"].apply, train=False),
        {"params": built.abstract["params"], "batch_stats": built.abstract["batch_stats"]},
        jax.ShapeDtypeStruct((1, config.data.image_size, config.data.image_size, 3),
                             built.dtype))["embedding"].dtype
    rng = np.random.default_rng(2)
    queue = rng.standard_normal((config.queue_size, dim), np.float32)
    queue /= np.linalg.norm(queue, axis=1, keepdims=True)
    loss_fn, names = LOSS_PARTS[config.method]
    embs = {k: jnp.asarray(rng.standard_normal((n, dim), np.float32), emb_dtype)
            for k in names}
    fn = jax.jit(functools.partial(loss_fn, config.loss))
    queue = jax.device_put(queue, built.state_sh["queue"]["feats"])
    return Part("loss", fn, (embs, queue), False, lambda out: out[0])


def make_part(built: Built, name: str, state: dict) -> Part:
    if name == "step":
        return step_part(built, state)
    if name == "student_step":
        return student_step_part(built, state)
    return teacher_fwd_part(built) if name == "teacher_fwd" else loss_part(built)


def _seed_loss(cfg: Any, e: dict, queue: Any) -> tuple:
    import jax

    from disco_jax import losses

    def f(s: Any) -> Any:
        return losses.seed_loss(s, e["t"], queue, cfg.student_temp, cfg.teacher_temp)

    return jax.value_and_grad(f)(e["s"])


def _disco_loss(cfg: Any, e: dict, queue: Any) -> tuple:
    import jax

    from disco_jax import losses

    def f(q: Any, qk: Any) -> Any:
        return losses.disco_loss(q, e["k"], queue, qk, e["t_q"], e["t_k"], temp=cfg.temp,
                                 distill_weight=cfg.distill_weight,
                                 distill_reduction=cfg.distill_reduction)["total"]

    return jax.value_and_grad(f, argnums=(0, 1))(e["q"], e["qk"])


# method -> (loss and gradient(cfg.loss, embeddings, queue), the embeddings it takes)
LOSS_PARTS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "seed": (_seed_loss, ("s", "t")),
    "disco": (_disco_loss, ("q", "k", "qk", "t_q", "t_k")),
}


# --------------------------------------------------------------------------- stand-in teacher


@functools.cache
def _stand_in_class() -> Any:
    import flax.linen as nn
    import jax.numpy as jnp

    class StandInTeacher(nn.Module):
        """A teacher of negligible cost with a teacher's interface: `{"embedding"}` from the
        pooled input through one Dense; a dummy `batch_stats` entry, so a train-mode call
        (`mutable=["batch_stats"]`, DisCo's `teacher_bn="train"`) works as with a real one."""

        embed_dim: int

        @nn.compact
        def __call__(self, x: Any, train: bool = False) -> dict:
            self.variable("batch_stats", "unused", lambda: jnp.zeros((), jnp.float32))
            pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
            return {"embedding": nn.Dense(self.embed_dim, name="proj")(pooled)}

    return StandInTeacher


def stand_in_teacher(embed_dim: int) -> Any:
    """A `StandInTeacher` (its Flax class is made on first use: flax imports jax)."""
    return _stand_in_class()(embed_dim)


def stand_in_variables(embed_dim: int) -> dict:
    rng = np.random.default_rng(3)
    return {"params": {"proj": {"kernel": rng.standard_normal((3, embed_dim), np.float32),
                                "bias": np.zeros((embed_dim,), np.float32)}},
            "batch_stats": {"unused": np.zeros((), np.float32)}}


# --------------------------------------------------------------------------- peers' view


def peer_inputs(built: Built) -> dict[str, np.ndarray]:
    """The normalised views exactly as the JAX networks see them (in the run's dtype, then
    float32, which holds bfloat16 values exactly), keyed like the batch."""
    import jax

    out = {}
    for k in IMAGE_KEYS:
        if k in built.batch:
            x = built.ctx["augment"](None, built.batch[k])
            out[k] = np.asarray(jax.device_get(x)).astype(np.float32)
    return out


STATE_OWN = ("params", "batch_stats", "opt_state", "step", "rng")


def split_host_state(host_state: dict) -> tuple[dict, dict]:
    """(student variables {params, batch_stats}, the method's extra state: the rest but the
    optimizer state, step and rng) of a host copy of the state."""
    student = {k: host_state[k] for k in ("params", "batch_stats")}
    extra = {k: v for k, v in host_state.items() if k not in STATE_OWN}
    return student, extra
