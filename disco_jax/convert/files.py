"""Checkpoint files: reading a torch file safely, and converting one into an encoder directory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

from flax import traverse_util

from disco_jax import models
from disco_jax.convert import arch, formats, names
from disco_jax.convert.load import Converted, convert
from disco_jax.errors import ConfigError


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


def _encoder(result: Converted, name: str, model_kwargs: dict) -> tuple[dict, str, int, int]:
    """(variables, head, head_hidden, embed_dim) of the encoder for a conversion: its head, or
    the ``identity`` head on the backbone without its classifier (checked, then dropped)."""
    if result.head is None:
        cls = {lf.key for lf in arch.classifier_leaves(name, model_kwargs)}
        flat = {
            (key[0], "backbone", *key[1:]): value
            for key, value in names.flatten(result.variables).items()
            if key not in cls
        }
        variables = traverse_util.unflatten_dict(flat)
        head, hidden, embed_dim = "identity", 0, arch.feature_dim(name, model_kwargs)
    else:
        variables = result.variables
        head, hidden, embed_dim = result.head, result.head_hidden, result.embed_dim
    # The trainer rebuilds exactly this Encoder from the manifest (models.build_encoder).
    want = arch.encoder_shapes(name, head, embed_dim, hidden, model_kwargs)
    if names.shapes(names.leaves(variables)) != want:  # a bug here, not a user error
        raise AssertionError("converted variables do not match the encoder the trainer builds")
    return variables, head, hidden, embed_dim


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

    formats.get(source)
    models.create(name, num_classes=0, **model_kwargs)  # fail on names before reading the file
    result = convert(
        formats.unwrap(load_torch_file(path)),
        name,
        source,
        num_classes=num_classes,
        ignore=ignore,
        **model_kwargs,
    )
    variables, head, hidden, embed_dim = _encoder(result, name, model_kwargs)
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
