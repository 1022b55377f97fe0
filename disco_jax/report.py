"""The results table of a multi-stage run: results.json and results.md.

A stage that ran with several seeds is one row: the mean of its runs' `knn_top1` /
`linear_top1`, their sample standard deviation (n - 1; 0 for one run) in `*_std`, and the
`seeds`. The reference rows of `disco_jax.baselines` (raw pixels, random initialisation) come
last, under their own names.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from disco_jax import methods

METRICS = ("knn_top1", "linear_top1")


def _fmt(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(runs: list[dict]) -> dict:
    """One stage's summary from its runs (one per seed): the last run's fields (step,
    total_steps, ...), each metric's mean and `_std`, `seeds`, `runs`, total `stage_seconds`."""
    out = {**runs[-1], "runs": runs, "seeds": [r.get("seed") for r in runs],
           "stage_seconds": round(sum(r.get("stage_seconds", 0.0) for r in runs), 1)}
    for m in METRICS:
        values = [r[m] for r in runs if r.get(m) is not None]
        out[m], out[f"{m}_std"] = _mean_std(values) if len(values) == len(runs) else (None, None)
    return out


def _row(name: str, res: dict, config: Any) -> dict:
    if name in config.stages:
        stage = config.stages[name]
        teacher = stage.teacher.model if methods.get(stage.method).NEEDS_TEACHER else "-"
        method, backbone = stage.method, stage.student.model
        width = dict(stage.student.model_kwargs).get("width", 1.0)
    else:  # a reference row (pixels, random_init) of the baseline stage's network
        stage = config.stages[config.baseline_stage]
        method, teacher = name, "-"
        backbone = "-" if name == "pixels" else stage.student.model
        width = "-" if name == "pixels" else dict(stage.student.model_kwargs).get("width", 1.0)
    row = {"stage": name, "method": method, "backbone": backbone, "width": width,
           "teacher": teacher}
    for m in METRICS:
        row[m], row[f"{m}_std"] = res.get(m), res.get(f"{m}_std")
    row.update({"seeds": res.get("seeds", []), "train_steps": res.get("step"),
                "seconds": res.get("stage_seconds")})
    return row


def _cell(row: dict, metric: str) -> str:
    value, std = row[metric], row[f"{metric}_std"]
    if value is None:
        return "-"
    return f"{value:.2f} ± {std:.2f}" if len(row["seeds"]) > 1 else f"{value:.2f}"


def write(workdir: str, summary: dict, config: Any) -> None:
    rows = [_row(name, res, config) for name, res in summary["stages"].items()]
    out = {"rows": rows, "wall_seconds": summary["wall_seconds"], "dataset": config.dataset_name}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    head = ["stage", "method", "backbone", "width", "teacher", "knn_top1", "linear_top1",
            "seeds", "train_steps", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = {**{h: _fmt(r[h]) for h in head}, "knn_top1": _cell(r, "knn_top1"),
                 "linear_top1": _cell(r, "linear_top1"), "seeds": str(len(r["seeds"]))}
        lines.append("| " + " | ".join(cells[h] for h in head) + " |")
    lines.append("")
    knn = config.stages[config.stage_order[0]].evals.knn
    lines.append(f"Dataset: {config.dataset_name}. kNN: k={knn.k}, cosine, T={knn.temp};"
                 f" linear probe on frozen pooled features (top-1 %, test split); mean ± sample"
                 f" std over the seeds. Total wall time {summary['wall_seconds']:.0f} s.")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
