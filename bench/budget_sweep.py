"""Budget accuracy, quality and real speed-up of the demo network at several FLOPs targets.

For each target and seed: train the demo ShortcutConv1d on MNIST-1D under the budget (the
demo's recipe), prune, and record the achieved FLOPs/params fractions, the budget error
|achieved - target| (target <= 0.02), test accuracy of the pruned model, and the measured
CPU latency of the pruned model vs the all-open network at batch 1 and 256; "latency ratio" is
(latency speed-up) / (FLOPs reduction) (target >= 0.7 at batch 256). ``--unit-groups`` trains
the same network with channels gated in groups (``ShortcutConv1d(unit_group=g)``, kept widths
in multiples of g); ``--round-to`` instead rounds the widths at the snap
(``snap_to_budget(round_to=m)``, 0: no rounding). All pruned models are timed after all
training, in the same interleaved rounds as one all-open reference. ``--onnx`` adds the
latency ratios of the same models exported to ONNX and run in ONNX Runtime.
``--latency-ratio R`` adds a latency budget to every FLOPs budget ``t``: ``latency=t / R``, a
fraction of the all-open network's latency as predicted by a :class:`gatedprune.LatencyModel`
calibrated (batch 256, 1 thread) on the demo network with the same ``unit_group``, i.e. the
latency at which the pruned network would meet a latency ratio of ``R``.

    python -m bench.budget_sweep [--targets 0.5 0.25 0.1] [--seeds 0] [--epochs 30]
        [--unit-groups 1] [--round-to 0] [--latency-ratio R] [--name budget_sweep] [--onnx]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import gatedprune as gp
from gatedprune.data import mnist1d
from gatedprune.demo import accuracy, build_demo_model, max_abs_diff, train_demo_model
from gatedprune.profiling import compare_latency

from .common import (
    OrtModule,
    channels_first,
    command_line,
    prune_with_reference,
    write_results,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--unit-groups", type=int, nargs="+", default=[1])
    ap.add_argument("--round-to", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--latency-ratio",
        type=float,
        default=None,
        help="add latency=target/R to every FLOPs budget (a calibrated LatencyModel)",
    )
    ap.add_argument("--name", default="budget_sweep")
    ap.add_argument(
        "--onnx",
        action="store_true",
        help="also time every model exported to ONNX and run in ONNX Runtime (1 thread)",
    )
    args = ap.parse_args()
    data = mnist1d()
    x1 = data.x_train[:1]
    xb = {1: data.x_test[:1], 256: data.x_test[:256]}
    rows = []
    models: dict[str, nn.Module] = {}
    reductions: list[float] = []
    variants = [(g, r) for g in args.unit_groups for r in args.round_to]
    ratio = args.latency_ratio
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"--latency-ratio must be in (0, 1], got {ratio!r}")
    calibrations: list[str] = []
    for group, round_to in variants:
        lm: gp.LatencyModel | None = None
        if ratio is not None:
            lm = gp.LatencyModel.calibrate(
                build_demo_model(unit_group=group), x1, batch_size=256, threads=1, samples=48
            )
            calibrations.append(
                f"unit_group {group}: held-out error median {100 * lm.median_error:.1f}%, "
                f"max {100 * lm.max_error:.1f}%"
            )
        for target in args.targets:
            latency_target = None if ratio is None else min(1.0, target / ratio)
            for seed in args.seeds:
                t0 = time.perf_counter()
                net, trainer = train_demo_model(
                    data,
                    budget=target,
                    epochs=args.epochs,
                    seed=seed,
                    unit_group=group,
                    round_to=round_to or None,
                    latency=latency_target,
                    latency_model=lm,
                )
                train_s = time.perf_counter() - t0
                r = prune_with_reference(net, x1)
                pruned, dense, c_p, c_d = r.pruned, r.dense, r.cost, r.dense_cost
                if "dense" not in models:  # the all-open network is the same for every group
                    models["dense"] = dense
                    models["dense_folded"] = dense.fold_batchnorm().eval()
                    models["dense_channels_first"] = channels_first(dense)
                    if args.onnx:
                        models["dense_ort"] = OrtModule(dense, x1)
                i = len(rows)
                models[f"pruned{i}"] = pruned
                models[f"folded{i}"] = pruned.fold_batchnorm().eval()
                models[f"channels_first{i}"] = channels_first(pruned)
                if args.onnx:
                    models[f"ort{i}"] = OrtModule(pruned, x1)
                achieved = c_p.flops / c_d.flops
                reductions.append(c_d.flops / c_p.flops)
                rows.append(
                    {
                        "unit_group": group,
                        "round_to": round_to,
                        "target": target,
                        **(
                            {}
                            if lm is None
                            else {
                                "latency_target": latency_target,
                                "predicted_latency": lm.predict(pruned) / lm.predict(dense),
                            }
                        ),
                        "seed": seed,
                        "achieved_flops": achieved,
                        "budget_error": abs(achieved - target),
                        "lagrangian_only": (trainer.achieved_before_snap or {}).get("flops", ""),
                        "achieved_params": c_p.params / c_d.params,
                        "accuracy_pruned": accuracy(pruned, data.x_test, data.y_test),
                        "max_abs_diff": max_abs_diff(net, pruned, data.x_test, dtype=torch.float32),
                        "kept_channels": "/".join(
                            str(int(layer.op.out_channels)) for layer in pruned.layers
                        ),
                        "edges_kept": "{edges_kept}/{edges_total}".format(**net.connectivity()),
                        "flops_reduction": reductions[-1],
                        "train_s": train_s,
                    }
                )
    lat = {
        b: compare_latency(models, x, rounds=9, repeats=30 if b == 1 else 3, threads=1)
        for b, x in xb.items()
    }
    for i, (row, reduction) in enumerate(zip(rows, reductions, strict=True)):
        for b in xb:  # the speed-ups first, then the ratios (the tables' column order)
            row[f"speedup_b{b}"] = lat[b]["dense"] / lat[b][f"pruned{i}"]
        for b in xb:
            row[f"latency_ratio_b{b}"] = row[f"speedup_b{b}"] / reduction
        row["latency_ratio_b256_bn_folded"] = (
            lat[256]["dense_folded"] / lat[256][f"folded{i}"] / reduction
        )
        row["latency_ratio_b256_channels_first"] = (
            lat[256]["dense_channels_first"] / lat[256][f"channels_first{i}"] / reduction
        )
        row["latency_b256_ms"] = 1e3 * lat[256][f"pruned{i}"]
        row["latency_b256_ms_channels_first"] = 1e3 * lat[256][f"channels_first{i}"]
        if args.onnx:
            for b in xb:
                row[f"latency_ratio_b{b}_onnxruntime"] = (
                    lat[b]["dense_ort"] / lat[b][f"ort{i}"] / reduction
                )
    summary = []
    for group, round_to in variants:
        for target in args.targets:
            sel = [
                r
                for r in rows
                if r["target"] == target and (r["unit_group"], r["round_to"]) == (group, round_to)
            ]
            errs = [float(r["budget_error"]) for r in sel]
            accs = [float(r["accuracy_pruned"]) for r in sel]
            ratios = [float(r["latency_ratio_b256"]) for r in sel]
            summary.append(
                f"- unit_group {group}, round_to {round_to}, target {target:g}: "
                f"max budget error {max(errs):.4f}, "
                f"accuracy {100 * statistics.mean(accs):.1f}%"
                + (f" ± {100 * statistics.stdev(accs):.1f}" if len(accs) > 1 else "")
                + f", latency ratio at batch 256 {statistics.mean(ratios):.2f}"
                + f" over {len(sel)} seed(s)"
            )
    summary.append(
        f"- all-open network at batch 256: {1e3 * lat[256]['dense']:.2f} ms (channels-last "
        f"eval path), {1e3 * lat[256]['dense_channels_first']:.2f} ms ((B, C, L) path); "
        "*_channels_first columns: both networks with `channels_last = False`"
    )
    summary.append(
        "- every model timed after all training, in the same interleaved rounds as one "
        "all-open reference (1 thread)"
    )
    if ratio is not None:
        summary.append(
            f"- latency budget latency=target/{ratio:g} next to every FLOPs budget: a fraction "
            "of the all-open network's latency predicted by a LatencyModel calibrated on 48 "
            "randomly pruned copies of the demo network with the same unit_group (batch 256, "
            f"1 thread; {'; '.join(calibrations)}); predicted_latency: its prediction for the "
            "pruned model"
        )
    write_results(
        args.name,
        rows,
        title="Budget sweep: demo ShortcutConv1d on MNIST-1D"
        + (
            ""
            if args.unit_groups == [1]
            else ", channels gated in groups (unit_group "
            + " / ".join(map(str, args.unit_groups))
            + ")"
        )
        + (
            ""
            if args.round_to == [0]
            else ", widths rounded at the snap (round_to "
            + " / ".join(map(str, args.round_to))
            + ")"
        )
        + ("" if ratio is None else f", FLOPs + latency budgets (latency = target / {ratio:g})"),
        command=command_line(),
        notes="\n".join(summary),
    )


if __name__ == "__main__":
    main()
