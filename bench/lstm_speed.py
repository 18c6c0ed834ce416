"""Measured CPU latency of pruned recurrent networks versus their parameter reduction.

    python -m bench.lstm_speed [--quick]

A ``ShortcutLSTM(2, [H, H], 2, 1)`` (LSTM or GRU cells, shortcuts, sequences of T=50 steps) is
pruned to about 25% of its parameters by keeping the same number of (random) hidden units in
every layer, the largest number whose achieved parameter fraction is at most 0.25; the gates
are set, not trained (latency depends on the pruned architecture only). The dense reference is
the all-open network rebuilt by ``prune`` (the same plain ``nn.LSTM`` layers at full width).
Reported: achieved parameter and FLOPs fractions, median latency at batch 1 and 256 (one
thread, warm-up, then the median of repeated runs), speed-up over the dense model and
``efficiency = speed-up / parameter reduction`` (issue 4 target: >= 0.7). Also: the training
step time of the gated network vs the same network without gates (``lstm_train_step``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import gatedprune as gp
from gatedprune.profiling import measure_latency
from gatedprune.recurrent import ShortcutLSTM

from .common import OrtModule, command_line, write_results

TARGET = 0.25
LENGTH = 50


def _fraction(net: ShortcutLSTM, x: torch.Tensor, dense: float) -> float:
    return float(net.expected_cost(tuple(x.shape), hard=True)[1]) / dense


def _keep_units(net: ShortcutLSTM, k: int, gen: torch.Generator) -> None:
    for g in net.unit_gates:
        assert isinstance(g, gp.Gate)
        mask = torch.zeros(g.n, dtype=torch.bool)
        mask[torch.randperm(g.n, generator=gen)[:k]] = True
        g.force_(mask)


def _latency_ms(model: nn.Module, x: torch.Tensor, repeats: int, min_time: float) -> float:
    lat = measure_latency(model, x, warmup=3, repeats=repeats, min_time=min_time, threads=1)
    return 1e3 * lat.median


def run(
    cell: str, hidden: int, repeats: int, min_time: float, onnx: bool
) -> list[dict[str, object]]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = ShortcutLSTM(2, [hidden, hidden], 2, 1, cell=cell).eval()
    for g in gp.gate_modules(net):
        g.force_(torch.ones(g.n, dtype=torch.bool))
    x1 = torch.randn(1, LENGTH, 2)
    xb = torch.randn(256, LENGTH, 2)
    dense_flops, dense_params = (float(v) for v in net.expected_cost(tuple(x1.shape), hard=True))
    dense = gp.prune(net).eval()
    k = hidden
    while k > 1:
        _keep_units(net, k, gen)
        if _fraction(net, x1, dense_params) <= TARGET:
            break
        k -= 1
    pruned = gp.prune(net).eval()
    with torch.no_grad():
        diff = float((pruned(xb) - net(xb)).abs().max())
    flops, params = (float(v) for v in net.expected_cost(tuple(x1.shape), hard=True))
    models: dict[tuple[str, str], nn.Module] = {
        ("torch", "dense"): dense,
        ("torch", "pruned"): pruned,
    }
    if onnx:  # the same plain models exported (batch and length dynamic) and run in ORT
        example = torch.randn(3, 7, 2)
        for name, model in (("dense", dense), ("pruned", pruned)):
            models[("onnxruntime", name)] = OrtModule(model, example, dynamic_dims=(0, 1))
    rows: list[dict[str, object]] = []
    times = {
        key: (
            _latency_ms(model, x1, repeats, min_time),
            _latency_ms(model, xb, max(5, repeats // 4), min_time),
        )
        for key, model in models.items()
    }
    reduction = dense_params / params
    for runtime, name in models:
        b1, b256 = times[(runtime, name)]
        row: dict[str, object] = {
            "runtime": runtime,
            "cell": cell,
            "hidden": hidden,
            "model": name,
            "units_kept": hidden if name == "dense" else k,
            "params": int(dense_params if name == "dense" else params),
            "params_fraction": 1.0 if name == "dense" else params / dense_params,
            "flops_fraction": 1.0 if name == "dense" else flops / dense_flops,
            "ms_b1": b1,
            "ms_b256": b256,
        }
        if name == "pruned":
            s1 = times[(runtime, "dense")][0] / b1
            s256 = times[(runtime, "dense")][1] / b256
            row.update(
                {
                    "max_abs_diff": diff,
                    "speedup_b1": s1,
                    "efficiency_b1": s1 / reduction,
                    "speedup_b256": s256,
                    "efficiency_b256": s256 / reduction,
                }
            )
        rows.append(row)
        print(row, flush=True)
    return rows


def train_step_overhead(cell: str, hidden: int, repeats: int) -> dict[str, object]:
    """Median training step (forward, backward, Adam; batch 100) of the gated network vs its
    all-open plain rebuild (the same nn.LSTM layers without gates)."""
    torch.manual_seed(0)
    gated = ShortcutLSTM(2, [hidden, hidden], 2, 1, cell=cell)
    plain = gp.prune(gated)
    x = torch.randn(100, LENGTH, 2)
    y = torch.randn(100, LENGTH, 1)
    times: dict[str, float] = {}
    for name, model in (("gated", gated), ("plain", plain)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        samples = []
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            loss = F.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= 3:  # warm-up
                samples.append(time.perf_counter() - t0)
        times[name] = 1e3 * statistics.median(samples)
    row: dict[str, object] = {
        "cell": cell,
        "hidden": hidden,
        "ms_gated_step": times["gated"],
        "ms_plain_step": times["plain"],
        "gated_over_plain": times["gated"] / times["plain"],
    }
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        configs = [("lstm", 128)]
        repeats, min_time = 10, 0.0
    else:
        configs = [(cell, h) for cell in ("lstm", "gru") for h in (64, 128, 256)]
        repeats, min_time = 40, 1.0
    rows: list[dict[str, object]] = []
    for cell, hidden in configs:
        rows.extend(run(cell, hidden, repeats, min_time, not args.no_onnx))
    pruned_rows = [r for r in rows if r["model"] == "pruned"]
    passed = {
        (str(r["runtime"]), b): 0 for r in pruned_rows for b in (256, 1)
    }  # (runtime, batch) -> configurations with efficiency >= 0.7
    for r in pruned_rows:
        for b in (256, 1):
            passed[(str(r["runtime"]), b)] += float(r[f"efficiency_b{b}"]) >= 0.7  # type: ignore[arg-type]
    notes = (
        "efficiency = speed-up / parameter reduction (dense params / pruned params); target "
        f">= 0.7. Sequences of {LENGTH} steps, 2 input features, 1 output per step; one "
        "thread; median latency. Pruned: the same number of random units kept in each layer "
        f"(largest with params fraction <= {TARGET}). runtime onnxruntime: the same plain "
        "models exported with gatedprune.export_onnx (ONNX LSTM/GRU operators) and run in "
        "ONNX Runtime, one thread. Configurations reaching the target: "
        + "; ".join(
            f"{rt}: {passed[(rt, 256)]}/{len(configs)} at batch 256, "
            f"{passed[(rt, 1)]}/{len(configs)} at batch 1"
            for rt in dict.fromkeys(rt for rt, _ in passed)
        )
        + "."
    )
    overhead = [train_step_overhead(c, h, 5 if args.quick else 20) for c, h in configs]
    write_results(
        "lstm_train_step_quick" if args.quick else "lstm_train_step",
        overhead,
        title="ShortcutLSTM: training step of the gated network vs the same network without gates",
        command=command_line(),
        notes=(
            "Forward + MSE loss + backward + Adam step, batch 100, T = "
            f"{LENGTH}, one thread, median of repeated steps after 3 warm-up steps. plain = "
            "the all-open network rebuilt by prune (same nn.LSTM layers and wiring)."
        ),
    )
    write_results(
        "lstm_speed_quick" if args.quick else "lstm_speed",
        rows,
        title="ShortcutLSTM: latency speed-up of the pruned plain model vs parameter reduction",
        command=command_line(),
        notes=notes,
    )


if __name__ == "__main__":
    main()
