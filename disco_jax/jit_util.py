"""Compilation helpers: functions that run once, and the persistent compilation cache.

Measured on the 2-core CPU machine (resnet10 at widths 8-64, jax 0.10.2): XLA's LLVM passes take
11 s to compile a ResNet's initialisers (2 s without them) for a function that then runs once
in 17 ms. `run_once` compiles such functions without those passes on CPU. GPU and TPU compile
as usual (not measured there; their backends have their own pass pipelines).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

log = logging.getLogger("disco_jax")

# What the CPU compile of a run-once function leaves out: LLVM's optimisation (O0). The values
# can differ from an optimised compile in the last bits (contraction into FMAs); a ResNet's
# initialisation agrees within 1e-5 relative (tests/test_jit_util.py).
CPU_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}


def run_once(fn: Any, *args: Any, **jit_kwargs: Any) -> Any:
    """`jax.jit(fn, **jit_kwargs)(*args)`, compiled for a single call (state initialisation)."""
    lowered = jax.jit(fn, **jit_kwargs).lower(*args)
    cpu = jax.default_backend() == "cpu"
    return lowered.compile(compiler_options=CPU_RUN_ONCE_OPTIONS if cpu else None)(*args)


def enable_compile_cache(path: str) -> bool:
    """Use `path` as JAX's persistent compilation cache unless the user chose one
    (JAX_COMPILATION_CACHE_DIR or jax.config); returns whether `path` is now in use.

    A multi-stage run (the demo) compiles the same train step once per seed: the seeds' programs
    differ only in their inputs, so the second and third load it from the cache."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return False
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    log.info("compilation cache: %s", path)
    return True
