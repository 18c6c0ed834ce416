"""Shared helpers of the benchmark scripts: result files and environment notes."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> str:
    """One line describing where the numbers were measured."""
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
    )


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str,
    command: str,
    notes: str = "",
    out_dir: Path = RESULTS,
) -> Path:
    """Write ``rows`` to ``out_dir/name.csv`` and a markdown table to ``out_dir/name.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    csv_path = out_dir / f"{name}.csv"
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    os.replace(tmp, csv_path)
    lines = [
        f"## {title}",
        "",
        f"Command: `{command}`  ",
        f"Measured with {environment()}.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    if notes:
        lines += ["", notes]
    md_path = out_dir / f"{name}.md"
    md_tmp = md_path.with_suffix(".md.tmp")
    md_tmp.write_text("\n".join(lines) + "\n")
    os.replace(md_tmp, md_path)
    print("\n".join(lines))
    return md_path


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def command_line() -> str:
    return (
        "python -m bench."
        + Path(sys.argv[0]).stem
        + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    )
