"""The naming rule between Flax variable trees and torchvision state_dict keys.

Every disco_jax model names its modules so that joining the module components of a Flax
variable path with '_' gives the torch module path with '.' replaced by '_' (see the
`disco_jax.models.resnet` docstring). So a torch key is matched to a Flax leaf by normalising
both sides to ``"<module path with '_'>.<torch leaf name>"``; nothing here knows any
architecture. Leaves map as:

====================  ==========  ==================  =========================================
Flax collection       Flax leaf   torch leaf          layout
====================  ==========  ==================  =========================================
params                kernel      weight              conv (kh, kw, in/g, out) <- (out, in/g,
                                                      kh, kw); dense (in, out) <- (out, in)
params                scale       weight              as is (BatchNorm / LayerNorm)
params                bias        bias                as is
params                embedding   weight              as is
batch_stats           mean        running_mean        as is
batch_stats           var         running_var         as is
====================  ==========  ==================  =========================================

torch's ``num_batches_tracked`` belongs to every BatchNorm (a module with ``mean`` in
batch_stats) and has no Flax counterpart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from disco_jax.errors import ConfigError

# (collection, Flax leaf name) -> torch leaf name.
LEAF_TO_TORCH: dict[tuple[str, str], str] = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("params", "embedding"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
NUM_BATCHES_TRACKED = "num_batches_tracked"
# Longest key list shown in one error line.
MAX_LISTED = 8
# torch module names that contain '_' themselves (timm's blocks and heads, MCL's and SwAV's
# heads, lukemelas' EfficientNet, whose names all start with '_'): `torch_module` keeps them
# whole.
TORCH_NAMES_WITH_UNDERSCORE = frozenset(
    {
        "conv_stem",
        "conv_head",
        "conv_dw",
        "conv_pw",
        "conv_pwl",
        "conv_reduce",
        "conv_expand",
        "proj_head",
        "projection_head",
        "_conv_stem",
        "_bn0",
        "_bn1",
        "_bn2",
        "_blocks",
        "_expand_conv",
        "_depthwise_conv",
        "_se_reduce",
        "_se_expand",
        "_project_conv",
        "_conv_head",
    }
)
# The most '_'-separated parts of one such name ('_conv_stem': '', 'conv', 'stem').
_MAX_NAME_PARTS = max(len(n.split("_")) for n in TORCH_NAMES_WITH_UNDERSCORE)


def torch_module(module: str) -> str:
    """``blocks_0_0_se_conv_reduce`` -> ``blocks.0.0.se.conv_reduce``,
    ``_blocks_3__se_reduce`` -> ``_blocks.3._se_reduce`` (longest known name first)."""
    parts, out, i = module.split("_"), [], 0
    while i < len(parts):
        for n in range(min(_MAX_NAME_PARTS, len(parts) - i), 1, -1):
            name = "_".join(parts[i : i + n])
            if name in TORCH_NAMES_WITH_UNDERSCORE:
                out.append(name)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One Flax variable: where it lives in the tree and what torch calls it."""

    collection: str
    path: tuple[str, ...]  # module names, then the leaf name
    shape: tuple[int, ...]
    dtype: Any

    @property
    def key(self) -> tuple[str, ...]:
        """The `flatten` key: ``(collection, *path)``."""
        return (self.collection, *self.path)

    @property
    def module(self) -> str:
        return "_".join(self.path[:-1])

    @property
    def torch_leaf(self) -> str:
        try:
            return LEAF_TO_TORCH[(self.collection, self.path[-1])]
        except KeyError:
            raise ConfigError(
                f"no torch counterpart for Flax variable {self.collection}/{'/'.join(self.path)}"
            ) from None

    @property
    def norm_key(self) -> str:
        """The normalised name shared with `norm_torch_key`."""
        return f"{self.module}.{self.torch_leaf}"

    def default_torch_key(self) -> str:
        """The torch key: '_' -> '.', except inside the known torch names with '_' (timm's
        ``conv_stem`` / ``conv_pw`` / ``se.conv_reduce`` ..., MCL's ``proj_head``); exact for
        every model registered here."""
        return f"{torch_module(self.module)}.{self.torch_leaf}"

    @property
    def is_kernel(self) -> bool:
        return self.collection == "params" and self.path[-1] == "kernel"


def norm_torch_key(key: str) -> str:
    """``layer1.0.downsample.0.weight`` -> ``layer1_0_downsample_0.weight``."""
    module, _, leaf = key.rpartition(".")
    return f"{module.replace('.', '_')}.{leaf}"


def flatten(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """``{(collection, *module names, leaf name): value}`` of a variables tree, in tree order;
    `traverse_util.unflatten_dict` is its inverse."""
    return {tuple(map(str, k)): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def leaves(tree: Mapping[str, Any]) -> list[Leaf]:
    """The leaves of a ``{"params": ..., "batch_stats": ...}`` tree of arrays or shape structs."""
    return [Leaf(k[0], k[1:], tuple(v.shape), v.dtype) for k, v in flatten(tree).items()]


def shapes(tree_leaves: list[Leaf]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{leaf.key: shape}``: two trees have the same variables iff these are equal."""
    return {lf.key: lf.shape for lf in tree_leaves}


def bn_modules(tree_leaves: list[Leaf]) -> list[Leaf]:
    """One leaf per BatchNorm module (its running mean), in tree order."""
    return [lf for lf in tree_leaves if lf.collection == "batch_stats" and lf.path[-1] == "mean"]


def to_flax_layout(value: np.ndarray, leaf: Leaf) -> np.ndarray:
    """A torch-layout array in Flax layout for ``leaf`` (no shape check)."""
    if leaf.is_kernel and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))  # (out, in/g, kh, kw) -> (kh, kw, in/g, out)
    if leaf.is_kernel and value.ndim == 2:
        return np.transpose(value)  # Linear (out, in) -> Dense (in, out)
    return value


def to_torch_layout(value: np.ndarray, leaf: Leaf) -> np.ndarray:
    """The inverse of `to_flax_layout`."""
    if leaf.is_kernel and value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))
    if leaf.is_kernel and value.ndim == 2:
        return np.transpose(value)
    return value


def torch_shape(leaf: Leaf) -> tuple[int, ...]:
    """The shape torch uses for ``leaf``: for error messages in the checkpoint's own terms."""
    return to_torch_layout(np.empty(leaf.shape, dtype=np.bool_), leaf).shape


def listing(items: Sequence[str]) -> str:
    """Keys for one error line: the first `MAX_LISTED`, then how many more."""
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return f"{shown}, ... and {more} more" if more > 0 else shown
