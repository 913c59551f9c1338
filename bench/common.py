"""Helpers shared by the benchmarks: device naming, data, result tables."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

OUT = Path(__file__).parent


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def digits_data(workdir: Path) -> dict:
    from pipeline.digits import write_digits

    return write_digits(str(workdir / "data"))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)


def write_results(name: str, results: dict) -> Path:
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(results, indent=1))
    return path
