"""jit_util: run-once compiles give the jitted values; the compilation cache keeps a user's choice.

The checks that depend on XLA's flags run in a fresh process without the suite's XLA_FLAGS
(tests/conftest.py compiles everything unoptimised, which would make run_once's option moot)."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from disco_jax import jit_util
from tests.helpers import ROOT


def test_compile_cache_keeps_a_cache_the_user_chose(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/else")
    assert not jit_util.enable_compile_cache(str(tmp_path / "c"))
    assert jax.config.jax_compilation_cache_dir == before
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_run_once_and_the_cache_in_a_default_process(tmp_path):
    cache = str(tmp_path / "cache")
    code = textwrap.dedent(f"""
        import os, jax, jax.numpy as jnp, numpy as np
        from disco_jax import config_lib, jit_util, models
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        assert jit_util.enable_compile_cache({cache!r})

        # run_once (unoptimised on CPU) against the optimised jit of a ResNet's init.
        net = models.build_encoder(config_lib.encoder_config("resnet10", width=0.125,
                                                             stem="cifar"))
        init = lambda r: net.init(r, jnp.zeros((1, 16, 16, 3)), train=False)
        got = jit_util.run_once(init, jax.random.PRNGKey(3))
        want = jax.jit(init)(jax.random.PRNGKey(3))
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            # The two compiles differ only in rounding (FMA contraction in the initialisers'
            # few float32 ops per value): a few ulps (1.2e-7 each), far inside 1e-5.
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
        other = jit_util.run_once(init, jax.random.PRNGKey(4))
        assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(other),
                                                          jax.tree.leaves(got)))

        # The persistent cache: a second identical program is loaded, not written again.
        f = lambda x: jnp.sin(x) @ x.T
        jax.jit(f)(jnp.ones((8, 8))).block_until_ready()
        n = len(os.listdir({cache!r}))
        assert n >= 1, n
        jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
        assert len(os.listdir({cache!r})) == n, "a second identical compile wrote a new entry"
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
