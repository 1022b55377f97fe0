"""The one place TensorFlow is imported: lazily, and with the GPUs hidden from it.

TensorFlow only feeds the host input pipeline (tf.data, TFDS). Left alone, a CUDA build of TF
grabs GPU memory beside JAX's (and its cuDNN may clash with JAX's), so every import goes
through `import_tf`, which hides the GPUs from TF before TF has used a device. The rest of
disco_jax (models, losses, methods, the train step) never imports TF: they run in an image
without it, and `import disco_jax.models` does not pay TF's start-up.

`tf` is a stand-in module for code that names TF at module level (`tf.data.Dataset` in a
function body): the first attribute read imports TF through `import_tf`, so importing such a
module costs nothing until it builds a dataset.
"""

from __future__ import annotations

import logging
import types
from typing import Any

log = logging.getLogger("disco_jax")

_tf: Any = None


def hide_gpus(tf: Any) -> None:
    """Make no GPU visible to TF. Too late once TF has initialised its devices (some code ran
    a TF op before the first `import_tf`): then it says so in the log instead of failing."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # "Visible devices cannot be modified after being initialized"
        log.warning("TensorFlow was initialised before disco_jax could hide the GPUs from it"
                    " (it may hold GPU memory beside JAX): %s", e)


def import_tf() -> Any:
    """The `tensorflow` module, its GPUs hidden (once per process)."""
    global _tf
    if _tf is None:
        import tensorflow as tf

        hide_gpus(tf)
        _tf = tf
    return _tf


def import_tfds() -> Any:
    """The `tensorflow_datasets` module, TF imported (GPUs hidden) first."""
    import_tf()
    import tensorflow_datasets as tfds

    return tfds


def no_autograph(fn: Any) -> Any:
    """`fn` for a tf.data transformation (`map`, `flat_map`, `filter`), traced as written.

    tf.data runs AutoGraph on every such function by default: an AST rewrite of the function and
    of each function it calls, once per process. Measured on 2 cores, a fresh process building
    digits' two-view train pipeline and its eval pipeline: 1.9-3.0 s with it, 1.0-1.3 s
    without. Our input functions branch with `tf.cond`/`tf.where` and loop in Python over
    static values only, so the rewrite changes nothing they compute; a Python `if` on a tensor
    now fails at trace time instead of being rewritten. Functions traced while `fn` runs (a
    map built inside a `flat_map`'s function, `tf.map_fn`) are not rewritten either."""
    return import_tf().autograph.experimental.do_not_convert(fn)


class _LazyTF(types.ModuleType):
    """Forwards every attribute to the real `tensorflow`, imported on first use."""

    def __getattr__(self, name: str) -> Any:
        return getattr(import_tf(), name)


tf: Any = _LazyTF("tensorflow", "TensorFlow, imported through import_tf on first use")
