"""PyTorch checkpoints <-> disco_jax variables, by the naming rule of `disco_jax.convert.names`.

- ``from_torch(state_dict, name, source)`` converts a state dict into the variables of
  ``disco_jax.models.create(name, num_classes, **model_kwargs)``; formats that carry a
  projection head (MoCo) give the variables of an ``Encoder`` instead:
  ``{"params": {"backbone", "head"}, "batch_stats": {"backbone"}}``. The key mapping is derived
  from the model's own variable tree (``jax.eval_shape`` of init), so any registered model that
  follows the naming rule converts without a hand-written table. Every parameter and BatchNorm
  statistic must be accounted for: missing keys, unexpected keys and shape mismatches (and
  ambiguous or unsupported keys) raise one `ConfigError` line listing them all, each key under
  one heading (long lists end in "... and N more"), except keys named in ``ignore`` (exact
  keys or fnmatch patterns, matched against the full key and the key without the format's
  prefix). A model variable whose key is ignored keeps a fresh initialisation (e.g.
  ``ignore=["fc.*"]`` for a new classifier).
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

Modules, by concern (everything above is re-exported here):

- `formats`: the format table, and how a checkpoint is unwrapped and its prefix / head found;
- `names`: the key mapping (Flax paths <-> torch names, array layouts, tree flattening);
- `arch`: a registered model's variable tree from its abstract init;
- `load`: `convert` / `from_torch`, one merge by name that reports every mismatch at once;
- `export`: `to_torch`, `to_detectron2`, `export_encoder`;
- `files`: `load_torch_file`, `convert_file` (and ``__main__``, the CLI).
"""

from __future__ import annotations

from disco_jax.convert import names
from disco_jax.convert.arch import feature_dim
from disco_jax.convert.export import detectron2_name, export_encoder, to_detectron2, to_torch
from disco_jax.convert.files import convert_file, load_torch_file, sha256_file
from disco_jax.convert.formats import FORMATS, HeadLayout, SourceFormat
from disco_jax.convert.load import Converted, convert, from_torch

__all__ = [
    "FORMATS",
    "Converted",
    "HeadLayout",
    "SourceFormat",
    "convert",
    "convert_file",
    "detectron2_name",
    "export_encoder",
    "feature_dim",
    "from_torch",
    "load_torch_file",
    "names",
    "sha256_file",
    "to_detectron2",
    "to_torch",
]
