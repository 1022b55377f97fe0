"""Timing, memory, FLOPs and MFU of one jitted function (perf.md §6's protocol).

- Compile: wall time of `jit(...).lower(...).compile()`, nothing else.
- Steps: one first call (its loss is `loss_step1`), `warmup` more, then `steps` timed calls,
  each blocked on its *whole* output (the whole next state for a train step), so a step's time
  is its own and never overlaps the next; median and p90 of the timed calls.
- Memory: the device's `peak_bytes_in_use` where the backend reports it and the measurement
  is the first in its process (the peak is a process-lifetime high-water mark, so a later
  reading would include earlier work); else XLA's compiled estimate, arguments + outputs +
  temporaries - aliased (donated) bytes. `peak_mem_source` says which.
- FLOPs: XLA's `cost_analysis()` of the compiled program per source image; MFU uses perf.md's
  analytic count where the case has one (`mfu_flops="table"`, as perf.md §6 asks), else XLA's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

# Dense bf16 peak FLOP/s by device kind (perf.md §2.1), first match wins (PCIe before SXM).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("v100", 125e12),
    ("l4", 121e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
)


def peak_flops(device_kind: str, platform: str) -> float | None:
    """The chip's dense bf16 peak; None for a CPU or an unknown kind (no MFU then)."""
    if platform == "cpu":
        return None
    kind = device_kind.lower()
    return next((flops for key, flops in PEAK_FLOPS if key in kind), None)


def mfu(img_per_sec: float, flops_per_img: float | None, peak: float | None) -> float | None:
    if not flops_per_img or not peak:
        return None
    return round(img_per_sec * flops_per_img / peak, 5)


def compile_timed(jitted: Any, args: tuple) -> tuple[Any, float]:
    """(compiled executable, seconds to lower and compile it)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def xla_flops(compiled: Any) -> float | None:
    """XLA's FLOP count of a compiled program (None where the backend gives none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- optional and backend dependent
        return None
    if isinstance(cost, list):  # older jax: one dict per device
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def compiled_bytes(compiled: Any) -> int | None:
    """XLA's estimate of a program's device memory: arguments + outputs + temporaries, less
    the outputs that alias a donated argument (they reuse its buffer)."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 -- not every backend has it
        return None


def device_peak_bytes(devices: list[Any]) -> int | None:
    """The largest `peak_bytes_in_use` over `devices`, or None where not reported (CPU)."""
    peaks = []
    for d in devices:
        stats = d.memory_stats()
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def peak_memory(compiled: Any, devices: list[Any], first_in_process: bool
                ) -> tuple[int | None, str]:
    """(bytes, source): see the module docstring."""
    if first_in_process:
        peak = device_peak_bytes(devices)
        if peak is not None:
            return peak, "device_peak_bytes_in_use"
    return compiled_bytes(compiled), "xla_compiled_estimate"


def run_steps(call: Callable, args: tuple, steps: int, warmup: int, threads_state: bool,
              loss_of: Callable[[Any], Any]) -> tuple[float | None, list[float], tuple]:
    """(loss of the first call, timed milliseconds, last arguments) of `call(*args)`: one
    first call, `warmup` more, `steps` timed. `threads_state`: the first output feeds the next
    call's first argument (a donated train state), as in a training loop. `loss_of(output)`:
    the loss in an output, or None."""
    import jax

    def once(args: tuple) -> tuple[Any, tuple]:
        out = call(*args)
        jax.block_until_ready(out)
        return out, ((out[0], *args[1:]) if threads_state else args)

    first, args = once(args)
    loss = loss_of(first)
    loss = None if loss is None else float(loss)
    del first  # a train step's first output is donated by the next call
    for _ in range(warmup):
        _, args = once(args)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        _, args = once(args)
        times.append((time.perf_counter() - t0) * 1e3)
    return loss, times, args


def summarize(times_ms: list[float], batch: int) -> dict[str, float]:
    """Median and p90 step time, and source images per second at the median."""
    median = float(np.median(times_ms))
    return {"img_per_sec": round(batch / (median / 1e3), 2),
            "step_ms_median": round(median, 4),
            "step_ms_p90": round(float(np.percentile(times_ms, 90)), 4)}
