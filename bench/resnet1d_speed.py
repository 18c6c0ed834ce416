"""Measured CPU speed-up of pruned 1D ResNets versus their FLOPs reduction.

    python -m bench.resnet1d_speed [--quick]

A ``ResNet1d(widths=(32, 64, 128), blocks=(4, 4, 4))`` on MNIST-1D shaped inputs (1 x 40) is
gated with ``gatedprune.gating.gate_`` and pruned to about 50 / 25 / 10 % of its FLOPs, either
by depth (block gates only: whole residual blocks closed, largest first) or by width (channel
gates only: the same fraction of every channel group kept), or by depth chosen for latency
(``depth-latency``: of the block subsets within [0.8, 1] x the FLOPs target, the one with the
most FLOPs per ms that a ``GatedLatencyModel`` calibrated here at batch 1 predicts, which keeps
fewer, larger blocks: eager PyTorch pays 10-20 us per operator whatever its size). The gates
are set, not trained:
latency depends on the pruned architecture only. Reported: achieved FLOPs fraction, median
latency at batch 1 and 256 (1 thread), speed-up over the dense model, and ``efficiency`` =
speed-up / FLOPs reduction (1.0: latency falls as fast as FLOPs). The wall time of ``gate_``
and ``prune`` on a 50-block ResNet-1D is ``bench.gate_prune_time``.

Two more settings: the same ResNet at a compute-bound signal length (L = 1024, an ECG/audio
length; batch 1 only: a 256 x 1024 batch takes seconds per forward on one thread), and a
deployment variant ``fold=yes`` where every Conv -> BatchNorm pair of the dense and the pruned
model alike is folded (``gatedprune.fold_batchnorm``); its speed-up and FLOPs reduction compare
the folded pruned model with the folded dense one. ``fold=onnxruntime`` rows run the same
unfolded models exported to ONNX (``gatedprune.export_onnx``) in ONNX Runtime, a deployment
runtime with far less per-operator overhead than eager PyTorch (``--no-onnx`` skips them).
``--quick`` writes ``*_quick`` result files.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from collections.abc import Callable

import torch
from torch import nn

import gatedprune as gp
from gatedprune.gating import InsertedGating, gate_
from gatedprune.gating.models import ResNet1d
from gatedprune.profiling import compare_latency

from .common import OrtModule, command_line, write_results

TARGETS = (0.5, 0.25, 0.1)


def _gating(model: nn.Module) -> InsertedGating:
    g = model.gatedprune
    assert isinstance(g, InsertedGating)
    return g


def _fraction(model: nn.Module, x: torch.Tensor, dense: float) -> float:
    return float(gp.cost(model, x, hard=True).flops) / dense


def _depth(model: nn.Module, x: torch.Tensor, dense: float, target: float) -> None:
    g = _gating(model)
    for gate in g.block_gates:
        gate.force_(torch.ones(1, dtype=torch.bool))
    order = sorted(range(len(g.block_gates)), key=lambda i: -g.summary.blocks[i][2])
    for i in order:
        if _fraction(model, x, dense) <= target:
            break
        g.block_gates[i].force_(torch.zeros(1, dtype=torch.bool))


def _depth_latency(
    lm: gp.GatedLatencyModel, model: nn.Module, x: torch.Tensor, dense: float, target: float
) -> None:
    """Depth pruning chosen by a latency model: of every subset of open blocks whose FLOPs
    fraction lies in [0.8, 1] x ``target``, the one with the most FLOPs per predicted ms
    (the predicted efficiency), searched exhaustively (2^12 subsets)."""
    g = _gating(model)
    n = len(g.block_gates)
    best: tuple[float, int] | None = None
    for subset in range(2**n):
        for i, gate in enumerate(g.block_gates):
            gate.force_(torch.tensor([bool(subset >> i & 1)]))
        z = lm.features(model, hard=True)
        flops = z["flops"] * x.shape[0] / dense
        if 0.8 * target <= flops <= target:
            score = flops / float(lm.expected(model, hard=True))
            if best is None or score > best[0]:
                best = (score, subset)
    if best is None:
        raise ValueError(f"no subset of blocks has a FLOPs fraction in [0.8, 1] x {target}")
    for i, gate in enumerate(g.block_gates):
        gate.force_(torch.tensor([bool(best[1] >> i & 1)]))


def _width(model: nn.Module, x: torch.Tensor, dense: float, target: float) -> None:
    g = _gating(model)

    def keep(r: float) -> None:
        for gate in g.group_gates:
            k = max(1, math.ceil(r * gate.n))
            gate.force_(torch.arange(gate.n) < k)

    lo, hi = 0.0, 1.0
    for _ in range(20):  # largest keep ratio meeting the target
        mid = (lo + hi) / 2
        keep(mid)
        if _fraction(model, x, dense) <= target:
            lo = mid
        else:
            hi = mid
    keep(lo)


def _rows(
    length: int,
    reps: dict[int, int],
    fold: bool,
    rounds: int,
    onnx: bool,
    calibrations: list[str],
) -> tuple[list[dict[str, object]], int]:
    """Depth and width rows at input length ``length`` (``reps``: repeats per round for each
    batch size). Every pruned variant is built first; then, per batch size and fold variant,
    the dense model and all pruned ones are timed in the same interleaved rounds
    (:func:`gatedprune.profiling.compare_latency`), so each row's speed-up divides by the
    same dense latency. ``calibrations`` receives a line on each latency model fitted."""
    torch.manual_seed(0)
    xs = {b: torch.randn(b, 1, length) for b in reps}  # (B, 1, L)
    x1 = xs[1]
    dense_model = ResNet1d(widths=(32, 64, 128), blocks=(4, 4, 4)).eval()
    dense = gp.cost(dense_model, x1)
    if not isinstance(dense, gp.Cost):
        raise TypeError("the dense ResNet1d has no gates: expected a plain Cost")
    references: dict[str, nn.Module] = {"no": dense_model}
    if fold:
        references["yes"] = gp.fold_batchnorm(dense_model)
    if onnx:  # ONNX Runtime fuses Conv -> BatchNorm itself: the unfolded models are exported
        references["onnxruntime"] = OrtModule(dense_model, x1)
    modes: dict[str, tuple[dict[str, bool], Callable[..., None] | None]] = {
        "depth": ({"channels": False, "blocks": True}, _depth),
        "depth-latency": ({"channels": False, "blocks": True}, None),
        "width": ({"channels": True, "blocks": False}, _width),
    }
    check = xs[max(reps)][:16]  # (<=16, 1, L)
    rows: list[dict[str, object]] = []
    reductions: list[float] = []  # dense FLOPs / pruned FLOPs, per row
    nets: dict[str, dict[int, nn.Module]] = {f: {} for f in references}
    for mode, (options, setter) in modes.items():
        model = ResNet1d(widths=(32, 64, 128), blocks=(4, 4, 4))
        model.load_state_dict(dense_model.state_dict())
        gate_(model, x1, **options)
        model.eval()
        if setter is None:  # depth-latency: a latency model of this machine at batch 1
            t0 = time.perf_counter()
            lm = gp.GatedLatencyModel.calibrate(model, x1, batch_size=1, samples=48)
            calibrations.append(
                f"L={length}: {time.perf_counter() - t0:.0f} s, held-out error median "
                f"{lm.median_error:.1%}, max {lm.max_error:.1%}"
            )
            setter = functools.partial(_depth_latency, lm)
        for target in TARGETS:
            setter(model, x1, float(dense.flops), target)
            pruned = gp.prune(model).eval()
            for folded in references:
                net = gp.fold_batchnorm(pruned) if folded == "yes" else pruned
                ref = dense_model if folded == "onnxruntime" else references[folded]
                c, c_ref = gp.cost(net, x1), gp.cost(ref, x1)
                if not isinstance(c, gp.Cost) or not isinstance(c_ref, gp.Cost):
                    raise TypeError("pruned and dense models must be plain (no gates)")
                if folded == "onnxruntime":
                    net = OrtModule(net, x1)  # export_onnx checked it against the model
                with torch.no_grad():
                    diff = float((net(check) - model(check)).abs().max())
                nets[folded][len(rows)] = net
                rows.append(
                    {
                        "length": length,
                        "fold": folded,
                        "mode": mode,
                        "target": target,
                        "flops_fraction": c.flops / dense.flops,
                        "params_fraction": c.params / dense.params,
                        "max_abs_diff": diff,
                    }
                )
                reductions.append(c_ref.flops / c.flops)
    for folded, ref in references.items():
        for b, x in xs.items():
            models = {"dense": ref, **{str(i): net for i, net in nets[folded].items()}}
            t = compare_latency(models, x, rounds=rounds, repeats=reps[b], threads=1)
            for i in nets[folded]:
                row = rows[i]
                speedup = t["dense"] / t[str(i)]
                row[f"dense_ms_b{b}"] = 1e3 * t["dense"]
                row[f"ms_b{b}"] = 1e3 * t[str(i)]
                row[f"speedup_b{b}"] = speedup
                row[f"efficiency_b{b}"] = speedup / reductions[i]
    return rows, dense.flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    suffix = "_quick" if args.quick else ""
    load_start = os.getloadavg()[0]
    rounds = 3 if args.quick else 7
    onnx = not args.no_onnx
    calibrations: list[str] = []
    rows, dense_flops = _rows(
        40,
        {1: 10 if args.quick else 40, 256: 1 if args.quick else 3},
        True,
        rounds,
        onnx,
        calibrations,
    )
    long_rows, long_flops = _rows(
        1024, {1: 2 if args.quick else 8}, True, rounds, onnx, calibrations
    )
    rows += long_rows
    dense_model = ResNet1d(widths=(32, 64, 128), blocks=(4, 4, 4))
    dense_params = sum(p.numel() for p in dense_model.parameters())
    write_results(
        "resnet1d_speed" + suffix,
        rows,
        title="ResNet-1D (32/64/128 x 4/4/4 blocks): latency speed-up vs FLOPs reduction",
        command=command_line(),
        notes=(
            "efficiency = speed-up / FLOPs reduction (dense FLOPs / pruned FLOPs); 1 thread; "
            "speed-up = dense median / pruned median, every model of a length and fold "
            "variant timed in the same interleaved rounds (one dense latency). Depth: whole "
            "residual blocks removed (largest first) until the "
            "FLOPs fraction is at most the target; depth-latency: whole blocks too, the subset "
            "whose FLOPs fraction lies in [0.8, 1] x target with the most FLOPs per predicted "
            "ms, predicted by a gatedprune.GatedLatencyModel calibrated on this machine at "
            f"batch 1, 1 thread ({'; '.join(calibrations)}); the same architecture is timed "
            "at batch 256. Width: the same fraction of every channel group kept. "
            "length: input length L of the (B, 1, L) input (1024: batch 1 only). "
            "fold=yes: Conv -> BatchNorm pairs folded in the dense and the pruned model "
            "(gatedprune.fold_batchnorm), speed-up and FLOPs reduction against the folded "
            "dense model (flops_fraction stays relative to the unfolded dense model). "
            "fold=onnxruntime: the unfolded dense and pruned models exported with "
            "gatedprune.export_onnx and run in ONNX Runtime (1 thread; it fuses Conv -> "
            "BatchNorm itself), timed in the same rounds. "
            f"Dense FLOPs per sample: {dense_flops} (L=40), {long_flops} (L=1024); "
            f"params {dense_params}. 1-minute load average of the machine (2 CPUs, shared): "
            f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end of the timing."
        ),
    )


if __name__ == "__main__":
    main()
