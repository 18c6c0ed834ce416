"""Merge suite runs made in separate processes into one report.

The full suite is too long for one process on a small machine; run workloads (or methods) as
separate ``python -m bench`` processes, each with its own ``--out``, then merge::

    python -m bench.suite.merge bench/results/suite /tmp/conv /tmp/resnet [--replace /tmp/gp]

Rows from later folders replace rows of earlier ones with the same (workload, method, target,
seed), so one method can be re-run and swapped in. The merged report (runs, summary with
verdicts, Pareto plots) is written to the first argument, as ``python -m bench`` writes it.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .report import write_report
from .runner import FULL

__all__ = ["main", "merge_rows", "read_runs"]

_KEY = ("workload", "method", "target", "seed")


def _number(text: str) -> Any:
    """A CSV cell as int, float or the string itself.

    >>> _number("3"), _number("0.25"), _number("gatedprune"), _number("")
    (3, 0.25, 'gatedprune', '')
    """
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_runs(folder: Path) -> list[dict[str, Any]]:
    """The rows of ``folder/suite_runs.csv`` with numbers parsed."""
    path = Path(folder) / "suite_runs.csv"
    if not path.is_file():
        raise ValueError(f"{folder} holds no suite_runs.csv (not a suite output folder)")
    with path.open(newline="") as f:
        rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    for r in rows:
        missing = [k for k in _KEY if k not in r]
        if missing:
            raise ValueError(f"{path}: a row lacks {missing}")
        r["target"] = float(r["target"])
    return rows


def merge_rows(groups: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of all groups; a later row replaces an earlier one with the same key.

    >>> a = [{"workload": "w", "method": "m", "target": 0.5, "seed": 0, "accuracy": 0.8}]
    >>> b = [{"workload": "w", "method": "m", "target": 0.5, "seed": 0, "accuracy": 0.9}]
    >>> merge_rows([a, b])[0]["accuracy"]
    0.9
    """
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rows in groups:
        for r in rows:
            merged[tuple(r[k] for k in _KEY)] = r
    return list(merged.values())


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (``python -m bench.suite.merge OUT IN [IN ...]``)."""
    ap = argparse.ArgumentParser(prog="python -m bench.suite.merge", description=__doc__)
    ap.add_argument("out", type=Path, help="folder for the merged report")
    ap.add_argument("inputs", type=Path, nargs="+", help="suite output folders, in order")
    ap.add_argument("--seconds", type=float, default=None, help="total suite time to report")
    ap.add_argument("--command", default=None, help="command line to record in the report")
    ap.add_argument(
        "--num-samples",
        type=int,
        default=FULL.num_samples,
        help=f"MNIST-1D samples the runs used, for the report ({FULL.num_samples})",
    )
    a = ap.parse_args(argv)
    groups = [read_runs(p) for p in a.inputs]
    rows = merge_rows(groups)
    seconds = a.seconds if a.seconds is not None else sum(float(r["train_s"]) for r in rows)
    for wl in dict.fromkeys(str(r["workload"]) for r in rows):
        epochs = {int(r["epochs"]) for r in rows if r["workload"] == wl}
        if len(epochs) != 1:
            raise ValueError(
                f"the {wl} runs to merge used different epochs {sorted(epochs)}; every method "
                "of a workload must train as long"
            )
    config = replace(
        FULL,
        num_samples=a.num_samples,
        workloads=tuple(dict.fromkeys(str(r["workload"]) for r in rows)),
        seeds=tuple(sorted({int(r["seed"]) for r in rows})),
        out=a.out,
    )
    command = a.command or "python -m bench.suite.merge " + " ".join(
        str(p) for p in [a.out, *a.inputs]
    )
    write_report(rows, config, seconds=seconds, command=command)


if __name__ == "__main__":
    main()
