"""The benchmark's records and what is written from them: DIR/bench.json and DIR/bench.md.

One record per case x part x implementation, with `RECORD_FIELDS` (a peer record adds
`loss_rel_diff` and `loss_agrees`). Pure functions of plain dicts: no jax here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

RECORD_FIELDS = (
    "case", "part", "impl", "img_per_sec", "step_ms_median", "step_ms_p90", "compile_s",
    "peak_mem_bytes", "peak_mem_source", "flops_per_img", "flops_per_img_table", "mfu",
    "mfu_flops", "device_kind", "num_devices", "dtype", "batch", "image_size", "loss_step1",
    "jax_version", "steps",
)
PEER_FIELDS = ("loss_rel_diff", "loss_agrees")
# |loss_jax - loss_peer| <= LOSS_RTOL * |loss_jax| at step 1: the same function was timed.
LOSS_RTOL = 1e-3
ESTIMATE = "xla_compiled_estimate"  # timing.peak_memory's source when no device peak is used


def missing_fields(record: dict) -> list[str]:
    """The required fields a record lacks (peer records also need `PEER_FIELDS`)."""
    need = RECORD_FIELDS + (PEER_FIELDS if record.get("impl", "jax") != "jax" else ())
    return [k for k in need if k not in record]


def loss_agreement(loss_jax: float | None, loss_peer: float | None,
                   rtol: float = LOSS_RTOL) -> tuple[float | None, bool]:
    """(relative difference, whether it is within `rtol`); a missing or non-finite loss never
    agrees."""
    if loss_jax is None or loss_peer is None or not (math.isfinite(loss_jax)
                                                    and math.isfinite(loss_peer)):
        return None, False
    rel = abs(loss_jax - loss_peer) / max(abs(loss_jax), 1e-30)
    return rel, rel <= rtol


def ratios(records: list[dict]) -> dict[str, dict[str, float]]:
    """case -> {"jax/p0": ..., "jax/p1": ...}: JAX's step images/s over each peer's."""
    steps = {(r["case"], r["impl"]): r["img_per_sec"] for r in records if r["part"] == "step"}
    out: dict[str, dict[str, float]] = {}
    for (case, impl), jax_rate in steps.items():
        if impl != "jax":
            continue
        for style in ("p0", "p1"):
            peer = steps.get((case, f"torch_{style}"))
            if peer:
                out.setdefault(case, {})[f"jax/{style}"] = round(jax_rate / peer, 3)
    return out


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


COLUMNS = ("case", "part", "impl", "img/s", "ms med", "ms p90", "compile s", "peak MB",
           "GFLOP/img xla", "GFLOP/img table", "MFU", "loss@1", "agrees")


def row(r: dict) -> list[str]:
    mem = r.get("peak_mem_bytes")
    mfu = r.get("mfu")
    agrees = r.get("loss_agrees")
    return [
        r["case"], r["part"], r["impl"], _num(r.get("img_per_sec"), ",.0f"),
        _num(r.get("step_ms_median"), ".2f"), _num(r.get("step_ms_p90"), ".2f"),
        _num(r.get("compile_s"), ".1f"),
        "-" if mem is None else f"{mem / 2**20:,.0f}" + ("*" if r.get("peak_mem_source")
                                                           == ESTIMATE else ""),
        _num(None if r.get("flops_per_img") is None else r["flops_per_img"] / 1e9, ".3f"),
        _num(None if r.get("flops_per_img_table") is None else r["flops_per_img_table"] / 1e9,
             ".2f"),
        "-" if mfu is None else f"{100 * mfu:.1f} %",
        _num(r.get("loss_step1"), ".5g"),
        "" if agrees is None else ("yes" if agrees else "**NO**"),
    ]


def table(records: list[dict]) -> str:
    """A markdown table of the records."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in records]
    return "\n".join(lines)


def markdown(records: list[dict], machine: dict) -> str:
    """bench.md: the machine, the table, the peer ratios and any step-1 loss disagreement."""
    head = (f"# Benchmark: suite {machine.get('suite')}, {machine.get('device_kind')} x"
            f" {machine.get('num_devices')} ({machine.get('platform')}), jax"
            f" {machine.get('jax_version')}")
    notes = [
        f"steps {machine.get('steps')} timed after 1 + {machine.get('warmup')} untimed;"
        " img/s = source images per second at the median step time.",
        "peak MB: the device's peak bytes in use; * = XLA's compiled estimate (arguments +"
        " outputs + temporaries - donated), where the device does not report a peak or the"
        " measurement was not the first in its process.",
        "MFU uses the analytic (perf.md) FLOPs where a case has them (GFLOP/img table), else"
        " XLA's cost analysis; against the chip's dense bf16 peak; none on CPU.",
    ]
    out = [head, "", *(f"- {n}" for n in notes), "", table(records)]
    rat = ratios(records)
    if rat:
        out += ["", "## JAX over the PyTorch peers (step images/s, same machine, same run)", "",
                "| case | jax/p0 | jax/p1 |", "|---|---|---|"]
        out += [f"| {case} | {_num(v.get('jax/p0'), '.2f')} | {_num(v.get('jax/p1'), '.2f')} |"
                for case, v in rat.items()]
    bad = [r for r in records if r.get("impl", "jax") != "jax" and not r.get("loss_agrees")]
    if bad:
        out += ["", "## Step-1 loss disagreement (> 1e-3 relative: not the same function)", ""]
        out += [f"- **{r['case']} {r['impl']}**: loss {r.get('loss_step1')} vs jax"
                f" {r.get('loss_jax')} (relative difference {r.get('loss_rel_diff')})"
                for r in bad]
    for title, key in (("Failures", "failures"), ("Notes", "notes")):
        if machine.get(key):
            out += ["", f"## {title}", "", *(f"- {f}" for f in machine[key])]
    return "\n".join(out) + "\n"


def write(out_dir: str, records: list[dict], machine: dict) -> tuple[Path, Path]:
    """DIR/bench.json (`{"records", "machine"}`) and DIR/bench.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "bench.json", out / "bench.md"
    js.write_text(json.dumps({"records": records, "machine": machine}, indent=2) + "\n")
    md.write_text(markdown(records, machine))
    return js, md
