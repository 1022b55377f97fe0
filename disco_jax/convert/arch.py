"""What a registered model's variables look like, from its abstract init (no allocation).

The key mapping is derived from these trees, so any model that follows the naming rule of
`disco_jax.convert.names` converts without a hand-written table.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from disco_jax import models
from disco_jax.convert import names
from disco_jax.convert.names import Leaf

# Images for the abstract init; eval_shape never allocates, so the size costs nothing.
ABSTRACT_IMAGE = (1, 224, 224, 3)


def _model_key(name: str, num_classes: int, model_kwargs: Mapping[str, Any]) -> tuple:
    return (name, num_classes, tuple(sorted(model_kwargs.items())))


@functools.lru_cache(maxsize=32)
def _abstract_backbone(key: tuple) -> tuple[list[Leaf], int]:
    """(leaves, output width) of ``create(name, num_classes, **kwargs)``, without allocating."""
    name, num_classes, kwargs = key
    model = models.create(name, num_classes=num_classes, **dict(kwargs))
    x = jax.ShapeDtypeStruct(ABSTRACT_IMAGE, jnp.float32)
    out, variables = jax.eval_shape(
        functools.partial(model.init_with_output, train=False), jax.random.key(0), x
    )
    return names.leaves(variables), int(out.shape[-1])


def backbone_leaves(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> list[Leaf]:
    """The variables of ``create(name, num_classes, **kwargs)``."""
    try:
        return _abstract_backbone(_model_key(name, num_classes, kwargs))[0]
    except TypeError:  # an unhashable option: skip the cache
        return _abstract_backbone.__wrapped__(_model_key(name, num_classes, kwargs))[0]


def feature_dim(name: str, kwargs: Mapping[str, Any]) -> int:
    """The pooled feature width of a backbone."""
    return _abstract_backbone.__wrapped__(_model_key(name, 0, kwargs))[1]


def classifier_leaves(name: str, kwargs: Mapping[str, Any]) -> list[Leaf]:
    """The variables that exist only with a classifier: the difference of num_classes 1 and 0."""
    bare = {lf.key for lf in backbone_leaves(name, 0, kwargs)}
    return [lf for lf in backbone_leaves(name, 1, kwargs) if lf.key not in bare]


def classifier_out(name: str, kwargs: Mapping[str, Any]) -> Leaf | None:
    """The classifier's last Dense kernel, whose output width is num_classes."""
    kernels = [lf for lf in classifier_leaves(name, kwargs) if lf.is_kernel and len(lf.shape) == 2]
    return kernels[-1] if kernels else None


def head_leaves(head: Any, features: int) -> list[Leaf]:
    """The variables of a projection head on ``features``-wide inputs."""
    x = jax.ShapeDtypeStruct((1, features), jnp.float32)
    return names.leaves(jax.eval_shape(head.init, jax.random.key(0), x))


def encoder_shapes(
    name: str, head: str, embed_dim: int, hidden: int, kwargs: Mapping[str, Any]
) -> dict[tuple[str, ...], tuple[int, ...]]:
    """`names.shapes` of the Encoder the trainer rebuilds from a manifest with these fields
    (`models.build_encoder`)."""
    encoder = models.Encoder(
        backbone=models.create(name, num_classes=0, **kwargs),
        head=models.create_head(head, out_dim=embed_dim, hidden_dim=hidden or None),
    )
    x = jax.ShapeDtypeStruct(ABSTRACT_IMAGE, jnp.float32)
    tree = jax.eval_shape(functools.partial(encoder.init, train=False), jax.random.key(0), x)
    return names.shapes(names.leaves(tree))


def real_init(model: Any, *inputs: Any) -> dict[tuple[str, ...], np.ndarray]:
    """`names.flatten` of a model's actual initial variables, as host arrays."""
    # Compiled (op-by-op init takes seconds for a ResNet) but run once, so on CPU XLA's backend
    # optimisations would cost more compile time than they save.
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    variables = jax.jit(model.init, compiler_options=opts)(jax.random.key(0), *inputs)
    return {k: np.asarray(v) for k, v in names.flatten(variables).items()}
