"""The negative queue: global FIFO, sharded P('data', None) over 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from disco_jax import queue, sharding
from disco_jax.errors import ConfigError


def test_enqueue_is_global_fifo_and_wraps():
    q = queue.init(jax.random.PRNGKey(0), 16, 4)
    before = np.asarray(q["feats"])
    keys = [jnp.full((4, 4), float(i + 1)) for i in range(5)]
    for i, k in enumerate(keys[:4]):
        q = queue.enqueue(q, k)
        feats = np.asarray(q["feats"])
        np.testing.assert_array_equal(feats[4 * i : 4 * i + 4], np.asarray(k))
        np.testing.assert_array_equal(feats[4 * i + 4 :], before[4 * i + 4 :])
        assert int(q["ptr"]) == (4 * (i + 1)) % 16
    q = queue.enqueue(q, keys[4])  # wraps around: the oldest rows go first
    np.testing.assert_array_equal(np.asarray(q["feats"])[:4], 5.0)
    np.testing.assert_array_equal(np.asarray(q["feats"])[4:8], 2.0)


def test_init_rows_are_unit_norm():
    q = queue.init(jax.random.PRNGKey(1), 32, 8)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(q["feats"]), axis=1), 1.0, rtol=1e-6)


def test_sharded_enqueue_over_8_devices_equals_single_device():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(8)
    sh = queue.sharding(mesh)
    q = jax.device_put(queue.init(jax.random.PRNGKey(2), 64, 4), sh)
    assert q["feats"].sharding.spec == P("data", None)
    assert len(q["feats"].addressable_shards) == 8
    assert q["feats"].addressable_shards[0].data.shape == (8, 4)
    keys = jax.device_put(jax.random.normal(jax.random.PRNGKey(3), (16, 4)),
                          sharding.batch_sharding(mesh))
    step = jax.jit(queue.enqueue, in_shardings=(sh, sharding.batch_sharding(mesh)),
                   out_shardings=sh, donate_argnums=0)
    ref = queue.init(jax.random.PRNGKey(2), 64, 4)
    for _ in range(5):
        q = step(q, keys)
        ref = queue.enqueue(ref, jax.device_get(keys))
    assert q["feats"].sharding.spec == P("data", None)
    np.testing.assert_array_equal(np.asarray(q["feats"]), np.asarray(ref["feats"]))
    assert int(q["ptr"]) == int(ref["ptr"]) == (5 * 16) % 64


def test_size_must_be_multiple_of_global_batch():
    queue.check_size(64, 16)
    with pytest.raises(ConfigError, match="multiple of the global batch 24"):
        queue.check_size(64, 24)
