"""Benchmark of the sharded weighted-kNN evaluator on a synthetic bank.

    python -m disco_jax.bench.knn --bank 1281167 --dim 2048 --queries 50000 --devices 8 --out DIR

The bank (random normal rows, random labels over --classes) is generated shard by shard on the
host and placed on its device at once, so the host never holds the whole bank; it is then
L2-normalised in place (`shard_bank(..., donate=True)`). Prints and writes DIR/knn_bench.json:
bank shape and bytes per device, memory, compile and query time, queries/s, devices, versions.
On a CPU-only machine --devices fake host devices are created (XLA_FLAGS), which must happen
before jax is imported: jax is imported inside `main`, after the flags are set.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import jax
    from jax.sharding import Mesh

    from disco_jax.eval.knn import ShardedBank

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
# The CPU backend aborts the process when one fake device's thread reaches a collective 40 s
# after the others (seen on a busy 2-core machine: "Termination timeout for `all gather`");
# a benchmark on a shared machine waits instead.
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", type=int, default=1_281_167, help="bank rows (ImageNet train)")
    p.add_argument("--dim", type=int, default=2048, help="feature dimension (ResNet-50)")
    p.add_argument("--queries", type=int, default=50_000, help="query rows (ImageNet val)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--devices", type=int, default=-1, help="mesh size (-1: all devices)")
    p.add_argument("--chunk", type=int, default=1024, help="query rows per step")
    p.add_argument("--ks", default="10,20,100,200", help="comma-separated k values")
    p.add_argument("--temp", type=float, default=0.07)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for knn_bench.json")
    return p.parse_args(argv)


def _cpu_only() -> bool:
    """Whether jax will run on the host: JAX_PLATFORMS says cpu, or no accelerator plugin is
    installed. (A wrong guess is harmless: the flag only affects the host platform.)"""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = list(metadata.entry_points(group="jax_plugins"))
    return not plugins and not any(
        importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu")
    )


def force_host_devices(n: int) -> None:
    """Ask XLA for `n` host devices, before jax is imported, unless XLA_FLAGS already sets a
    count or the run will use an accelerator."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n <= 1 or HOST_DEVICES_FLAG in flags or not _cpu_only():
        return
    if "jax" in sys.modules:
        print(f"warning: jax already imported; {HOST_DEVICES_FLAG}={n} has no effect",
              file=sys.stderr)
    extra = f"{HOST_DEVICES_FLAG}={n}"
    if COLLECTIVE_TIMEOUT_FLAG not in flags:
        extra += f" {COLLECTIVE_TIMEOUT_FLAG}=3600"
    os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()


def _device_rows(mesh: Mesh, n_pad: int, dim: int, seed: int) -> jax.Array:
    """(n_pad, dim) float32 normal rows sharded P("data", None), one shard generated at a time
    (the host holds one shard, never the bank)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from disco_jax.sharding import DATA

    sharding = NamedSharding(mesh, P(DATA, None))
    shards = []
    for device, index in sharding.addressable_devices_indices_map((n_pad, dim)).items():
        start, stop, _ = index[0].indices(n_pad)
        rows = np.random.default_rng([seed, start]).standard_normal((stop - start, dim),
                                                                    dtype=np.float32)
        # may_alias=False: a CPU device must own its buffer (not alias the numpy array), or
        # shard_bank's in-place normalise cannot reuse it and allocates a second bank.
        shards.append(jax.device_put(rows, device, may_alias=False).block_until_ready())
        del rows  # freed before the next shard is generated
    return jax.make_array_from_single_device_arrays((n_pad, dim), sharding, shards)


def synthetic_bank(mesh: Mesh, n: int, dim: int, classes: int, seed: int) -> ShardedBank:
    """A random bank of `n` real rows, padded on the devices to a multiple of the mesh size;
    the padding carries label -1, which `shard_bank` treats as padding."""
    from disco_jax.eval.knn import shard_bank
    from disco_jax.sharding import DATA

    n_pad = math.ceil(n / mesh.shape[DATA]) * mesh.shape[DATA]
    labels = np.full(n_pad, -1, np.int32)
    labels[:n] = np.random.default_rng(seed).integers(0, classes, n)
    # Donated: the raw rows are normalised in place (one bank copy per device).
    return shard_bank(_device_rows(mesh, n_pad, dim, seed + 1), labels, mesh, donate=True)


def _peak_bytes(devices: list[Any]) -> list[int] | None:
    stats = [d.memory_stats() for d in devices]
    if any(s is None or "peak_bytes_in_use" not in s for s in stats):
        return None  # e.g. the CPU backend
    return [int(s["peak_bytes_in_use"]) for s in stats]


def _compiled_memory(step: Any) -> dict[str, int]:
    m = step.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    out["argument_plus_output_plus_temp_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    )
    return out


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


class ChunkClock:
    """`query_bank`'s on_chunk hook: the wall time of every chunk, and a progress line with
    the rate and ETA every `every_s` seconds. The median chunk rate is what a shared machine
    reports least disturbed (a chunk slowed by another job is an outlier, not the median)."""

    def __init__(self, every_s: float = 60.0):
        self.every_s = every_s
        self.t0 = self._last = self._prev = time.perf_counter()
        self.chunk_s: list[float] = []
        self.chunk_rows: list[int] = []
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        from disco_jax.eval.common import format_eta

        now = time.perf_counter()
        self.chunk_s.append(now - self._prev)
        self.chunk_rows.append(done - self._done)
        self._prev, self._done = now, done
        if now - self._last >= self.every_s or done == total:
            self._last = now
            rate = done / (now - self.t0)
            eta = format_eta((total - done) / rate)
            print(f"queries {done}/{total}, {rate:.1f} q/s, ETA {eta}", file=sys.stderr,
                  flush=True)

    def median_rate(self) -> float:
        rates = [r / s for r, s in zip(self.chunk_rows, self.chunk_s, strict=True)]
        return float(np.median(rates)) if rates else float("nan")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from disco_jax.eval.knn import compiled_step, query_bank
    from disco_jax.sharding import make_mesh

    ks = tuple(int(k) for k in args.ks.split(","))
    mesh = make_mesh(args.devices)
    devices = list(mesh.devices.flat)
    bank, build_s = _timed(synthetic_bank, mesh, args.bank, args.dim, args.classes, args.seed)
    jax.block_until_ready((bank.feats, bank.labels))

    rng = np.random.default_rng(args.seed + 2)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    query_labels = rng.integers(0, args.classes, args.queries).astype(np.int32)
    chunk = min(args.chunk, args.queries)  # what query_bank compiles for
    step, compile_s = _timed(compiled_step, bank, num_classes=args.classes, ks=ks, chunk=chunk)

    knobs = {"num_classes": args.classes, "ks": ks, "temp": args.temp, "chunk": chunk}
    # One chunk first: the first execution's one-off costs stay out of the timed run.
    _, warmup_s = _timed(query_bank, bank, queries[:chunk], query_labels[:chunk], **knobs)
    clock, cpu0 = ChunkClock(), _cpu_s()
    metrics, query_s = _timed(query_bank, bank, queries, query_labels, on_chunk=clock, **knobs)
    query_cpu_s = _cpu_s() - cpu0

    feats_shard = bank.feats.addressable_shards[0].data
    labels_shard = bank.labels.addressable_shards[0].data
    peak = _peak_bytes(devices)
    return {
        "bank_shape": [args.bank, args.dim],
        "bank_padded_shape": list(bank.feats.shape),
        "bank_bytes_total": int(bank.feats.nbytes + bank.labels.nbytes),
        "bank_shard_shape_per_device": list(feats_shard.shape),
        "bank_shard_bytes_per_device": int(feats_shard.nbytes + labels_shard.nbytes),
        "peak_bytes_in_use_per_device": peak,
        "peak_bytes_in_use_note": (
            "device.memory_stats()['peak_bytes_in_use'], whole process lifetime (bank build"
            " included)" if peak is not None else
            "device.memory_stats() not available on this backend; see"
            " xla_compiled_chunk_step_per_device and process_max_rss_bytes"
        ),
        "xla_compiled_chunk_step_per_device": _compiled_memory(step),
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "queries": args.queries,
        "chunk": chunk,
        "ks": list(ks),
        "num_classes": args.classes,
        "bank_build_s": round(build_s, 3),
        "compile_s": round(compile_s, 3),
        "warmup_chunk_s": round(warmup_s, 3),
        "query_s": round(query_s, 3),
        "queries_per_s": round(args.queries / query_s, 1),
        "median_chunk_queries_per_s": round(clock.median_rate(), 1),
        "query_process_cpu_s": round(query_cpu_s, 1),
        "host_cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "metrics_percent": metrics,  # random data: chance level, a smoke value only
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "device_count": len(devices),
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    force_host_devices(args.devices)
    from disco_jax.errors import ConfigError

    try:
        result = run(args)
    except ConfigError as e:  # e.g. --devices larger than the visible devices
        from disco_jax.cli import fail

        fail(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    (out / "knn_bench.json").write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
