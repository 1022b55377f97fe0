"""Test-wide setup: 8 fake CPU devices so every sharding path runs in CI."""

import os

# Must happen before jax is imported anywhere in the test session. Optimisation level 0 of the
# CPU backend: compiling dominates the suite and the test steps are tiny (measured on 2 cores,
# cold cache: 21 min 23 s instead of 25 min 28 s for 280 tests).
# The collective timeout: the CPU backend aborts when one fake device's thread reaches a
# collective 40 s after the others, which a loaded 2-core machine can cause (seen here).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_collective_call_terminate_timeout_seconds=1800"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Runs with identical configs (determinism, resume, fresh processes) compile once per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/disco_jax_test_jax_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """The embedded digits dataset written once per session into a temporary TFDS dir."""
    from disco_jax.data import ensure_digits

    path = str(tmp_path_factory.mktemp("tfds"))
    ensure_digits(path)
    return path


def pytest_collection_modifyitems(config, items):
    """The slow tests first, so that under `-n 2` the two workers end on short tests instead of
    one finishing a minutes-long run alone (on 2 cores the full suite used 79 CPU-minutes in
    45 min of wall time, where two always-busy workers would take ~40; estimated, not timed).
    Each module's tests stay together, in their own order apart from slow first, so a
    module-scoped fixture is built once per worker; modules with more slow tests go first."""
    def slow(item) -> bool:
        return item.get_closest_marker("slow") is not None

    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    ordered = sorted(modules.values(), key=lambda its: -sum(map(slow, its)))
    items[:] = [it for its in ordered for it in sorted(its, key=lambda it: not slow(it))]
