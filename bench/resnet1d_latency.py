"""Trained depth pruning of a 1D ResNet: a FLOPs budget alone against FLOPs + latency budgets.

For each FLOPs target ``t`` the ResNet of ``bench.resnet1d_speed`` (32/64/128 channels x 4/4/4
basic blocks, block gates only) is trained on MNIST-1D with the demos' recipe
(:func:`gatedprune.demo.budget_trainer`) twice: under ``flops=t`` alone, and under ``flops=t``
plus ``latency=t / 0.8``, a fraction of the all-open model's latency as a
:class:`gatedprune.GatedLatencyModel` calibrated here at batch 1 (1 thread) predicts it: the
latency that the issue's efficiency target of 0.8 allows at that FLOPs fraction. Every pruned
model is timed after all training, in the same interleaved rounds as the all-open model (eager
PyTorch, 1 thread, batch 1 and 256). Reported per run: test accuracy of the pruned model,
achieved FLOPs, predicted and measured latency fractions, blocks kept, speed-up and
``efficiency`` = speed-up / FLOPs reduction.

    python -m bench.resnet1d_latency [--targets 0.5 0.25 0.1] [--seeds 0] [--epochs 20]
        [--samples 48] [--name resnet1d_latency]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gatedprune as gp
from gatedprune.calibrate import recalibrate_batchnorm
from gatedprune.data import mnist1d
from gatedprune.demo import accuracy, all_open_copy, budget_trainer
from gatedprune.gating import InsertedGating, ResNet1d, gate_
from gatedprune.profiling import compare_latency, num_threads

from .common import RESULTS, command_line, write_results

WIDTHS = (32, 64, 128)
BLOCKS = (4, 4, 4)
EFFICIENCY = 0.8  # the target: latency fraction <= FLOPs fraction / 0.8


def _gated(x1: torch.Tensor) -> nn.Module:
    net = ResNet1d(1, 10, widths=WIDTHS, blocks=BLOCKS)
    gate_(net, x1, channels=False, blocks=True)
    return net


def _gating(net: nn.Module) -> InsertedGating:
    g = net.gatedprune
    if not isinstance(g, InsertedGating):
        raise TypeError("expected a model gated with gate_")
    return g


def _flops(model: nn.Module, x1: torch.Tensor) -> float:
    c = gp.cost(model, x1)
    if not isinstance(c, gp.Cost):
        raise TypeError("expected a plain (pruned) model")
    return float(c.flops)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--samples", type=int, default=48, help="latency calibration copies")
    ap.add_argument("--num-samples", type=int, default=5000, help="MNIST-1D samples")
    ap.add_argument("--name", default="resnet1d_latency")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    data = mnist1d(num_samples=args.num_samples)
    x1 = data.x_train[:1]  # (1, 1, 40): costs per sample
    calib = [data.x_train[i : i + 500] for i in range(0, min(len(data.x_train), 2000), 500)]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with num_threads(1):
        lm = gp.GatedLatencyModel.calibrate(_gated(x1), x1, batch_size=1, samples=args.samples)
    calib_s = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {}
    flops: list[float] = []
    for target in args.targets:
        for seed in args.seeds:
            for kind in ("flops", "flops+latency"):
                torch.manual_seed(seed)
                net = _gated(x1)
                latency = target / EFFICIENCY if kind == "flops+latency" else None
                t0 = time.perf_counter()
                trainer = budget_trainer(
                    net,
                    data,
                    flops=target,
                    latency=latency,
                    latency_model=lm if latency is not None else None,
                    epochs=args.epochs,
                    seed=seed,
                )
                trainer.fit(train=(data.x_train, data.y_train))
                recalibrate_batchnorm(net, calib)
                train_s = time.perf_counter() - t0
                net.eval()
                pruned = gp.prune(net).eval()
                predicted = float(lm.expected(net, hard=True))
                dense = gp.prune(all_open_copy(net)).eval()
                if "dense" not in models:
                    models["dense"] = dense
                    flops.append(_flops(dense, x1))
                with torch.no_grad():
                    diff = float((pruned(data.x_test[:256]) - net(data.x_test[:256])).abs().max())
                g = _gating(net)
                models[str(len(rows))] = pruned
                rows.append(
                    {
                        "budget": kind,
                        "target": target,
                        "latency_target": "" if latency is None else latency,
                        "seed": seed,
                        "accuracy_pruned": accuracy(pruned, data.x_test, data.y_test),
                        "flops_fraction": _flops(pruned, x1) / flops[0],
                        "predicted_latency": predicted
                        / float(lm.expected(all_open_copy(net), hard=True)),
                        "blocks_kept": len(g.block_gates) - len(g.closed_blocks()),
                        "closed_blocks": " ".join(str(i) for i in g.closed_blocks()) or "-",
                        "max_abs_diff": diff,
                        "train_s": train_s,
                    }
                )
                print(rows[-1], flush=True)
    xb = {1: data.x_test[:1], 256: data.x_test[:256]}
    with num_threads(1), torch.no_grad():
        lat = {
            b: compare_latency(models, x, rounds=9, repeats=30 if b == 1 else 3, threads=1)
            for b, x in xb.items()
        }
    for i, row in enumerate(rows):
        reduction = 1.0 / float(row["flops_fraction"])
        for b in xb:
            row[f"measured_latency_b{b}"] = lat[b][str(i)] / lat[b]["dense"]
            row[f"speedup_b{b}"] = lat[b]["dense"] / lat[b][str(i)]
            row[f"efficiency_b{b}"] = row[f"speedup_b{b}"] / reduction
    notes = [
        f"- {kind} budget {t}: efficiency at batch 1 "
        + ", ".join(
            f"{r['efficiency_b1']:.2f}" for r in rows if r["budget"] == kind and r["target"] == t
        )
        + " (seeds "
        + ", ".join(str(r["seed"]) for r in rows if r["budget"] == kind and r["target"] == t)
        + ")"
        for t in args.targets
        for kind in ("flops", "flops+latency")
    ]
    notes.append(
        f"- GatedLatencyModel calibrated on {lm.samples} randomly pruned copies at batch 1, "
        f"1 thread ({calib_s:.0f} s): held-out error median {100 * lm.median_error:.1f}%, max "
        f"{100 * lm.max_error:.1f}%; predicted_latency: its prediction for the pruned model as "
        "a fraction of the all-open one; measured_latency: the measured fraction (eager "
        "PyTorch, 1 thread, interleaved rounds after all training, BatchNorm not folded); "
        f"demo recipe, {args.epochs} epochs, block gates only; all-open model: "
        f"{1e3 * lat[1]['dense']:.3f} ms at batch 1, {1e3 * lat[256]['dense']:.2f} ms at 256"
    )
    write_results(
        args.name,
        rows,
        title="ResNet-1D depth pruning trained under FLOPs vs FLOPs + latency budgets (MNIST-1D)",
        command=command_line()
        if argv is None
        else "python -m bench.resnet1d_latency " + " ".join(argv),
        notes="\n".join(notes),
        out_dir=args.out,
    )


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
