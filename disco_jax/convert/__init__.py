"""PyTorch checkpoints <-> disco_jax variables, by the naming rule of `disco_jax.convert.names`.

- ``from_torch(state_dict, name, source)`` converts a state dict into the variables of
  ``disco_jax.models.create(name, num_classes, **model_kwargs)``; formats that carry a
  projection head (MoCo) give the variables of an ``Encoder`` instead:
  ``{"params": {"backbone", "head"}, "batch_stats": {"backbone"}}``. The key mapping is derived
  from the model's own variable tree (``jax.eval_shape`` of init), so any registered model that
  follows the naming rule converts without a hand-written table. Every parameter and BatchNorm
  statistic must be accounted for: missing keys, unexpected keys and shape mismatches raise one
  `ConfigError` listing them, except keys named in ``ignore`` (exact keys or fnmatch patterns,
  matched against the full key and the key without the format's prefix). A model variable whose
  key is ignored keeps a fresh initialisation (e.g. ``ignore=["fc.*"]`` for a new classifier).
- ``to_torch(variables, name)`` exports torchvision-named tensors that ``load_state_dict(...,
  strict=True)`` accepts (with ``num_batches_tracked`` zeros), and
  ``from_torch(to_torch(v), name) == v`` exactly.
- ``load_torch_file(path)`` reads a ``.pth``/``.pth.tar`` with ``weights_only=True``: a file
  that needs pickled code is refused, never executed.
- ``convert_file`` (and ``python -m disco_jax.convert``) writes an encoder directory that
  ``teacher.init`` accepts.

Source formats (`FORMATS`) are small declarative entries: key prefixes, an optional projection
head layout, keys always dropped and keys known to be unsupported: torchvision, timm, moco,
swav (projection head with BN -> `mlp_bn`), simclr, seed and disco (student checkpoints).

torch is imported lazily, only by the functions that need it; training never imports it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from disco_jax import models
from disco_jax.convert import names
from disco_jax.convert.names import Leaf
from disco_jax.errors import ConfigError, unknown_name

__all__ = [
    "FORMATS",
    "HeadLayout",
    "SourceFormat",
    "convert",
    "convert_file",
    "detectron2_name",
    "export_encoder",
    "from_torch",
    "load_torch_file",
    "to_detectron2",
    "to_torch",
]

# Images for the abstract init; eval_shape never allocates, so the size costs nothing.
_ABSTRACT_IMAGE = (1, 224, 224, 3)
# Longest key list shown in one error line.
_MAX_LISTED = 8


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


@dataclasses.dataclass(frozen=True)
class _Part:
    """One network whose variables come from the checkpoint (the backbone, or a head)."""

    where: str | None  # sub-tree name in the Encoder layout ('backbone'/'head'), None if plain
    prefix: str
    leaves: list[Leaf]
    init: Any  # () -> real variables, only called when an ignored variable needs a value
    layout: HeadLayout | None = None  # for a head: how the checkpoint names its module

    def norm(self, norm_key: str) -> str:
        return norm_key if self.layout is None else self.layout.torch_norm(norm_key)

    def default_key(self, leaf: Leaf) -> str:
        norm = self.norm(leaf.norm_key)
        if norm == leaf.norm_key:
            return self.prefix + leaf.default_torch_key()
        # Only the head's module is renamed; its children are numbered ('0', '1', '3').
        module, _, rest = norm.partition(".")
        head = self.layout.module if self.layout else ""
        tail = module[len(head.replace(".", "_")) :].replace("_", ".")
        return f"{self.prefix}{head}{tail}.{rest}"


@dataclasses.dataclass
class Converted:
    """What `convert` found, besides the variables (used for the encoder manifest)."""

    variables: dict
    num_classes: int
    head: str | None = None
    head_hidden: int = 0
    embed_dim: int = 0
    ignored: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------- helpers


def _format(source: str) -> SourceFormat:
    if source not in FORMATS:
        raise unknown_name("source format", source, FORMATS)
    return FORMATS[source]


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown}, ... and {more} more" if more > 0 else shown


def _to_numpy(value: Any) -> np.ndarray:
    """A host array of a torch tensor or anything array-like (no torch import needed)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype.itemsize < 4:
            value = value.float()  # numpy has no bfloat16; float16 widened the same way
        return value.numpy()
    return np.asarray(value)


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """The state dict inside a training checkpoint ({'state_dict': ...}, {'model': ...})."""
    if not isinstance(obj, Mapping):
        raise ConfigError(f"expected a state dict (a mapping of names to tensors), got {type(obj)}")
    for container in ("state_dict", "model"):
        inner = obj.get(container)
        if isinstance(inner, Mapping):
            return inner
    return obj


def _model_key(name: str, num_classes: int, model_kwargs: Mapping[str, Any]) -> tuple:
    return (name, num_classes, tuple(sorted(model_kwargs.items())))


@functools.lru_cache(maxsize=32)
def _abstract_backbone(key: tuple) -> tuple[list[Leaf], int]:
    """(leaves, output width) of ``create(name, num_classes, **kwargs)``, without allocating."""
    name, num_classes, kwargs = key
    model = models.create(name, num_classes=num_classes, **dict(kwargs))
    x = jax.ShapeDtypeStruct(_ABSTRACT_IMAGE, jnp.float32)
    out, variables = jax.eval_shape(
        functools.partial(model.init_with_output, train=False), jax.random.key(0), x
    )
    return names.leaves(variables), int(out.shape[-1])


def _backbone_leaves(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> list[Leaf]:
    try:
        return _abstract_backbone(_model_key(name, num_classes, kwargs))[0]
    except TypeError:  # an unhashable option: skip the cache
        return _abstract_backbone.__wrapped__(_model_key(name, num_classes, kwargs))[0]


def feature_dim(name: str, kwargs: Mapping[str, Any]) -> int:
    """The pooled feature width of a backbone."""
    return _abstract_backbone.__wrapped__(_model_key(name, 0, kwargs))[1]


def _classifier_leaves(name: str, kwargs: Mapping[str, Any]) -> list[Leaf]:
    """The variables that exist only with a classifier: the difference of num_classes 1 and 0."""
    bare = {(lf.collection, lf.path) for lf in _backbone_leaves(name, 0, kwargs)}
    return [lf for lf in _backbone_leaves(name, 1, kwargs) if (lf.collection, lf.path) not in bare]


def _classifier_out(name: str, kwargs: Mapping[str, Any]) -> Leaf | None:
    """The classifier's last Dense kernel, whose output width is num_classes."""
    kernels = [lf for lf in _classifier_leaves(name, kwargs) if lf.is_kernel and len(lf.shape) == 2]
    return kernels[-1] if kernels else None


def _shape_tree_of(tree_leaves: list[Leaf]) -> dict:
    return {(lf.collection, lf.path): lf.shape for lf in tree_leaves}


def _real_init(model: Any, *inputs: Any) -> dict:
    # Compiled (op-by-op init takes seconds for a ResNet) but run once, so on CPU XLA's backend
    # optimisations would cost more compile time than they save.
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    variables = jax.jit(model.init, compiler_options=opts)(jax.random.key(0), *inputs)
    return jax.tree_util.tree_map(np.asarray, dict(variables))


def _matches(key: str, stripped: str | None, patterns: Sequence[str]) -> bool:
    return any(
        fnmatch.fnmatchcase(key, p) or (stripped is not None and fnmatch.fnmatchcase(stripped, p))
        for p in patterns
    )


def _pick_prefix(fmt: SourceFormat, keys: Sequence[str]) -> str:
    for prefix in fmt.prefixes:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return fmt.prefixes[-1] if "" in fmt.prefixes else fmt.prefixes[0]


def _detect_head(
    fmt: SourceFormat, sd: Mapping[str, Any], prefix: str
) -> tuple[HeadLayout, int, int] | None:
    """(layout, embed_dim, hidden) of the first head layout whose Linear layers are present."""
    for layout in fmt.heads:
        out_key = f"{prefix}{layout.out_layer}.weight"
        hidden_key = f"{prefix}{layout.hidden_layer}.weight" if layout.hidden_layer else None
        if out_key in sd and (hidden_key is None or hidden_key in sd):
            embed = int(_to_numpy(sd[out_key]).shape[0])
            hidden = int(_to_numpy(sd[hidden_key]).shape[0]) if hidden_key else 0
            return layout, embed, hidden
    return None


# ---------------------------------------------------------------------------- import


def convert(
    state_dict: Mapping[str, Any],
    name: str,
    source: str = "torchvision",
    *,
    num_classes: int | None = None,
    ignore: Sequence[str] = (),
    **model_kwargs: Any,
) -> Converted:
    """`from_torch` plus what was found (head, dimensions); see there."""
    fmt = _format(source)
    sd = _unwrap(state_dict)
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        shown = _listing([repr(k) for k in bad])
        raise ConfigError(f"state dict keys must be strings, got {shown}")
    models.create(name, num_classes=0, **model_kwargs)  # unknown names/options fail here
    prefix = _pick_prefix(fmt, list(sd))
    strip = lambda k: k[len(prefix) :] if k.startswith(prefix) else None  # noqa: E731
    ignore = tuple(ignore)
    ignored = lambda k: _matches(k, strip(k), ignore)  # noqa: E731

    head = _detect_head(fmt, sd, prefix)
    if head is not None or not fmt.classifier:
        if num_classes:
            raise ConfigError(
                f"{source} checkpoints carry no classifier for {name}; use num_classes=0"
            )
        num_classes = 0
    elif num_classes is None:
        # Inferred from the classifier's output width, so CIFAR/ImageNet heads both just work.
        out = _classifier_out(name, model_kwargs)
        key = None if out is None else prefix + out.default_torch_key()
        num_classes = int(_to_numpy(sd[key]).shape[0]) if key in sd else 0
    if num_classes < 0:
        raise ConfigError(f"num_classes must be >= 0, got {num_classes}")

    backbone = models.create(name, num_classes=num_classes, **model_kwargs)
    dummy = jnp.zeros((1, 32, 32, 3), jnp.float32)
    parts = [
        _Part(
            "backbone" if head else None,
            prefix,
            _backbone_leaves(name, num_classes, model_kwargs),
            lambda: _real_init(backbone, dummy),
        )
    ]
    if head is not None:
        layout, embed_dim, hidden = head
        head_model = models.create_head(layout.head, out_dim=embed_dim, hidden_dim=hidden or None)
        feats = jnp.zeros((1, feature_dim(name, model_kwargs)), jnp.float32)
        head_leaves = names.leaves(jax.eval_shape(head_model.init, jax.random.key(0), feats))
        parts.append(
            _Part("head", prefix, head_leaves, lambda: _real_init(head_model, feats), layout)
        )

    # Normalised key -> checkpoint key, for keys under the prefix.
    index: dict[str, str] = {}
    for key in sd:
        rest = strip(key)
        if rest is None or "." not in rest:
            continue
        norm = names.norm_torch_key(rest)
        if norm in index:
            raise ConfigError(
                f"checkpoint keys {index[norm]!r} and {key!r} map to the same variable"
            )
        index[norm] = key

    used: set[str] = set()
    missing: list[str] = []
    wrong: list[str] = []
    skipped: list[str] = []  # model variables left at their fresh initialisation
    out: dict[str | None, dict] = {}
    fresh: list[tuple[_Part, Leaf, str]] = []  # variables that keep a fresh initialisation
    for part in parts:
        tree: dict = {}
        for leaf in part.leaves:
            key = index.get(part.norm(leaf.norm_key))
            wanted = key or part.default_key(leaf)
            value = None
            if key is not None:
                used.add(key)
                if not ignored(key):
                    value = names.to_flax_layout(_to_numpy(sd[key]), leaf)
                    if value.shape != leaf.shape:
                        got = tuple(_to_numpy(sd[key]).shape)
                        wrong.append(f"{key} (checkpoint {got}, model {names.torch_shape(leaf)})")
                        value = None
                    else:
                        value = np.array(value, dtype=leaf.dtype)  # a contiguous copy
            elif not ignored(wanted):
                missing.append(wanted)
            if value is None:
                fresh.append((part, leaf, wanted))
            else:
                names.set_path(tree, leaf.collection, leaf.path, value)
        for bn in names.bn_modules(part.leaves):
            key = index.get(part.norm(f"{bn.module}.{names.NUM_BATCHES_TRACKED}"))
            if key is not None:
                used.add(key)
        out[part.where] = tree

    unexpected = [
        k for k in sd if k not in used and not _matches(k, strip(k), fmt.drop) and not ignored(k)
    ]
    for pattern, reason in fmt.unsupported:
        hits = [k for k in unexpected if _matches(k, strip(k), (pattern,))]
        if hits:
            raise ConfigError(
                f"{reason}: {_listing(hits)}; pass ignore {pattern!r} (--ignore '{pattern}') to"
                " convert the rest without it"
            )
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} key(s): {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
        if wrong:
            problems.append(f"wrong shape for {len(wrong)} key(s): {_listing(wrong)}")
        if len(used) == 0:
            problems.append(
                f"no key matched at all: check the format ({source!r} expects"
                f" {fmt.description}) and the architecture"
            )
        opts = ", ".join(f"{k}={v!r}" for k, v in model_kwargs.items())
        arch = f"{name}(num_classes={num_classes}{', ' + opts if opts else ''})"
        raise ConfigError(
            f"{source} checkpoint does not match {arch}: {'; '.join(problems)}"
            " (ignore exact keys or patterns to skip them on purpose)"
        )

    # Only now, with no error left, is a real (compiled) init worth its cost.
    inits: dict[int, dict] = {}
    for part, leaf, key in fresh:
        if id(part) not in inits:
            inits[id(part)] = part.init()
        node = inits[id(part)][leaf.collection]
        for p in leaf.path:
            node = node[p]
        names.set_path(out[part.where], leaf.collection, leaf.path, np.array(node, leaf.dtype))
        skipped.append(key)

    if head is None:
        return Converted(out[None], num_classes, ignored=skipped)
    variables = {"params": {"backbone": out["backbone"].get("params", {})}}
    if "batch_stats" in out["backbone"]:
        variables["batch_stats"] = {"backbone": out["backbone"]["batch_stats"]}
    for collection, sub in out["head"].items():
        variables.setdefault(collection, {})["head"] = sub
    layout, embed_dim, hidden = head
    return Converted(variables, 0, layout.head, hidden, embed_dim, ignored=skipped)


def from_torch(
    state_dict: Mapping[str, Any],
    name: str,
    source: str = "torchvision",
    *,
    num_classes: int | None = None,
    ignore: Sequence[str] = (),
    **model_kwargs: Any,
) -> dict:
    """Variables of ``models.create(name, num_classes, **model_kwargs)`` from a torch state dict.

    ``state_dict`` maps names to torch tensors or array-likes (a training checkpoint with a
    ``state_dict``/``model`` entry is unwrapped). ``num_classes=None`` reads the classifier's
    width from the checkpoint (0 when it has none); formats with a projection head (``moco``)
    return Encoder variables ``{"params": {"backbone", "head"}, "batch_stats": {"backbone"}}``.
    Raises ConfigError listing missing, unexpected and wrongly shaped keys not in ``ignore``.
    """
    return convert(
        state_dict, name, source, num_classes=num_classes, ignore=ignore, **model_kwargs
    ).variables


# ---------------------------------------------------------------------------- export


def to_torch(
    variables: Mapping[str, Any],
    name: str,
    *,
    prefix: str = "",
    keys: Sequence[str] | None = None,
    head_module: str = "fc",
    **model_kwargs: Any,
) -> dict[str, Any]:
    """torch tensors named like torchvision's, loadable with ``strict=True``.

    ``variables`` is the ``{"params", "batch_stats"}`` of ``create(name, ..., **model_kwargs)``
    (with or without its classifier) or of an Encoder built on it (its head is exported under
    the head's own names, e.g. MoCo's ``fc.0``/``fc.2``). Every key gets ``prefix``. Names are
    rebuilt by `names.torch_module` ('_' -> '.' except in timm's ``conv_stem``-like names),
    which is right for every model registered here; pass the target's ``keys`` (e.g.
    ``model.state_dict().keys()``) for other torch names that contain '_'.
    ``head_module`` renames the head's 'fc' (e.g. 'projection_head' for SwAV, 'classifier' for
    DisCo's EfficientNet students).
    """
    import torch

    variables = dict(variables)
    params = variables.get("params", {})
    encoder = "backbone" in params and "backbone" not in {
        lf.path[0] for lf in _backbone_leaves(name, 0, model_kwargs)
    }
    if encoder:
        backbone = {c: variables[c]["backbone"] for c in variables if "backbone" in variables[c]}
        head = {c: variables[c]["head"] for c in variables if "head" in variables[c]}
    else:
        backbone, head = variables, {}

    # Check the backbone against the architecture, with or without its classifier.
    got = _shape_tree_of(names.leaves(backbone))
    out_leaf = _classifier_out(name, model_kwargs)
    nc = 0
    if out_leaf is not None and (out_leaf.collection, out_leaf.path) in got:
        nc = got[(out_leaf.collection, out_leaf.path)][-1]
    expected = _shape_tree_of(_backbone_leaves(name, nc, model_kwargs))
    if got != expected:
        fmt = lambda ks: _listing(sorted("/".join((c, *p)) for c, p in ks))  # noqa: E731
        diff = [f"missing {fmt(expected.keys() - got.keys())}"] if expected.keys() - got else []
        if got.keys() - expected.keys():
            diff.append(f"unexpected {fmt(got.keys() - expected.keys())}")
        shapes = [k for k in got.keys() & expected.keys() if got[k] != expected[k]]
        if shapes:
            diff.append(f"wrong shape {fmt(shapes)}")
        raise ConfigError(f"variables do not match {name} {dict(model_kwargs)}: {'; '.join(diff)}")

    resolve = {
        names.norm_torch_key(k[len(prefix) :] if k.startswith(prefix) else k): k
        for k in (keys or ())
    }
    unresolved: list[str] = []

    def torch_key(norm: str, default: str) -> str:
        if keys is not None and norm not in resolve:
            unresolved.append(default)
        return resolve.get(norm) or prefix + default

    state: dict[str, Any] = {}
    layout = HeadLayout("", "", module=head_module)

    def head_default(key: str) -> str:
        return head_module + key[2:] if key.startswith("fc.") else key

    for tree, is_head in ((backbone, False), (head, True)):
        norm_of = layout.torch_norm if is_head else (lambda k: k)
        default_of = head_default if is_head else (lambda k: k)
        tree_leaves = names.leaves(tree)
        for leaf in tree_leaves:
            node = tree[leaf.collection]
            for p in leaf.path:
                node = node[p]
            key = torch_key(norm_of(leaf.norm_key), default_of(leaf.default_torch_key()))
            value = names.to_torch_layout(np.asarray(node), leaf)
            state[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        for bn in names.bn_modules(tree_leaves):
            norm = norm_of(f"{bn.module}.{names.NUM_BATCHES_TRACKED}")
            default = default_of(f"{names.torch_module(bn.module)}.{names.NUM_BATCHES_TRACKED}")
            state[torch_key(norm, default)] = torch.zeros((), dtype=torch.long)
    if unresolved:
        raise ConfigError(
            f"no target key for {len(unresolved)} variable(s): {_listing(unresolved)}"
        )
    return state


# ---------------------------------------------------------------------------- detectron2


def detectron2_name(key: str) -> str:
    """A torchvision ResNet key renamed as MoCo's ``convert-pretrain-to-detectron2.py`` does.

    Not in a layer: ``stem.`` in front; ``layerN`` -> ``res{N+1}``; ``bn1/2/3`` ->
    ``conv1/2/3.norm``; ``downsample.0`` -> ``shortcut``, ``downsample.1`` -> ``shortcut.norm``.
    """
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_detectron2(variables: Mapping[str, Any], name: str, **model_kwargs: Any) -> dict:
    """A detectron2 backbone checkpoint ``{"model": {name: ndarray}, "__author__",
    "matching_heuristics": True}`` of a torchvision-layout ResNet (or of an Encoder on one).

    Unlike MoCo's script, the classifier / projection head (``fc.*``, which detectron2 would
    only report as unused) and the all-zero ``num_batches_tracked`` are left out.
    """
    from disco_jax.models import resnet

    ctor = models._MODELS.get(name)  # noqa: SLF001 -- the registry is this package's own
    if ctor is None or ctor.func is not resnet.ResNet:
        resnets = [n for n, c in models._MODELS.items() if c.func is resnet.ResNet]  # noqa: SLF001
        raise ConfigError(
            f"detectron2 export needs a torchvision-layout ResNet ({', '.join(resnets)}), got"
            f" {name!r}"
        )
    params = variables.get("params", {})
    if "backbone" in params:
        variables = {c: variables[c]["backbone"] for c in variables if "backbone" in variables[c]}
    state = to_torch(variables, name, **model_kwargs)
    out = {
        detectron2_name(k): v.numpy()
        for k, v in state.items()
        if not k.startswith("fc.") and not k.endswith(names.NUM_BATCHES_TRACKED)
    }
    return {"model": out, "__author__": "disco_jax", "matching_heuristics": True}


def export_encoder(
    encoder_dir: str, output: str, fmt: str = "torchvision", prefix: str = ""
) -> dict:
    """Write an encoder directory (a converted teacher or a trained student's ``encoder``) as a
    torch state dict (``fmt='torchvision'``: ``torch.save`` of torchvision/timm-named tensors,
    head included) or a detectron2 backbone (``fmt='detectron2'``: a pickle for ``.pkl``, else
    ``torch.save`` of the same dict with tensors). Returns the encoder's manifest."""
    import pickle

    import torch

    from disco_jax import checkpoint

    variables, manifest = checkpoint.load_encoder(encoder_dir)
    name, kwargs = manifest["model"], dict(manifest.get("model_kwargs", {}))
    if fmt == "torchvision":
        torch.save(to_torch(variables, name, prefix=prefix, **kwargs), output)
    elif fmt == "detectron2":
        obj = to_detectron2(variables, name, **kwargs)
        if output.endswith(".pkl"):
            with open(output, "wb") as f:
                pickle.dump(obj, f)
        else:
            obj = {**obj, "model": {k: torch.from_numpy(v) for k, v in obj["model"].items()}}
            torch.save(obj, output)
    else:
        raise unknown_name("export format", fmt, ("torchvision", "detectron2"))
    return manifest


# ---------------------------------------------------------------------------- files


def load_torch_file(path: str) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with one-line errors.

    A checkpoint that needs arbitrary pickled code is refused and that code is never run.
    """
    import pickle

    import torch

    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint file {path!r} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"refused {path!r}: it needs pickled code to load, which was NOT executed"
            f" (weights_only loading failed: {first}); re-save it as a plain state_dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot read checkpoint {path!r} (truncated or not a torch file?): {first}"
        ) from None


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shape_tree(tree: Any) -> dict:
    return _shape_tree_of(names.leaves(tree))


def convert_file(
    source: str,
    name: str,
    path: str,
    output_dir: str,
    *,
    num_classes: int | None = None,
    ignore: Sequence[str] = (),
    **model_kwargs: Any,
) -> dict:
    """Convert a torch checkpoint file into an encoder directory; returns its manifest.

    The encoder is the backbone without its classifier (whose weights are still checked) plus
    the checkpoint's projection head if the format has one, else the ``identity`` head.
    """
    from disco_jax import checkpoint

    _format(source)
    models.create(name, num_classes=0, **model_kwargs)  # fail on names before reading the file
    result = convert(
        _unwrap(load_torch_file(path)),
        name,
        source,
        num_classes=num_classes,
        ignore=ignore,
        **model_kwargs,
    )
    if result.head is None:
        # The encoder has no classifier: drop its variables after they were checked.
        cls = {(lf.collection, lf.path) for lf in _classifier_leaves(name, model_kwargs)}
        backbone: dict = {}
        for leaf in names.leaves(result.variables):
            if (leaf.collection, leaf.path) in cls:
                continue
            node = result.variables[leaf.collection]
            for p in leaf.path:
                node = node[p]
            names.set_path(backbone, leaf.collection, ("backbone", *leaf.path), node)
        variables = backbone
        head, hidden, embed_dim = "identity", 0, feature_dim(name, model_kwargs)
    else:
        variables = result.variables
        head, hidden, embed_dim = result.head, result.head_hidden, result.embed_dim

    # The trainer rebuilds exactly this Encoder from the manifest (models.build_encoder).
    encoder = models.Encoder(
        backbone=models.create(name, num_classes=0, **model_kwargs),
        head=models.create_head(head, out_dim=embed_dim, hidden_dim=hidden or None),
    )
    x = jax.ShapeDtypeStruct(_ABSTRACT_IMAGE, jnp.float32)
    want = _shape_tree(
        jax.eval_shape(functools.partial(encoder.init, train=False), jax.random.key(0), x)
    )
    if _shape_tree(variables) != want:  # a bug here, not a user error
        raise AssertionError("converted variables do not match the encoder the trainer builds")

    manifest = {
        "model": name,
        "model_kwargs": dict(model_kwargs),
        "head": head,
        "head_hidden": hidden,
        "embed_dim": embed_dim,
        "source_format": source,
        "source_file": os.path.abspath(path),
        "source_sha256": sha256_file(path),
        "source_num_classes": result.num_classes,
        "source_ignored": list(ignore),
    }
    checkpoint.save_encoder(output_dir, variables, manifest)
    return manifest
