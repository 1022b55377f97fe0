"""The checkpoint formats `from_torch` reads, and how each is recognised and unwrapped.

A format (`SourceFormat`) is a small declarative entry: key prefixes, the projection head
layouts it may carry, keys always dropped and keys known to be unsupported. Nothing here
knows an architecture; `disco_jax.convert.names` maps the keys below the prefix.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from disco_jax.errors import ConfigError, unknown_name


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """A projection head a checkpoint may carry, as torch module paths below the prefix."""

    head: str  # a disco_jax head name (`models.create_head`)
    out_layer: str  # the last Linear: its output width is the embedding size
    hidden_layer: str | None = None  # the first Linear of a two-layer head: its width is hidden
    # The head's torch module, standing in for the 'fc' of disco_jax's head names (fc_0 / fc_1 /
    # fc_3 / fc): SwAV's 'projection_head', DisCo's 'classifier' on EfficientNet/MobileNetV3.
    module: str = "fc"

    def torch_norm(self, norm_key: str) -> str:
        """A head leaf's normalised key as the checkpoint spells it."""
        if self.module != "fc" and (norm_key.startswith("fc_") or norm_key.startswith("fc.")):
            return self.module.replace(".", "_") + norm_key[2:]
        return norm_key

    def torch_key(self, default: str) -> str:
        """A head key (default torch spelling, no prefix) as the checkpoint spells it: only the
        module is renamed; its children are numbered ('0', '1', '3') and keep their names."""
        if self.module != "fc" and default.startswith("fc."):
            return self.module + default[2:]
        return default


@dataclasses.dataclass(frozen=True)
class SourceFormat:
    """How a family of checkpoints lays out its keys."""

    description: str
    # Tried in order; the first that some key starts with is stripped ('' always matches).
    prefixes: tuple[str, ...] = ("module.", "")
    # Projection heads, most specific first; the first whose layers are present is used, and
    # then the backbone has no classifier (the head takes the classifier's place).
    heads: tuple[HeadLayout, ...] = ()
    # fnmatch patterns of keys that are never converted (momentum encoder, queue, ...).
    drop: tuple[str, ...] = ()
    # (pattern, reason) of keys that have no disco_jax counterpart yet.
    unsupported: tuple[tuple[str, str], ...] = ()
    # Whether the backbone's own classifier may be in the checkpoint.
    classifier: bool = True


FORMATS: dict[str, SourceFormat] = {
    "torchvision": SourceFormat("a torchvision model's state_dict (keys like 'layer1.0.conv1')"),
    # timm's ResNets use torchvision's names; its other families mostly do not, and then the
    # mismatch is reported key by key.
    "timm": SourceFormat("a timm model's state_dict with torchvision-style names"),
    "moco": SourceFormat(
        "MoCo v1/v2 (facebookresearch/moco): 'state_dict' with 'module.encoder_q.*'",
        prefixes=("module.encoder_q.", "encoder_q."),
        heads=(HeadLayout("mlp", "fc.2", "fc.0"), HeadLayout("linear", "fc")),
        drop=("module.encoder_k.*", "encoder_k.*", "module.queue*", "queue*"),
        classifier=False,
    ),
    "swav": SourceFormat(
        "SwAV (facebookresearch/swav): 'module.*' ResNet keys, projection head, prototypes",
        # Linear -> BatchNorm1d -> ReLU -> Linear (hidden_mlp > 0) or one Linear (hidden_mlp 0).
        heads=(
            HeadLayout("mlp_bn", "projection_head.3", "projection_head.0", "projection_head"),
            HeadLayout("linear", "projection_head", module="projection_head"),
        ),
        drop=("module.prototypes.*", "prototypes.*"),
        classifier=False,
    ),
    # tonylins/simclr-converter writes {'state_dict': torchvision resnet50x{1,2,4}} (x2/x4 widen
    # every layer like SwAV: use swav_resnet50w2/w4). Its fc.bias is never set (a converter bug:
    # it assigns fc.weight.bias), which does not matter for an encoder (convert_file drops the
    # classifier after checking its shape). SEED re-hosts it as {'model': ...} with
    # 'module.module.module.' in front.
    "simclr": SourceFormat(
        "SimCLR converted to torch (tonylins/simclr-converter): torchvision ResNet-50 names",
        prefixes=("module.module.module.", "module.", ""),
    ),
    # jacobswan1/SEED main.py saves the DDP-wrapped SEED module: the student (with its
    # Linear(d, d) -> ReLU -> Linear(d, 128) fc when --student_mlp), the frozen teacher, the queue.
    "seed": SourceFormat(
        "SEED student (jacobswan1/SEED): 'state_dict' with 'module.student.*'",
        prefixes=("module.student.", "student."),
        heads=(HeadLayout("mlp", "fc.2", "fc.0"), HeadLayout("linear", "fc")),
        drop=("module.teacher.*", "teacher.*", "module.queue*", "queue*"),
        classifier=False,
    ),
    # Yuting-Gao/DisCo-pytorch (builder_kq_mse_largeembedding_2048.py): the student is encoder_q
    # with Linear(d, 2048) -> ReLU -> Linear(2048, 128) as 'classifier' (timm EfficientNet /
    # MobileNetV3) or 'fc' (ResNets); encoder_k, both teacher copies and the queue are dropped.
    "disco": SourceFormat(
        "DisCo student (Yuting-Gao/DisCo-pytorch): 'state_dict' with 'module.encoder_q.*'",
        prefixes=("module.encoder_q.", "encoder_q."),
        heads=(
            HeadLayout("mlp", "classifier.2", "classifier.0", "classifier"),
            HeadLayout("mlp", "fc.2", "fc.0"),
        ),
        drop=(
            "module.encoder_k.*",
            "encoder_k.*",
            "module.teacher_encoder_*",
            "teacher_encoder_*",
            "module.queue*",
            "queue*",
        ),
        classifier=False,
    ),
}


def get(source: str) -> SourceFormat:
    if source not in FORMATS:
        raise unknown_name("source format", source, FORMATS)
    return FORMATS[source]


def to_numpy(value: Any) -> np.ndarray:
    """A host array of a torch tensor or anything array-like (no torch import needed)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype.itemsize < 4:
            value = value.float()  # numpy has no bfloat16; float16 widened the same way
        return value.numpy()
    return np.asarray(value)


def unwrap(obj: Any) -> Mapping[str, Any]:
    """The state dict inside a training checkpoint ({'state_dict': ...}, {'model': ...})."""
    if not isinstance(obj, Mapping):
        raise ConfigError(f"expected a state dict (a mapping of names to tensors), got {type(obj)}")
    for container in ("state_dict", "model"):
        inner = obj.get(container)
        if isinstance(inner, Mapping):
            return inner
    return obj


def pick_prefix(fmt: SourceFormat, keys: Sequence[str]) -> str:
    """The format's first prefix that some key starts with."""
    for prefix in fmt.prefixes:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return fmt.prefixes[-1] if "" in fmt.prefixes else fmt.prefixes[0]


def detect_head(
    fmt: SourceFormat, sd: Mapping[str, Any], prefix: str
) -> tuple[HeadLayout, int, int] | None:
    """(layout, embed_dim, hidden) of the first head layout whose Linear layers are present."""
    for layout in fmt.heads:
        out_key = f"{prefix}{layout.out_layer}.weight"
        hidden_key = f"{prefix}{layout.hidden_layer}.weight" if layout.hidden_layer else None
        if out_key in sd and (hidden_key is None or hidden_key in sd):
            embed = int(to_numpy(sd[out_key]).shape[0])
            hidden = int(to_numpy(sd[hidden_key]).shape[0]) if hidden_key else 0
            return layout, embed, hidden
    return None


def matches(key: str, prefix: str, patterns: Sequence[str]) -> bool:
    """Whether ``key``, or ``key`` without ``prefix`` (if it has it), matches a pattern."""
    stripped = key[len(prefix) :] if key.startswith(prefix) else None
    return any(
        fnmatch.fnmatchcase(key, p) or (stripped is not None and fnmatch.fnmatchcase(stripped, p))
        for p in patterns
    )
