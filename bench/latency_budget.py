"""Latency budgets vs FLOPs budgets on the demo network: which one buys real speed.

A :class:`gatedprune.LatencyModel` is calibrated for the demo ``ShortcutConv1d`` at batch 256
on one thread (its held-out prediction error is reported). For each target and seed the demo
recipe trains the network once under a FLOPs budget (``flops=t``, the demo's) and once under
a latency budget (``latency=t``: a fraction of the all-open network's *predicted* latency).
Every pruned model is then timed after all training, in the same interleaved rounds as one
all-open reference (1 thread), at batch 1 and 256. Reported per run: test accuracy, achieved
FLOPs fraction, predicted and measured latency fractions, speed-ups, and the latency ratio
(speed-up / FLOPs reduction, the issue's >= 0.7 criterion at batch 256).

    python -m bench.latency_budget [--targets 0.5 0.25 0.1] [--seeds 0] [--epochs 30]
        [--kinds flops latency] [--samples 48] [--name latency_budget]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gatedprune as gp
from gatedprune.data import mnist1d
from gatedprune.demo import accuracy, build_demo_model, train_demo_model
from gatedprune.profiling import compare_latency, num_threads

from .common import RESULTS, command_line, prune_with_reference, write_results

KINDS = ("flops", "latency")


def summarize(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per (kind, target): accuracy, FLOPs fraction, measured latency fraction of the
    all-open network and latency ratio, both at batch 256.

    >>> summarize([{"kind": "flops", "target": 0.1, "accuracy_pruned": 0.98,
    ...             "measured_latency_b256": 0.2, "latency_ratio_b256": 0.5,
    ...             "achieved_flops": 0.1}])[0]
    '- flops budget 0.1: accuracy 98.0%, FLOPs 0.100, latency 0.200, latency ratio 0.50 (1 seed(s))'
    """
    out = []
    keys = dict.fromkeys((r["kind"], r["target"]) for r in rows)
    for kind, target in keys:
        sel = [r for r in rows if (r["kind"], r["target"]) == (kind, target)]

        def mean(k: str, sel: list[dict[str, Any]] = sel) -> float:
            return statistics.mean(float(r[k]) for r in sel)

        out.append(
            f"- {kind} budget {target:g}: accuracy {100 * mean('accuracy_pruned'):.1f}%, "
            f"FLOPs {mean('achieved_flops'):.3f}, latency {mean('measured_latency_b256'):.3f}, "
            f"latency ratio {mean('latency_ratio_b256'):.2f} "
            f"({len(sel)} seed(s))"
        )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--samples", type=int, default=48, help="calibration networks")
    ap.add_argument("--num-samples", type=int, default=5000, help="MNIST-1D samples")
    ap.add_argument("--name", default="latency_budget")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    data = mnist1d(num_samples=args.num_samples)
    x1 = data.x_train[:1]
    t0 = time.perf_counter()
    lm = gp.LatencyModel.calibrate(build_demo_model(), x1, batch_size=256, samples=args.samples)
    calib_s = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {}
    reductions: list[float] = []
    for target in args.targets:
        for seed in args.seeds:
            for kind in args.kinds:
                t0 = time.perf_counter()
                net, _ = train_demo_model(
                    data,
                    budget=target if kind == "flops" else None,
                    latency=target if kind == "latency" else None,
                    latency_model=lm if kind == "latency" else None,
                    epochs=args.epochs,
                    seed=seed,
                )
                train_s = time.perf_counter() - t0
                r = prune_with_reference(net, x1)
                pruned, dense, c_p, c_d = r.pruned, r.dense, r.cost, r.dense_cost
                models.setdefault("dense", dense)
                models[str(len(rows))] = pruned
                reductions.append(c_d.flops / c_p.flops)
                conn = net.connectivity()
                rows.append(
                    {
                        "kind": kind,
                        "target": target,
                        "seed": seed,
                        "accuracy_pruned": accuracy(pruned, data.x_test, data.y_test),
                        "achieved_flops": c_p.flops / c_d.flops,
                        "predicted_latency": lm.predict(pruned) / lm.predict(dense),
                        "kept_channels": "/".join(str(x["kept_units"]) for x in conn["layers"]),
                        "edges_kept": f"{conn['edges_kept']}/{conn['edges_total']}",
                        "flops_reduction": reductions[-1],
                        "train_s": train_s,
                    }
                )
                print(rows[-1], flush=True)
    xb = {1: data.x_test[:1], 256: data.x_test[:256]}
    with num_threads(1):
        lat = {
            b: compare_latency(models, x, rounds=9, repeats=30 if b == 1 else 3, threads=1)
            for b, x in xb.items()
        }
    for i, (row, reduction) in enumerate(zip(rows, reductions, strict=True)):
        for b in xb:
            row[f"measured_latency_b{b}"] = lat[b][str(i)] / lat[b]["dense"]
        for b in xb:
            row[f"speedup_b{b}"] = lat[b]["dense"] / lat[b][str(i)]
        for b in xb:
            row[f"latency_ratio_b{b}"] = row[f"speedup_b{b}"] / reduction
    notes = summarize(rows)
    notes.append(
        f"- LatencyModel calibrated on {lm.samples} randomly pruned copies of the demo network "
        f"at batch {lm.batch_size}, {lm.threads} thread ({calib_s:.0f} s): held-out prediction "
        f"error median {100 * lm.median_error:.1f}%, max {100 * lm.max_error:.1f}%; "
        "predicted_latency: its prediction for the pruned model as a fraction of the all-open "
        "one; measured_latency: the measured fraction (1 thread, interleaved rounds after all "
        f"training); demo recipe, {args.epochs} epochs"
    )
    write_results(
        args.name,
        rows,
        title="Latency budget vs FLOPs budget: demo ShortcutConv1d on MNIST-1D",
        command=command_line()
        if argv is None
        else "python -m bench.latency_budget " + " ".join(argv),
        notes="\n".join(notes),
        out_dir=args.out,
    )


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
