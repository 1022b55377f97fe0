"""The results table of a multi-stage run: results.json and results.md."""

from __future__ import annotations

import json
import os
from typing import Any

from disco_jax import methods


def _fmt(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def write(workdir: str, summary: dict, config: Any) -> None:
    rows = []
    for name, res in summary["stages"].items():
        stage = config.stages[name]
        teacher = stage.teacher.model if methods.get(stage.method).NEEDS_TEACHER else "-"
        rows.append({
            "stage": name,
            "method": stage.method,
            "backbone": stage.student.model,
            "width": dict(stage.student.model_kwargs).get("width", 1.0),
            "teacher": teacher,
            "knn_top1": res.get("knn_top1"),
            "linear_top1": res.get("linear_top1"),
            "train_steps": res.get("step"),
            "seconds": res.get("stage_seconds"),
        })
    out = {"rows": rows, "wall_seconds": summary["wall_seconds"], "dataset": config.dataset_name}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    head = ["stage", "method", "backbone", "width", "teacher", "knn_top1", "linear_top1",
            "train_steps", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r[h]) for h in head) + " |" for r in rows]
    lines.append("")
    knn = config.stages[rows[0]["stage"]].evals.knn
    lines.append(f"Dataset: {config.dataset_name}. kNN: k={knn.k}, cosine, T={knn.temp};"
                 f" linear probe on frozen pooled features (top-1 %, test split)."
                 f" Total wall time {summary['wall_seconds']:.0f} s.")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
