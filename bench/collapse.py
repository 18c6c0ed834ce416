"""How often the demo network collapses at a tight budget, with one gate rate or split rates.

At 10% FLOPs and a short schedule (15 epochs) some seeds of the demo ShortcutConv1d end far
below the others (84-86% against 97-99%): every outgoing edge of a full-resolution layer closes
within one epoch and that stage is lost. The recipe therefore trains the shortcut-edge and
read-out gates at ``EDGE_LR_FACTOR`` (0.25) of the unit gates' rate. This script trains the
demo network for each seed with each ``--factors`` value (``none``: one gate rate) and records
the pruned model's test accuracy, whether it collapsed (accuracy below ``--threshold``), the
achieved FLOPs fraction and what was kept. Runs are independent, ``--jobs`` processes at a
time (one thread each).

    python -m bench.collapse [--target 0.1] [--epochs 15] [--seeds 0 1 ... 9]
        [--factors none 0.25] [--threshold 0.95] [--jobs 2] [--name collapse]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gatedprune.data import mnist1d
from gatedprune.demo import accuracy, train_demo_model

from .common import RESULTS, command_line, prune_with_reference, write_results


@dataclass(frozen=True)
class Run:
    """One training run: edge-gate rate factor (None: one gate rate) and seed."""

    factor: float | None
    seed: int
    target: float
    epochs: int
    num_samples: int


def _factor(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a factor must be > 0 or 'none', got {text!r}")
    return value


def run_one(run: Run) -> dict[str, Any]:
    """Train, prune and measure one run (in a worker process: one thread).

    >>> run_one(Run(None, 0, 0.5, 1, 200))["accuracy_pruned"]  # doctest: +SKIP
    """
    torch.set_num_threads(1)
    data = mnist1d(num_samples=run.num_samples)
    t0 = time.perf_counter()
    net, trainer = train_demo_model(
        data, budget=run.target, epochs=run.epochs, seed=run.seed, edge_lr_factor=run.factor
    )
    train_s = time.perf_counter() - t0
    r = prune_with_reference(net, data.x_train[:1])
    conn = net.connectivity()
    return {
        "edge_lr_factor": "none" if run.factor is None else run.factor,
        "target": run.target,
        "seed": run.seed,
        "accuracy_pruned": accuracy(r.pruned, data.x_test, data.y_test),
        "achieved_flops": r.flops_fraction,
        "lagrangian_only": (trainer.achieved_before_snap or {}).get("flops", ""),
        "layers_kept": f"{conn['layers_kept']}/{conn['layers_total']}",
        "edges_kept": f"{conn['edges_kept']}/{conn['edges_total']}",
        "kept_channels": "/".join(str(x["kept_units"]) for x in conn["layers"]),
        "train_s": train_s,
    }


def summarize(rows: Sequence[dict[str, Any]], threshold: float) -> list[str]:
    """One line per factor: collapsed runs, accuracy mean ± std and minimum.

    >>> summarize([{"edge_lr_factor": 0.25, "accuracy_pruned": 0.98},
    ...            {"edge_lr_factor": 0.25, "accuracy_pruned": 0.85}], 0.95)[0]
    '- edge_lr_factor 0.25: collapsed (accuracy < 95%) 1/2, accuracy 91.5% ± 9.2, minimum 85.0%'
    """
    lines = []
    for factor in dict.fromkeys(r["edge_lr_factor"] for r in rows):
        accs = [float(r["accuracy_pruned"]) for r in rows if r["edge_lr_factor"] == factor]
        collapsed = sum(a < threshold for a in accs)
        spread = f" ± {100 * statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
        lines.append(
            f"- edge_lr_factor {factor}: collapsed (accuracy < {100 * threshold:g}%) "
            f"{collapsed}/{len(accs)}, accuracy {100 * statistics.mean(accs):.1f}%{spread}, "
            f"minimum {100 * min(accs):.1f}%"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--factors", type=_factor, nargs="+", default=[None, 0.25])
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--num-samples", type=int, default=5000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--name", default="collapse")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    runs = [
        Run(f, s, args.target, args.epochs, args.num_samples)
        for f in args.factors
        for s in args.seeds
    ]
    t0 = time.perf_counter()
    if args.jobs == 1:
        rows = [run_one(r) for r in runs]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            rows = list(pool.map(run_one, runs))
    notes = summarize(rows, args.threshold)
    notes.append(
        f"- demo ShortcutConv1d, demo recipe (`train_demo_model`), {args.epochs} epochs, "
        f"FLOPs target {args.target:g}; accuracy of the pruned model on the test set; "
        f"{args.jobs} process(es) of one thread, {time.perf_counter() - t0:.0f} s in total"
    )
    write_results(
        args.name,
        rows,
        title="Collapse at a tight budget: one gate rate vs edge gates at a fraction of it",
        command=command_line() if argv is None else "python -m bench.collapse " + " ".join(argv),
        notes="\n".join(notes),
        out_dir=args.out,
    )


if __name__ == "__main__":
    main()
