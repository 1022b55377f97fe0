"""disco_jax: self-supervised knowledge distillation of visual representations in JAX/Flax."""

__version__ = "0.1.0"
