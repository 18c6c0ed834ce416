"""`prune()` wall time on a 24-layer, width-256 ShortcutMLP (target: under 1 s).

python -m bench.prune_time [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

import gatedprune as gp

from .common import command_line, median, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for state in ("all open", "random 50% closed"):
        net = gp.ShortcutMLP(256, [256] * 24, 10).eval()
        if state != "all open":
            for g in gp.gate_modules(net):
                g.force_(torch.rand(g.n) > 0.5)
        else:
            for g in gp.gate_modules(net):
                g.force_(torch.ones(g.n, dtype=torch.bool))
        gp.prune(net)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            small = gp.prune(net)
            times.append(time.perf_counter() - t0)
        x = torch.randn(64, 256)
        with torch.no_grad():
            diff = float((small.eval()(x) - net(x)).abs().max())
        rows.append(
            {
                "model": "ShortcutMLP 24 x 256",
                "gates": state,
                "prune_s_median": median(times),
                "prune_s_max": max(times),
                "target_s": 1.0,
                "max_abs_diff": diff,
            }
        )
    write_results("prune_time", rows, title="prune() wall time", command=command_line())


if __name__ == "__main__":
    main()
