"""``gate_`` and ``prune`` time on a 50-block ResNet-1D (target: under 2 s each).

    python -m bench.gate_prune_time [--repeats 5]

A ``ResNet1d(widths=(16, 32, 64), blocks=(17, 17, 16))`` (50 residual blocks, MNIST-1D shaped
input (1, 1, 40)) is gated with ``gate_`` (channels and blocks), about half of its block and
channel gates are closed at random, and it is pruned. Each repeat builds a fresh model; the
first repeat is a warm-up and is not counted. Reported: median wall time and median process
CPU time of each call (CPU time moves less with the load of a shared machine), and the pruned
model's largest difference from the gated one on a batch of 256 fresh inputs.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import TypeVar

import torch

import gatedprune as gp
from gatedprune.gating import InsertedGating, gate_
from gatedprune.gating.models import ResNet1d

from .common import command_line, median, write_results

T = TypeVar("T")


def _timed(fn: Callable[..., T], *args: object) -> tuple[T, float, float]:
    """``fn(*args)``, its wall time and its process CPU time (s)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    x1 = torch.randn(1, 1, 40)  # (B, C, L)
    x = torch.randn(256, 1, 40)  # (B, C, L)
    gen = torch.Generator().manual_seed(0)
    keys = ("gate_s", "gate_cpu_s", "prune_s", "prune_cpu_s")
    times: dict[str, list[float]] = {k: [] for k in keys}
    diffs: list[float] = []
    n_gates = 0
    for i in range(args.repeats + 1):
        big = ResNet1d(widths=(16, 32, 64), blocks=(17, 17, 16))
        _, gate_wall, gate_cpu = _timed(gate_, big, x1)
        gating = next(m for m in big.modules() if isinstance(m, InsertedGating))
        n_gates = gating.summary.n_gates
        for gate in [*gating.group_gates, *gating.block_gates]:
            gate.force_(torch.rand(gate.n, generator=gen) > 0.5)
        big.eval()
        small, prune_wall, prune_cpu = _timed(gp.prune, big)
        with torch.no_grad():
            diffs.append(float((small(x) - big(x)).abs().max()))
        if i == 0:
            continue  # warm-up
        for key, value in zip(times, (gate_wall, gate_cpu, prune_wall, prune_cpu), strict=True):
            times[key].append(value)
    if max(diffs) > 1e-5:
        raise RuntimeError(f"pruned != gated: max abs diff {max(diffs):.3g} > 1e-5")
    rows: list[dict[str, object]] = [
        {
            "model": "ResNet1d 16/32/64 x 17/17/16 (50 blocks)",
            **{k: median(v) for k, v in times.items()},
            "max_abs_diff": max(diffs),
            "gates": n_gates,
            "target_s": 2.0,
        }
    ]
    write_results(
        "resnet1d_gate_prune_time",
        rows,
        title="gate_ and prune wall time on a 50-block ResNet-1D (target: under 2 s each)",
        command=command_line(),
        notes=(
            f"Medians of {args.repeats} repeats after one warm-up, each on a fresh model, 1 "
            "thread; prune with about half of the block and channel gates closed at random; "
            "*_cpu_s: process CPU time of the same calls. 1-minute load average of the "
            f"machine (2 CPUs, shared): {load_start:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end."
        ),
    )


if __name__ == "__main__":
    main()
