"""Export: disco_jax variables as torchvision-named torch tensors, or a detectron2 backbone.

``to_torch(variables, name)`` gives tensors that ``load_state_dict(..., strict=True)`` accepts
(with ``num_batches_tracked`` zeros), and ``from_torch(to_torch(v), name) == v`` exactly.
torch is imported by the functions that need it, never at import time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from disco_jax import models
from disco_jax.convert import arch, names
from disco_jax.convert.formats import HeadLayout
from disco_jax.convert.names import listing
from disco_jax.errors import ConfigError, unknown_name


def _split_encoder(
    variables: Mapping[str, Any], name: str, model_kwargs: Mapping[str, Any]
) -> tuple[dict, dict]:
    """(backbone, head) variables of an Encoder on ``name``; (variables, {}) of a backbone."""
    variables = dict(variables)
    params = variables.get("params", {})
    encoder = "backbone" in params and "backbone" not in {
        lf.path[0] for lf in arch.backbone_leaves(name, 0, model_kwargs)
    }
    if not encoder:
        return variables, {}
    backbone = {c: variables[c]["backbone"] for c in variables if "backbone" in variables[c]}
    head = {c: variables[c]["head"] for c in variables if "head" in variables[c]}
    return backbone, head


def _check_backbone(
    backbone: Mapping[str, Any], name: str, model_kwargs: Mapping[str, Any]
) -> None:
    """The backbone's variables are those of the architecture, with or without its classifier."""
    got = names.shapes(names.leaves(backbone))
    out_leaf = arch.classifier_out(name, model_kwargs)
    nc = got[out_leaf.key][-1] if out_leaf is not None and out_leaf.key in got else 0
    expected = names.shapes(arch.backbone_leaves(name, nc, model_kwargs))
    if got == expected:
        return
    fmt = lambda ks: listing(sorted("/".join(k) for k in ks))  # noqa: E731
    diff = [f"missing {fmt(expected.keys() - got.keys())}"] if expected.keys() - got else []
    if got.keys() - expected.keys():
        diff.append(f"unexpected {fmt(got.keys() - expected.keys())}")
    shapes = [k for k in got.keys() & expected.keys() if got[k] != expected[k]]
    if shapes:
        diff.append(f"wrong shape {fmt(shapes)}")
    raise ConfigError(f"variables do not match {name} {dict(model_kwargs)}: {'; '.join(diff)}")


class _KeyNamer:
    """Torch keys for normalised names: the target's own ``keys`` when given, else the
    default spelling with ``prefix``; collects the names no target key has."""

    def __init__(self, prefix: str, keys: Sequence[str] | None):
        self.prefix, self.given = prefix, keys is not None
        self.resolve = {
            names.norm_torch_key(k[len(prefix) :] if k.startswith(prefix) else k): k
            for k in (keys or ())
        }
        self.unresolved: list[str] = []

    def __call__(self, norm: str, default: str) -> str:
        if self.given and norm not in self.resolve:
            self.unresolved.append(default)
        return self.resolve.get(norm) or self.prefix + default


def _tensors(tree: Mapping[str, Any], layout: HeadLayout | None, namer: _KeyNamer) -> dict:
    """One network's variables as torch tensors, plus a zero ``num_batches_tracked`` per BN."""
    import torch

    norm_of = layout.torch_norm if layout else (lambda k: k)
    key_of = layout.torch_key if layout else (lambda k: k)
    flat = names.flatten(tree)
    tree_leaves = names.leaves(tree)
    state: dict[str, Any] = {}
    for leaf in tree_leaves:
        value = names.to_torch_layout(np.asarray(flat[leaf.key]), leaf)
        key = namer(norm_of(leaf.norm_key), key_of(leaf.default_torch_key()))
        state[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
    for bn in names.bn_modules(tree_leaves):
        norm = norm_of(f"{bn.module}.{names.NUM_BATCHES_TRACKED}")
        default = key_of(f"{names.torch_module(bn.module)}.{names.NUM_BATCHES_TRACKED}")
        state[namer(norm, default)] = torch.zeros((), dtype=torch.long)
    return state


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
    backbone, head = _split_encoder(variables, name, model_kwargs)
    _check_backbone(backbone, name, model_kwargs)
    namer = _KeyNamer(prefix, keys)
    state = _tensors(backbone, None, namer)
    state |= _tensors(head, HeadLayout("", "", module=head_module), namer)
    if namer.unresolved:
        raise ConfigError(
            f"no target key for {len(namer.unresolved)} variable(s): {listing(namer.unresolved)}"
        )
    return state


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

    resnets = [n for n in models.list_models() if models.model_class(n) is resnet.ResNet]
    if name not in resnets:
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
