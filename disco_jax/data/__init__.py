"""Input data: datasets (`sources`), the host tf.data pipeline and device-side augmentation.

The host decodes, random-resized-crops and flips (uint8). Colour jitter, grayscale, blur and
normalisation run on the accelerator inside the train step (`mocov2_augment`).

Importing this package does not import TensorFlow: `pipeline` and `sources` name it through
`_tf.tf`, which imports it (GPUs hidden from it) on first use, when a source or a dataset is
made; `augment` is pure JAX. So the train step runs in an environment without TensorFlow.
"""

from disco_jax.data.augment import mocov2_augment, normalize
from disco_jax.data.digits import ensure_digits
from disco_jax.data.pipeline import (
    eval_batches,
    eval_dataset,
    global_iterator,
    steps_per_epoch,
    to_global,
    train_dataset,
    validate,
)
from disco_jax.data.sources import DataSource, get_source

__all__ = [
    "DataSource",
    "ensure_digits",
    "eval_batches",
    "eval_dataset",
    "get_source",
    "global_iterator",
    "mocov2_augment",
    "normalize",
    "steps_per_epoch",
    "to_global",
    "train_dataset",
    "validate",
]
