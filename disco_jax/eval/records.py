"""eval.json and eval.md: one record per evaluator (name, protocol version, settings, metrics)."""

from __future__ import annotations

import json
import os
from typing import Any


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def table(records: list[dict]) -> str:
    """A markdown table: one row per (evaluator, metric)."""
    lines = ["| eval | evaluator | version | metric | value |", "|---|---|---|---|---|"]
    for r in records:
        for k, v in r["metrics"].items():
            lines.append(f"| {r['name']} | {r['evaluator']} | {r['version']} | {k} | {_fmt(v)} |")
    return "\n".join(lines) + "\n"


def write(out_dir: str, records: list[dict], header: dict) -> None:
    """OUT/eval.json ({**header, "records": [...]}) and OUT/eval.md, written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    doc = {**header, "records": records}
    for name, text in (("eval.json", json.dumps(doc, indent=2, default=str)),
                       ("eval.md", _markdown(records, header))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


def _markdown(records: list[dict], header: dict) -> str:
    lines = [f"# Evaluation of {header.get('encoder', '?')}", ""]
    for key in ("model", "data", "step"):
        if key in header:
            lines.append(f"- {key}: {header[key]}")
    lines += ["", table(records)]
    for r in records:
        if r.get("deviations"):
            lines.append(f"{r['name']}: differs from preset {r['settings'].get('preset')!r} in"
                         f" {', '.join(r['deviations'])} (a reduced or modified protocol).")
    return "\n".join(lines) + "\n"
