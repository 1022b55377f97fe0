"""PyTorch peers of our JAX train steps, for the side-by-side benchmark (needs torch).

A peer is the same step as ``train.make_train_step`` of one method (SEED, DisCo, MoCo-v2), on
the same networks (our Flax variables exported by ``convert.to_torch`` into the torch twins of
`disco_jax.bench.torch_nets`), the same queue, key encoder, inputs, loss and SGD, written in
PyTorch in one of two styles:

- ``p0``, as the official code runs: NCHW, eager, ``torch.optim.SGD``; SEED under fp16
  autocast with a GradScaler on CUDA (float32 on a CPU, which has no fp16 autocast); DisCo and
  MoCo-v2 (facebookresearch/moco) in float32; MoCo's per-parameter momentum loop.
- ``p1``, as a strong PyTorch user would write it: channels_last, bf16 autocast (CUDA),
  ``torch.compile`` of the forward + loss, fused SGD, ``torch._foreach_lerp_`` for the key
  encoder. If ``torch.compile`` fails, the step runs eagerly and the record says
  ``compiled: false`` with the reason. On a CPU autocast is off by default (``amp=True`` turns
  bf16 on), so both styles agree with the JAX float32 step to float32 precision.

Under autocast the networks run in half precision but every loss is formed in float32 from
float32 embeddings outside the autocast region, as our losses are (SEED's teacher temperature
1e-4 puts its logits at 1e4). The benchmark's settings are required: BN over the whole batch
(``loss.bn_group_size`` 0, ``loss.key_bn`` "global"), no SEED small crops, SGD; anything else
is a one-line ConfigError before anything is built.

``run_peer`` times ``steps`` steps after ``warmup`` (``torch.cuda.synchronize`` after every
step on a GPU) and reports the loss of the first step, taken before any update (what the JAX
step reports as its step-1 loss). ``compile_s`` is the wall time of the warm-up steps (for p1
the compilation; for p0 cuDNN autotuning and allocator warm-up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from disco_jax.bench import torch_nets
from disco_jax.errors import ConfigError

STYLES = ("p0", "p1")
METHODS = ("seed", "disco", "moco_v2")
REQUIRED_FIELDS = ("loss_step1", "step_ms_median", "step_ms_p90", "compile_s", "peak_mem_bytes",
                   "dtype", "img_per_sec", "device")


@dataclasses.dataclass
class PeerSpec:
    case: str  # the method: "seed", "disco", "moco_v2" ("mcl" is not implemented)
    config: Any  # the resolved ConfigDict of the JAX step
    student_vars: dict  # host numpy {"params", "batch_stats"} of the student Encoder, step 0
    teacher_vars: dict | None  # host numpy variables of the frozen teacher Encoder
    extra: dict  # the method's extra JAX state at step 0 ({"queue": ..., "ema": ...})
    inputs: dict  # name -> float32 NHWC normalised views, keyed like the JAX batch
    labels: Any  # numpy int labels or None
    lr: float  # the step-0 learning rate
    batch: int
    image_size: int


@dataclasses.dataclass(frozen=True)
class Style:
    name: str
    channels_last: bool
    amp: torch.dtype | None  # autocast dtype of the networks, None: float32
    scaler: bool  # fp16 GradScaler
    compile: bool
    fused: bool  # fused SGD (else torch's default implementation)
    foreach_ema: bool  # key encoder by torch._foreach_lerp_ (else MoCo's loop)


def make_style(method: str, style: str, device: str, amp: bool | None = None,
               compile: bool | None = None) -> Style:
    """The settings of a style on a device; ``amp`` / ``compile`` override the defaults."""
    if style not in STYLES:
        raise ConfigError(f"peer style must be one of {', '.join(STYLES)}, got {style!r}")
    cuda = device == "cuda"
    use_amp = cuda if amp is None else bool(amp)
    if style == "p0":
        # Only SEED's official code trains in mixed precision (fp16 + GradScaler); CPUs have no
        # fp16 autocast worth the name, so there it stays float32 unless asked for bf16.
        half = torch.float16 if cuda else torch.bfloat16
        dtype = half if use_amp and method == "seed" else None
        return Style("p0", False, dtype, dtype is torch.float16, False, False, False)
    return Style("p1", True, torch.bfloat16 if use_amp else None, False,
                 True if compile is None else bool(compile), True, True)


def check_spec(spec: PeerSpec) -> str:
    """The method name, after refusing settings the peers do not reproduce."""
    method = spec.case
    if method not in METHODS:
        raise ConfigError(f"no torch peer for method {method!r} (peers: {', '.join(METHODS)})")
    cfg = spec.config
    loss = cfg.loss
    if int(loss.get("bn_group_size", 0)) not in (0, int(cfg.batch_size)):
        raise ConfigError(f"torch peers normalise BN over the whole batch; set"
                          f" loss.bn_group_size=0 (got {loss.bn_group_size})")
    if method in ("disco", "moco_v2") and loss.get("key_bn") != "global":
        raise ConfigError(f"torch peers run the key encoder with global BN; set"
                          f" loss.key_bn='global' (got {loss.get('key_bn')!r})")
    if method == "seed" and int(loss.get("small_crops", 0)):
        raise ConfigError("torch peers do not implement SEED's small crops; set loss.small_crops=0")
    opt = cfg.optimizer
    if opt.get("name", "sgd") != "sgd":
        raise ConfigError(f"torch peers train with SGD, got optimizer.name={opt.name!r}")
    return method


# ---------------------------------------------------------------- losses (float32)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """F.normalize in float32: x / max(||x||, 1e-12), as `losses.l2_normalize`."""
    return F.normalize(x.float(), dim=1)


def _with_positive(anchor, positive, queue_dk):
    """[anchor . positive, anchor . queue] -> (N, 1 + K); the queue is (D, K) as in MoCo."""
    return torch.cat([(anchor * positive).sum(1, keepdim=True), anchor @ queue_dk], dim=1)


def seed_loss(s, t, queue_dk, student_temp: float, teacher_temp: float) -> torch.Tensor:
    """`losses.seed_loss`: soft cross-entropy of the student's similarity distribution over
    [current teacher embedding | queue] towards the teacher's."""
    s, t = _unit(s), _unit(t).detach()
    logit_s = _with_positive(s, t, queue_dk) / student_temp
    logit_t = _with_positive(t, t, queue_dk) / teacher_temp
    return -(F.softmax(logit_t, dim=1) * F.log_softmax(logit_s, dim=1)).sum(1).mean()


def moco_loss(q, k, queue_dk, temp: float) -> torch.Tensor:
    """`losses.moco_loss`: InfoNCE with the key in column 0 (facebookresearch/moco)."""
    logits = _with_positive(_unit(q), _unit(k).detach(), queue_dk) / temp
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def disco_loss(q, k, queue_dk, qk, t_q, t_k, temp, distill_weight, reduction) -> torch.Tensor:
    """`losses.disco_loss`: MoCo InfoNCE + weight * (MSE(q, t_q) + MSE(qk, t_k)) on unit
    vectors, summed over rows and dimensions ("sum", DisCo's MSELoss(reduction='sum')) or that
    sum over the batch size ("mean")."""

    def mse(student, teacher):
        total = ((_unit(student) - _unit(teacher).detach()) ** 2).sum()
        return total / student.shape[0] if reduction == "mean" else total

    return moco_loss(q, k, queue_dk, temp) + distill_weight * (mse(q, t_q) + mse(qk, t_k))


# ---------------------------------------------------------------- the peer step


class _Peer:
    """Networks, queue and optimizer of one method, and its step as three parts: `pre` (the
    key encoder's momentum update), `forward_loss` (networks + loss; what p1 compiles) and
    `post` (enqueue)."""

    def __init__(self, method: str, spec: PeerSpec, st: Style, device: str):
        self.method, self.st, self.device = method, st, device
        cfg = spec.config
        # Plain Python numbers: the compiled forward then guards on constants, not a ConfigDict.
        self.knobs = {k: float(cfg.loss[k]) for k in ("student_temp", "teacher_temp", "temp",
                                                       "distill_weight", "momentum")
                      if k in cfg.loss}
        self.reduction = str(cfg.loss.get("distill_reduction", "sum"))
        mf = torch.channels_last if st.channels_last else torch.contiguous_format

        def net(net_cfg, variables, train: bool):
            enc = torch_nets.from_flax(net_cfg, variables).to(device, memory_format=mf)
            return enc.train(train)

        self.student = net(cfg.student, spec.student_vars, True)
        self.teacher = self.key = None
        if method in ("seed", "disco"):
            if spec.teacher_vars is None:
                raise ConfigError(f"method {method!r} needs teacher_vars in the PeerSpec")
            # SEED: BN in inference mode; DisCo: `teacher_bn` ("train": batch statistics).
            train_bn = method == "disco" and cfg.loss.get("teacher_bn", "train") == "train"
            self.teacher = net(cfg.teacher, spec.teacher_vars, train_bn).requires_grad_(False)
        if method in ("disco", "moco_v2"):
            self.key = net(cfg.student, spec.extra["ema"], True).requires_grad_(False)
            self.k_params = list(self.key.parameters())
            self.q_params = list(self.student.parameters())
        q = spec.extra["queue"]
        self.queue = torch.from_numpy(np.ascontiguousarray(np.asarray(q["feats"], np.float32).T))
        self.queue = self.queue.to(device)  # (D, K), MoCo's layout
        self.ptr = int(np.asarray(q["ptr"]))

        def image(x):
            t = torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2)  # NHWC -> NCHW
            return t.contiguous(memory_format=mf).to(device)

        names = ("image",) if method == "seed" else ("view1", "view2")
        missing = [n for n in names if n not in spec.inputs]
        if missing:
            raise ConfigError(f"PeerSpec.inputs of {method!r} lacks {missing} (has"
                              f" {sorted(spec.inputs)})")
        self.inputs = tuple(image(spec.inputs[n]) for n in names)

        opt = cfg.optimizer
        decay = float(opt.get("weight_decay", 0.0))
        params = list(self.student.parameters())
        if opt.get("weight_decay_mask", "all") == "kernels":  # conv / linear weights only
            groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": decay},
                      {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        else:
            groups = [{"params": params, "weight_decay": decay}]
        kw = {"lr": float(spec.lr), "momentum": float(opt.get("momentum", 0.9)),
              "nesterov": bool(opt.get("nesterov", False))}
        self.fused = False
        if st.fused:
            try:
                self.opt = torch.optim.SGD(groups, fused=True, **kw)
                self.fused = True
            except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device
                self.opt = torch.optim.SGD(groups, **kw)
        else:
            self.opt = torch.optim.SGD(groups, **kw)
        self.scaler = torch.amp.GradScaler("cuda") if st.scaler else None

    def autocast(self):
        if self.st.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.st.amp)

    @torch.no_grad()
    def pre(self) -> None:
        if self.key is None:
            return
        m = self.knobs["momentum"]
        if self.st.foreach_ema:
            torch._foreach_lerp_(self.k_params, self.q_params, 1.0 - m)
        else:  # facebookresearch/moco `_momentum_update_key_encoder`
            for pk, pq in zip(self.k_params, self.q_params, strict=True):
                pk.data = pk.data * m + pq.data * (1.0 - m)

    def forward_loss(self, *xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the rows to enqueue): networks under autocast, the loss in float32."""
        kn, queue = self.knobs, self.queue
        if self.method == "seed":
            (x,) = xs
            with self.autocast():
                with torch.no_grad():
                    t = self.teacher(x)["embedding"]
                s = self.student(x)["embedding"]
            loss = seed_loss(s.float(), t.float(), queue, kn["student_temp"], kn["teacher_temp"])
            return loss, t.float()
        x_q, x_k = xs
        with self.autocast():
            with torch.no_grad():
                k = self.key(x_k)["embedding"]
            q = self.student(x_q)["embedding"]
            if self.method == "moco_v2":
                qk = t_q = t_k = None
            else:  # DisCo: the query encoder on the key view too, and the teacher on both
                qk = self.student(x_k)["embedding"]
                with torch.no_grad():
                    t_q = self.teacher(x_q)["embedding"]
                    t_k = self.teacher(x_k)["embedding"]
        if self.method == "moco_v2":
            return moco_loss(q.float(), k.float(), queue, kn["temp"]), k.float()
        loss = disco_loss(q.float(), k.float(), queue, qk.float(), t_q.float(), t_k.float(),
                          kn["temp"], kn["distill_weight"], self.reduction)
        return loss, k.float()

    @torch.no_grad()
    def post(self, keys: torch.Tensor) -> None:
        """Global FIFO enqueue of the unit keys at ptr (after backward: the matmul that formed
        the logits saved the queue for its gradient)."""
        n, size = keys.shape[0], self.queue.shape[1]
        self.queue[:, self.ptr:self.ptr + n] = _unit(keys).T
        self.ptr = (self.ptr + n) % size

    def step(self, fwd: Callable) -> torch.Tensor:
        self.pre()
        loss, keys = fwd(*self.inputs)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.post(keys.detach())
        return loss.detach()


# ---------------------------------------------------------------- timing


def _dtype_name(st: Style) -> str:
    return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[st.amp]


def _device_kind(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def _time_steps(peer: _Peer, fwd: Callable, steps: int, warmup: int, sync: Callable
                ) -> tuple[list[float], list[float], list[float]]:
    """(losses, warm-up seconds, timed seconds) of warmup + steps steps."""
    losses, warm, timed = [], [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = peer.step(fwd)
        sync()
        (warm if i < warmup else timed).append(time.perf_counter() - t0)
        losses.append(loss)
    return [float(x) for x in losses], warm, timed


def run_peer(spec: PeerSpec, style: str, *, steps: int, warmup: int, device: str | None = None,
             amp: bool | None = None, compile: bool | None = None,
             backend: str = "inductor") -> dict:
    """Time the torch peer of ``spec`` in ``style`` ("p0" / "p1"); see the module docstring.

    Returns the benchmark record fields (``loss_step1``, ``step_ms_median``, ``step_ms_p90``,
    ``compile_s``, ``peak_mem_bytes`` (None on a CPU), ``dtype``, ``img_per_sec`` (source
    images: the batch), ``device``) and how the step ran (``compiled``, ``compile_error``,
    ``channels_last``, ``fused_sgd``, ``grad_scaler``, the first losses, versions).
    ``device`` defaults to CUDA when torch sees one; ``amp`` / ``compile`` override the style;
    ``backend`` is torch.compile's (tests use "aot_eager": the same tracing, no code generation).
    """
    method = check_spec(spec)
    if steps < 1 or warmup < 0:
        raise ConfigError(f"run_peer needs steps >= 1 and warmup >= 0, got {steps}, {warmup}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    st = make_style(method, style, device, amp, compile)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    saved = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    if cuda:
        torch.backends.cudnn.benchmark = True  # as every official main.py sets it
        if st.name == "p1":
            torch.set_float32_matmul_precision("high")
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        peer = _Peer(method, spec, st, device)
        compiled, error = False, None
        fwd: Callable = peer.forward_loss
        if st.compile:
            # A fresh dynamo cache: every peer compiles the same code object, and past the
            # recompile limit dynamo would silently run the later ones eagerly.
            torch._dynamo.reset()
            fwd = torch.compile(peer.forward_loss, backend=backend)
            try:  # the first call compiles; a failure leaves the peer untouched: rebuild it
                losses, warm, timed = _time_steps(peer, fwd, steps, warmup, sync)
                compiled = True
            except Exception as e:  # noqa: BLE001 -- any backend failure: fall back, say why
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
                del peer, fwd
                gc.collect()
                peer = _Peer(method, spec, st, device)
                fwd = peer.forward_loss
        if not compiled:
            losses, warm, timed = _time_steps(peer, fwd, steps, warmup, sync)
        peak = int(torch.cuda.max_memory_allocated()) if cuda else None
        fused = peer.fused
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.set_float32_matmul_precision(saved[1])
    del peer, fwd
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    ms = np.asarray(timed) * 1e3
    median = float(np.median(ms))
    return {
        "case": spec.case,
        "impl": f"torch_{style}",
        "style": style,
        "loss_step1": losses[0],
        "losses": losses[:8],
        "step_ms_median": median,
        "step_ms_p90": float(np.percentile(ms, 90)),
        "compile_s": float(sum(warm)) if warm else float(timed[0]),
        "peak_mem_bytes": peak,
        "dtype": _dtype_name(st),
        "img_per_sec": spec.batch / (median / 1e3),
        "device": device,
        "device_kind": _device_kind(device),
        "num_devices": 1,
        "batch": spec.batch,
        "image_size": spec.image_size,
        "steps": steps,
        "warmup": warmup,
        "compiled": compiled,
        "compile_error": error,
        "compile_backend": backend if st.compile else None,
        "channels_last": st.channels_last,
        "fused_sgd": fused,
        "grad_scaler": st.scaler,
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
    }
