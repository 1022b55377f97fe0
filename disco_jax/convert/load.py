"""Loading a torch state dict into disco_jax variables: one merge by name.

Both sides are flattened to normalised names (`disco_jax.convert.names`): the checkpoint's
keys below the format's prefix, and the leaves of the model's abstract init (plus each
BatchNorm's ``num_batches_tracked``, accepted and dropped). `merge` takes the checkpoint's value
for every model variable unless its key is ignored, and collects every mismatch (missing,
unexpected, wrongly shaped, ambiguous or unsupported keys); `convert` raises them all in one
`ConfigError` line before anything is compiled. Only then are ignored variables given a fresh
initialisation (a real, compiled init of the part they belong to).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from disco_jax import models
from disco_jax.convert import arch, formats, names
from disco_jax.convert.formats import HeadLayout, SourceFormat
from disco_jax.convert.names import Leaf, listing
from disco_jax.errors import ConfigError


@dataclasses.dataclass
class Converted:
    """What `convert` found, besides the variables (used for the encoder manifest)."""

    variables: dict
    num_classes: int
    head: str | None = None
    head_hidden: int = 0
    embed_dim: int = 0
    ignored: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Target:
    """One model variable (or a BatchNorm's ``num_batches_tracked``) the checkpoint provides."""

    name: str  # normalised name, shared with the checkpoint side (`names.norm_torch_key`)
    key: str  # the checkpoint key it is expected under, prefix included
    leaf: Leaf | None  # None for ``num_batches_tracked``: accepted, no Flax counterpart
    out: tuple[str, ...]  # where it goes in the result (a `names.flatten` key)
    part: int  # which part's initialisation gives it a fresh value


@dataclasses.dataclass
class Merged:
    """`merge`'s result: values by result key (None: needs a fresh value) and the mismatches."""

    values: dict[tuple[str, ...], np.ndarray | None]
    fresh: list[tuple[Target, str]]  # (target, checkpoint key) left at a fresh initialisation
    missing: list[str]
    unexpected: list[str]
    wrong: list[str]
    duplicates: list[str]
    used: int  # checkpoint keys that matched a target


@dataclasses.dataclass(frozen=True)
class _Part:
    """One network whose variables come from the checkpoint (the backbone, or a head)."""

    where: str | None  # sub-tree name in the Encoder layout ('backbone'/'head'), None if plain
    leaves: list[Leaf]
    init: Callable[[], dict]  # () -> `names.flatten` of real variables, called only if needed
    layout: HeadLayout | None = None  # for a head: how the checkpoint names its module

    def targets(self, prefix: str, i: int) -> list[Target]:
        """The part's variables and BatchNorm counters, by name; ``i`` is the part's index."""
        norm = self.layout.torch_norm if self.layout else (lambda k: k)
        key_of = self.layout.torch_key if self.layout else (lambda k: k)
        out = [
            Target(norm(lf.norm_key), prefix + key_of(lf.default_torch_key()), lf, self._out(lf), i)
            for lf in self.leaves
        ]
        for bn in names.bn_modules(self.leaves):
            tracked = f"{bn.module}.{names.NUM_BATCHES_TRACKED}"
            default = key_of(f"{names.torch_module(bn.module)}.{names.NUM_BATCHES_TRACKED}")
            out.append(Target(norm(tracked), prefix + default, None, (), i))
        return out

    def _out(self, leaf: Leaf) -> tuple[str, ...]:
        return leaf.key if self.where is None else (leaf.collection, self.where, *leaf.path)


def checkpoint_names(sd: Mapping[str, Any], prefix: str) -> tuple[dict[str, str], list[str]]:
    """({normalised name: key} of the keys below ``prefix``, keys that share a name)."""
    index: dict[str, str] = {}
    duplicates: list[str] = []
    for key in sd:
        rest = key[len(prefix) :] if key.startswith(prefix) else None
        if rest is None or "." not in rest:
            continue
        norm = names.norm_torch_key(rest)
        if norm in index:
            duplicates.append(
                f"checkpoint keys {index[norm]!r} and {key!r} map to the same variable"
            )
        index[norm] = key
    return index, duplicates


def _take(value: Any, leaf: Leaf, key: str) -> tuple[np.ndarray | None, str | None]:
    """(the checkpoint value in Flax layout, None), or (None, why its shape is wrong)."""
    array = formats.to_numpy(value)
    flax_value = names.to_flax_layout(array, leaf)
    if flax_value.shape != leaf.shape:
        return None, f"{key} (checkpoint {tuple(array.shape)}, model {names.torch_shape(leaf)})"
    return np.array(flax_value, dtype=leaf.dtype), None  # a contiguous copy


def merge(
    sd: Mapping[str, Any],
    prefix: str,
    targets: Sequence[Target],
    ignored: Callable[[str], bool],
    dropped: Callable[[str], bool],
) -> Merged:
    """Match the checkpoint and the model by normalised name; take the checkpoint's value unless
    its key is ``ignored``, and collect every mismatch. A key is unexpected when no target takes
    it and it is neither ``ignored`` nor ``dropped``; a missing key that is ``ignored`` is fine."""
    index, duplicates = checkpoint_names(sd, prefix)
    merged = Merged({}, [], [], [], [], duplicates, 0)
    used: set[str] = set()
    for target in targets:
        key = index.get(target.name)
        if key is not None:
            used.add(key)
        if target.leaf is None:
            continue
        value = None
        if key is None and not ignored(target.key):
            merged.missing.append(target.key)
        elif key is not None and not ignored(key):
            value, wrong = _take(sd[key], target.leaf, key)
            if wrong:
                merged.wrong.append(wrong)
        if value is None:
            merged.fresh.append((target, key or target.key))
        merged.values[target.out] = value
    merged.unexpected = [k for k in sd if k not in used and not dropped(k) and not ignored(k)]
    merged.used = len(used)
    return merged


def _problems(merged: Merged, fmt: SourceFormat, prefix: str) -> list[str]:
    """Every mismatch, each key named once (unsupported keys are not also 'unexpected')."""
    unexpected, unsupported = list(merged.unexpected), []
    for pattern, reason in fmt.unsupported:
        hits = [k for k in unexpected if formats.matches(k, prefix, (pattern,))]
        if hits:
            unexpected = [k for k in unexpected if k not in hits]
            unsupported.append(
                f"{reason}: {listing(hits)}; pass ignore {pattern!r} (--ignore '{pattern}') to"
                " convert the rest without it"
            )
    problems = list(merged.duplicates)
    for what, keys in (
        ("missing", merged.missing),
        ("unexpected", unexpected),
        ("wrong shape for", merged.wrong),
    ):
        if keys:
            problems.append(f"{what} {len(keys)} key(s): {listing(keys)}")
    return problems + unsupported


def _raise_mismatch(
    merged: Merged, fmt: SourceFormat, source: str, prefix: str, arch_name: str
) -> None:
    problems = _problems(merged, fmt, prefix)
    if not problems:
        return
    if merged.used == 0:
        problems.append(
            f"no key matched at all: check the format ({source!r} expects"
            f" {fmt.description}) and the architecture"
        )
    raise ConfigError(
        f"{source} checkpoint does not match {arch_name}: {'; '.join(problems)}"
        " (ignore exact keys or patterns to skip them on purpose)"
    )


def _state_dict(obj: Any) -> Mapping[str, Any]:
    sd = formats.unwrap(obj)
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"state dict keys must be strings, got {listing([repr(k) for k in bad])}")
    return sd


def _num_classes(
    fmt: SourceFormat,
    source: str,
    sd: Mapping[str, Any],
    prefix: str,
    has_head: bool,
    name: str,
    num_classes: int | None,
    model_kwargs: Mapping[str, Any],
) -> int:
    """The classifier width: none with a head; else as given, or read from the checkpoint."""
    if has_head or not fmt.classifier:
        if num_classes:
            raise ConfigError(
                f"{source} checkpoints carry no classifier for {name}; use num_classes=0"
            )
        return 0
    if num_classes is None:
        # Inferred from the classifier's output width, so CIFAR/ImageNet heads both just work.
        out = arch.classifier_out(name, model_kwargs)
        key = None if out is None else prefix + out.default_torch_key()
        num_classes = int(formats.to_numpy(sd[key]).shape[0]) if key in sd else 0
    if num_classes < 0:
        raise ConfigError(f"num_classes must be >= 0, got {num_classes}")
    return num_classes


def _parts(
    name: str,
    num_classes: int,
    model_kwargs: Mapping[str, Any],
    head: tuple[HeadLayout, int, int] | None,
) -> list[_Part]:
    """The backbone, and the head if the checkpoint has one (then in the Encoder layout)."""
    backbone = models.create(name, num_classes=num_classes, **model_kwargs)
    dummy = jnp.zeros((1, 32, 32, 3), jnp.float32)
    parts = [
        _Part(
            "backbone" if head else None,
            arch.backbone_leaves(name, num_classes, model_kwargs),
            lambda: arch.real_init(backbone, dummy),
        )
    ]
    if head is not None:
        layout, embed_dim, hidden = head
        head_model = models.create_head(layout.head, out_dim=embed_dim, hidden_dim=hidden or None)
        width = arch.feature_dim(name, model_kwargs)
        feats = jnp.zeros((1, width), jnp.float32)
        parts.append(
            _Part(
                "head",
                arch.head_leaves(head_model, width),
                lambda: arch.real_init(head_model, feats),
                layout,
            )
        )
    return parts


def _fill_fresh(merged: Merged, parts: Sequence[_Part]) -> list[str]:
    """Give the variables left out a fresh initialisation; returns their checkpoint keys."""
    inits: dict[int, dict] = {}
    for target, _ in merged.fresh:
        if target.part not in inits:
            inits[target.part] = parts[target.part].init()
        fresh = inits[target.part][target.leaf.key]
        merged.values[target.out] = np.array(fresh, target.leaf.dtype)
    return [key for _, key in merged.fresh]


def _arch_name(name: str, num_classes: int, model_kwargs: Mapping[str, Any]) -> str:
    opts = ", ".join(f"{k}={v!r}" for k, v in model_kwargs.items())
    return f"{name}(num_classes={num_classes}{', ' + opts if opts else ''})"


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
    fmt = formats.get(source)
    sd = _state_dict(state_dict)
    models.create(name, num_classes=0, **model_kwargs)  # unknown names/options fail here
    prefix = formats.pick_prefix(fmt, list(sd))
    head = formats.detect_head(fmt, sd, prefix)
    num_classes = _num_classes(
        fmt, source, sd, prefix, head is not None, name, num_classes, model_kwargs
    )
    parts = _parts(name, num_classes, model_kwargs, head)
    ignore = tuple(ignore)
    merged = merge(
        sd,
        prefix,
        [t for i, part in enumerate(parts) for t in part.targets(prefix, i)],
        ignored=lambda k: formats.matches(k, prefix, ignore),
        dropped=lambda k: formats.matches(k, prefix, fmt.drop),
    )
    _raise_mismatch(merged, fmt, source, prefix, _arch_name(name, num_classes, model_kwargs))
    # Only now, with no error left, is a real (compiled) init worth its cost.
    skipped = _fill_fresh(merged, parts)
    variables = traverse_util.unflatten_dict(merged.values)
    if head is None:
        return Converted(variables, num_classes, ignored=skipped)
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
    Raises one ConfigError listing every missing, unexpected and wrongly shaped key not in
    ``ignore``.
    """
    return convert(
        state_dict, name, source, num_classes=num_classes, ignore=ignore, **model_kwargs
    ).variables
